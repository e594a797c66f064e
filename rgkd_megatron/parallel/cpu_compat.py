"""CPU compatibility for megatron-core: the ONE place where we accommodate a CUDA-less torch.

`apply()` is a no-op when CUDA is available, so the GPU path (NCCL, TE, apex) is never touched.
On a CPU-only build it installs, once per process:

1. ``cuda_api``: stubs for the ``torch.cuda`` calls megatron-core makes unconditionally.
   Call sites: ``torch.cuda.current_device()`` used as ``device=`` in ~175 places
   (tensor_parallel/layers.py weight allocation, schedules.py loss/num-token tensors,
   distributed/param_and_grad_buffer.py buffers, optimizer/clip_grads.py norms);
   ``torch.cuda.synchronize/empty_cache`` (timers, dist_checkpointing);
   ``torch.cuda.current_stream().wait_event`` / ``torch.cuda.Event`` / ``torch.cuda.stream``
   (distributed/param_and_grad_buffer.py grad-reduce overlap, pipeline_parallel/p2p_communication.py);
   ``torch.cuda.memory_allocated`` & co. (memory reporting).
2. ``device_mode``: a process-wide ``TorchFunctionMode`` rewriting ``device="cuda"`` / ``"cuda:N"`` /
   integer ordinals to ``"cpu"``, making ``Tensor.cuda()`` / ``pin_memory()`` no-ops and
   ``Tensor.type()`` report ``torch.cuda.*`` (optimizer/optimizer.py:690, distrib_optimizer.py:420,
   clip_grads.py:167 compare dtype by that string). torch >= 2.1x dispatches ``backward()`` through
   ``__torch_function__`` with the mode popped, so the handler re-enters the mode and calls the
   autograd engine directly (as megatron's schedules.custom_backward does); otherwise custom
   autograd Functions' backward (tensor_parallel/mappings.py, cross_entropy.py) allocate on CUDA.
3. ``rng``: a CPU ``CudaRNGStatesTracker`` (tensor_parallel/random.py: ``get_cuda_rng_tracker``,
   ``model_parallel_cuda_manual_seed``; used by dropout and TP weight init), forking the CPU
   generator, and ``model_parallel_cuda_manual_seed`` also seeding the CPU generator.
4. ``sp_norm``: the local spec's ``WrappedTorchNorm`` refuses sequence parallelism; a torch norm whose
   params carry ``sequence_parallel`` (like apex's FusedLayerNorm) so ``finalize_model_grads``
   all-reduces their grads over TP (models/backends.py ``LNImpl``, transformer_block.py
   ``LayerNormImpl``). Only applied when neither TE nor apex is importable.
5. ``distopt_torch_adam``: DistributedOptimizer with torch's Adam (no TE/apex fused Adam) on
   checkpoint load (optimizer/distrib_optimizer.py ``_set_main_param_and_optimizer_states`` and
   ``load_state_dict``): a missing per-param ``step`` KeyError, one shared ``step`` tensor for every
   param after load (torch Adam then increments it once per param: silent drift), and an in-place
   copy into a grad-requiring view. Each param gets its own step tensor from the checkpoint.
6. ``grad_scale``: without TE/apex megatron-core's ``multi_tensor_scale`` fallback
   (utils.py ``local_multi_tensor_scale``, used by clip_grads.py's clipping and optimizer.py's
   copies) computes ``dst.copy_(src * scale)``: a temporary and a second pass per tensor, on
   [V, h] embeddings a fresh 100+ MB allocation each step. :func:`inplace_multi_tensor_scale` gives
   the same values (the same fp32 multiply) in place when ``dst is src`` and as a plain copy when
   ``scale == 1``. Only replaced where the fallback is the one in use.
7. ``tp_shortcuts``: exact shortcuts past megatron-core's autograd wrappers where they compute
   nothing (a linear layer without a gradient, TP region mappings on one rank, viewless tensors
   without grad mode; ``parallel/cpu_shortcuts.py``): a decode step's Python overhead.
8. ``wgrad_accum``: a CPU twin of apex's ``fused_weight_gradient_mlp_cuda`` for megatron's
   linear layers (``kernels/cpu_wgrad.py``): ``training.engine.build_engine`` then switches the
   linear layers of an fp32 DDP model to gradient-accumulation fusion (the weight gradient
   accumulated into the DDP grad buffer by the GEMM, as on GPU) and its one-rank word embedding to
   index-adding its rows into that buffer.

:func:`plain_torch` runs a block without the device mode (for hot loops that create no tensor on a
device: the cache reader, decode steps of generation).

Select a subset with ``RGKD_CPU_PATCHES=cuda_api,device_mode,...`` (default: all) when debugging.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from rgkd_megatron.parallel import cpu_shortcuts, mcore_version

ALL_PATCHES = (
    "cuda_api",
    "device_mode",
    "rng",
    "sp_norm",
    "distopt_torch_adam",
    "grad_scale",
    "tp_shortcuts",
    "wgrad_accum",
)
_applied: set[str] = set()
_mode: TorchFunctionMode | None = None


def cpu_mode_required() -> bool:
    """True when megatron-core must run on CPU (no usable CUDA device)."""
    return not torch.cuda.is_available()


def apply(patches: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Install the CPU accommodations (idempotent). Returns the patches active in this process.

    First checks the installed megatron-core against the tested range and that every internal a
    patch replaces exists (``parallel/mcore_version.py``): an error there, not a wrong result."""
    if not cpu_mode_required():
        mcore_version.check_version(mcore_version.installed_version(), strict=False)
        return ()
    if patches is None:
        env = os.environ.get("RGKD_CPU_PATCHES")
        patches = tuple(p for p in env.split(",") if p) if env else ALL_PATCHES
    unknown = set(patches) - set(ALL_PATCHES)
    if unknown:
        raise ValueError(f"RGKD_CPU_PATCHES: unknown patch(es) {sorted(unknown)}; expected {ALL_PATCHES}")
    pending = tuple(name for name in patches if name not in _applied)
    if pending:
        mcore_version.check_cpu_patches(pending)
    installers = {
        "cuda_api": _patch_cuda_api,
        "device_mode": _enter_device_mode,
        "rng": _patch_rng,
        "sp_norm": _patch_sp_norm,
        "distopt_torch_adam": _patch_distopt_torch_adam,
        "grad_scale": _patch_grad_scale,
        "tp_shortcuts": cpu_shortcuts.install,
        "wgrad_accum": _install_cpu_wgrad,
    }
    for name in patches:
        if name not in _applied:
            installers[name]()
            _applied.add(name)
    return tuple(sorted(_applied))


