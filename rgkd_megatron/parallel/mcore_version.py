"""Which megatron-core releases this toolkit is tested with, and a start-up check of both.

The package declares a range (``setup.py``: ``megatron-core>=TESTED_MIN,<NEXT_UNTESTED``) instead of
a pin, so it installs into a container that already has a megatron-core. CI runs the distributed
equivalence tests on both ends of the range (``scripts/test.sh``). What can go silently wrong on an
untested release is the CPU compatibility layer (``parallel/cpu_compat.py``), which replaces a few
megatron-core internals by name; so on CPU:

- a version outside ``[TESTED_MIN, TESTED_MAX]`` is refused with a message naming both ends
  (``RGKD_ALLOW_UNTESTED_MCORE=1`` turns the refusal into a warning);
- every internal a CPU patch replaces or relies on must exist (``PATCH_TARGETS``); a missing one
  is an error naming the patch, the attribute and the installed version, instead of a wrong result.

On GPU nothing is patched, and an untested version only warns.
"""

from __future__ import annotations

import importlib
import os
import warnings

from packaging.version import Version

from rgkd_megatron.parallel import cpu_shortcuts

TESTED_MIN = "0.16.1"  # the newest release with a wheel for Python 3.11
TESTED_MAX = "0.19.2"  # the newest release tested (built from its sdist on Python 3.11)
ALLOW_ENV = "RGKD_ALLOW_UNTESTED_MCORE"

# patch name (cpu_compat.ALL_PATCHES) -> the "module:attribute" names it replaces or calls
PATCH_TARGETS: dict[str, tuple[str, ...]] = {
    "cuda_api": (),
    "device_mode": (),
    "rng": (
        "megatron.core.tensor_parallel.random:CudaRNGStatesTracker",
        "megatron.core.tensor_parallel.random:_MODEL_PARALLEL_RNG_TRACKER_NAME",
        "megatron.core.tensor_parallel.random:_CUDA_RNG_STATE_TRACKER_INITIALIZED",
        "megatron.core.tensor_parallel.random:_get_cuda_rng_state",
        "megatron.core.tensor_parallel.random:_set_cuda_rng_state",
        "megatron.core.tensor_parallel.random:initialize_rng_tracker",
        "megatron.core.tensor_parallel.random:model_parallel_cuda_manual_seed",
        "megatron.core.tensor_parallel:model_parallel_cuda_manual_seed",
    ),
    "sp_norm": (
        "megatron.core.models.backends:WrappedTorchNorm",
        "megatron.core.models.backends:LNImpl",
        "megatron.core.transformer.transformer_block:LayerNormImpl",
    ),
    "distopt_torch_adam": (
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer._set_main_param_and_optimizer_states",
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.load_state_dict",
    ),
    "grad_scale": (
        "megatron.core.utils:local_multi_tensor_scale",
        "megatron.core.optimizer.clip_grads:multi_tensor_scale_impl",
        "megatron.core.optimizer.optimizer:multi_tensor_scale_impl",
    ),
    "tp_shortcuts": cpu_shortcuts.LINEAR_TARGETS
    + cpu_shortcuts.TP_REGION_TARGETS
    + cpu_shortcuts.VIEWLESS_TARGETS,
    "wgrad_accum": (
        "megatron.core.tensor_parallel.layers:LinearWithGradAccumulationAndAsyncCommunication.backward",
        "megatron.core.tensor_parallel.layers:prepare_input_tensors_for_wgrad_compute",
    ),
}

_warned: set[str] = set()


def installed_version() -> str:
    """The version string of the importable megatron-core."""
    import megatron.core

    return str(megatron.core.__version__)


def check_version(version: str, strict: bool, allow_untested: bool | None = None) -> bool:
    """Is ``version`` inside ``[TESTED_MIN, TESTED_MAX]``? Outside it: raise when ``strict`` (the CPU
    path) unless allowed by ``RGKD_ALLOW_UNTESTED_MCORE=1``, else warn once. Returns True when tested."""
    if allow_untested is None:
        allow_untested = os.environ.get(ALLOW_ENV, "0") == "1"
    # a build from source may carry a local label ("0.19.2+abc1234"); the release is what was tested
    if Version(TESTED_MIN) <= Version(Version(version).public) <= Version(TESTED_MAX):
        return True
    message = (
        f"megatron-core {version} is outside the range this release of rgkd_megatron is tested with "
        f"({TESTED_MIN} to {TESTED_MAX})"
    )
    if strict and not allow_untested:
        raise RuntimeError(
            f"{message}: the CPU compatibility layer replaces megatron-core internals by name and could "
            f"give wrong results. Install a tested version (pip install 'megatron-core>={TESTED_MIN},"
            f"<={TESTED_MAX}') or set {ALLOW_ENV}=1 to run anyway."
        )
    if version not in _warned:
        _warned.add(version)
        warnings.warn(message, stacklevel=2)
    return False


def _resolve(target: str) -> None:
    module_name, _, attr_path = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in attr_path.split("."):
        obj = getattr(obj, part)


def missing_patch_targets(patches: tuple[str, ...]) -> list[str]:
    """``"patch: module:attribute"`` for every internal the given CPU patches need that is absent."""
    missing = []
    for patch in patches:
        for target in PATCH_TARGETS[patch]:
            try:
                _resolve(target)
            except (ImportError, AttributeError):
                missing.append(f"{patch}: {target}")
    return missing


def check_cpu_patches(patches: tuple[str, ...], version: str | None = None) -> None:
    """Refuse to patch a megatron-core whose internals do not match what the patches expect."""
    version = version or installed_version()
    check_version(version, strict=True)
    missing = missing_patch_targets(patches)
    if missing:
        raise RuntimeError(
            f"megatron-core {version}: the CPU compatibility layer cannot apply; missing internals: "
            + "; ".join(missing)
            + f" (tested with {TESTED_MIN} to {TESTED_MAX})"
        )