def _install_cpu_wgrad() -> None:
    from rgkd_megatron.kernels import cpu_wgrad  # the kernels package imports the losses: lazily

    cpu_wgrad.install()


# ------------------------------------------------------------------------------------------ cuda_api
class _NullEvent:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


class _NullStream:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event or _NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _patch_cuda_api() -> None:
    c = torch.cuda
    default_stream = _NullStream()
    c.current_device = lambda: 0  # an ordinal; device_mode maps it to "cpu"
    c.synchronize = lambda device=None: None
    c.empty_cache = lambda: None
    c.set_device = lambda device: None
    c.device_count = lambda: 0
    c.memory_allocated = lambda device=None: 0
    c.max_memory_allocated = lambda device=None: 0
    c.memory_reserved = lambda device=None: 0
    c.max_memory_reserved = lambda device=None: 0
    c.reset_peak_memory_stats = lambda device=None: None
    c.Stream, c.Event = _NullStream, _NullEvent
    c.current_stream = lambda device=None: default_stream
    c.default_stream = lambda device=None: default_stream
    c.stream = lambda stream=None: contextlib.nullcontext()


# --------------------------------------------------------------------------------------- device_mode
def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


def _run_backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None) -> None:
    """torch.autograd.backward without the __torch_function__ dispatch (same engine call as
    megatron.core.pipeline_parallel.schedules.custom_backward)."""
    from torch.autograd import Variable

    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    if grad_tensors is None:
        grad_tensors = (None,) * len(tensors)
    elif isinstance(grad_tensors, torch.Tensor):
        grad_tensors = (grad_tensors,)
    grads = tuple(
        torch.ones_like(t, memory_format=torch.preserve_format) if g is None else g
        for t, g in zip(tensors, grad_tensors)
    )
    if inputs is None:
        inputs = ()
    elif isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    else:
        inputs = tuple(inputs)
    keep_graph = create_graph if retain_graph is None else retain_graph
    Variable._execution_engine.run_backward(
        tensors, grads, keep_graph, create_graph, inputs, allow_unreachable=True, accumulate_grad=True
    )


_TENSOR_BACKWARD_ARGS = ("tensors", "grad_tensors", "retain_graph", "create_graph", "inputs")
_AUTOGRAD_BACKWARD_ARGS = (
    "tensors",
    "grad_tensors",
    "retain_graph",
    "create_graph",
    "grad_variables",
    "inputs",
)


# the calls the mode rewrites whatever their arguments (the others only for device=/pin_memory=)
_SPECIAL_FUNCS = frozenset(
    (
        torch.autograd.backward,
        torch.Tensor.backward,
        torch.Tensor.cuda,
        torch.Tensor.pin_memory,
        torch.Tensor.is_pinned,
        torch.Tensor.to,
        torch.Tensor.type,
    )
)


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to CPU for every torch call made while active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # fast path (every torch call of a step comes through here): nothing to rewrite
        if func not in _SPECIAL_FUNCS and (
            not kwargs or ("device" not in kwargs and "pin_memory" not in kwargs)
        ):
            return func(*args, **kwargs) if kwargs else func(*args)
        kwargs = dict(kwargs or {})
        if func is torch.autograd.backward or func is torch.Tensor.backward:
            names = _TENSOR_BACKWARD_ARGS if func is torch.Tensor.backward else _AUTOGRAD_BACKWARD_ARGS
            call = dict(zip(names, args))
            for key, value in kwargs.items():
                call["grad_tensors" if key == "gradient" else key] = value
            call.pop("grad_variables", None)
            with self:
                return _run_backward(**call)
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if func is torch.Tensor.is_pinned:
            return False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if "pin_memory" in kwargs:
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


def plain_torch() -> contextlib.AbstractContextManager:
    """A context without the device mode (every torch call dispatched directly, ~1 us less each):
    for code that never asks for a CUDA device. A no-op context when the mode is not active."""
    if _mode is None:
        return contextlib.nullcontext()
    return torch._C.DisableTorchFunction()


def _enter_device_mode() -> None:
    global _mode
    _mode = CudaToCpuMode()
    _mode.__enter__()  # stays active for the life of the process (main thread)


# ----------------------------------------------------------------------------------------------- rng
def _patch_rng() -> None:
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mcore_random

    class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
        """Same contract as megatron's tracker, over the CPU default generator."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    def initialize_rng_tracker(
        use_te_rng_tracker=False, inference_rng_tracker=False, use_cudagraphable_rng=False, force_reset=False
    ):
        if force_reset or not mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED:
            mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
            mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    original_seed = mcore_random.model_parallel_cuda_manual_seed

    def model_parallel_cuda_manual_seed(seed, *args, **kwargs):
        torch.manual_seed(seed)  # torch.cuda.manual_seed is a silent no-op on a CPU build
        return original_seed(seed, *args, **kwargs)

    # activation recomputation (CheckpointFunction) saves/restores the CUDA RNG state around the
    # recomputed forward (tensor_parallel/random.py _get_cuda_rng_state/_set_cuda_rng_state)
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    mcore_random._set_cuda_rng_state = lambda *args, **kwargs: None
    mcore_random.initialize_rng_tracker = initialize_rng_tracker
    mcore_random.model_parallel_cuda_manual_seed = model_parallel_cuda_manual_seed
    tensor_parallel.model_parallel_cuda_manual_seed = model_parallel_cuda_manual_seed


# ------------------------------------------------------------------------------------------- sp_norm
class SequenceParallelTorchNorm:
    """torch LayerNorm/RMSNorm whose params carry ``sequence_parallel`` (like apex FusedLayerNorm),
    created in ``config.params_dtype`` like every other parameter (megatron-core's mixed-precision
    optimizer maps only half-precision params to the model's sharded state dict when it saves)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        norm_cls = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}[config.normalization]
        module = norm_cls(normalized_shape=hidden_size, eps=eps, dtype=config.params_dtype)
        for param in module.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return module


def _patch_sp_norm() -> None:
    from megatron.core.models import backends
    from megatron.core.transformer import transformer_block

    if transformer_block.LayerNormImpl is not backends.WrappedTorchNorm:
        return  # apex (or TE) norms are present and already handle sequence parallelism
    backends.LNImpl = backends.WrappedTorchNorm = SequenceParallelTorchNorm
    transformer_block.LayerNormImpl = SequenceParallelTorchNorm


# -------------------------------------------------------------------------------- distopt_torch_adam
def _patch_distopt_torch_adam() -> None:
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    original_set = cls._set_main_param_and_optimizer_states
    original_load = cls.load_state_dict

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        tensors = dict(tensors)
        if "step" not in tensors:
            group_index, order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][order]
            step = self.optimizer.state.get(main_param, {}).get("step")
            if isinstance(step, torch.Tensor):
                tensors["step"] = step.clone()
        with torch.no_grad():
            return original_set(self, model_param, tensors)

    def load_state_dict(self, state_dict):
        out = original_load(self, state_dict)
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                state = self.optimizer.state.get(param)
                if state is not None and isinstance(state.get("step"), torch.Tensor):
                    if "step" in group:
                        state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype)
                    else:
                        state["step"] = state["step"].clone()
        return out

    cls._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    cls.load_state_dict = load_state_dict


# -------------------------------------------------------------------------------------- grad_scale
def inplace_multi_tensor_scale(chunk_size: int, noop_flag: Any, tensor_lists: list, scale: float) -> None:
    """dst_i = src_i * scale for each pair of ``tensor_lists`` (megatron-core's
    ``local_multi_tensor_scale`` contract), without its temporary: ``dst.mul_(scale)`` when dst is
    src, ``dst.copy_(src)`` when scale == 1, else ``dst.copy_(src * scale)``."""
    for src, dst in zip(tensor_lists[0], tensor_lists[1]):
        if src is dst:
            dst.mul_(scale)
        elif scale == 1.0:
            dst.copy_(src)
        else:
            dst.copy_(src * scale)


def _patch_grad_scale() -> None:
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    for module in (clip_grads, optimizer):
        if module.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = inplace_multi_tensor_scale
