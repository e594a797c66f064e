"""A role's training engine: megatron-core DDP model, Megatron optimizer, LR schedule, one step.

``build_engine`` wraps a freshly built model in megatron-core ``DistributedDataParallel`` and
builds the optimizer (plain or distributed) with the role's process groups passed explicitly.
``train_step`` runs megatron-core's forward/backward schedule (no pipelining, or 1F1B when PP > 1),
``finalize_model_grads`` (DP all-reduce, SP norm grads, tied-embedding grads across PP stages;
grads scaled by 1/total tokens), clipping, the optimizer step and the LR schedule.

Objectives plug in as ``forward_step(data_iterator, model) -> (output, loss_func)`` where
``loss_func(output) -> (loss_sum, num_tokens, {name: tensor([sum, count])})``: the reported metrics
are exact global means over micro-batches and DP ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.pipeline_parallel.schedules import (
    forward_backward_no_pipelining,
    forward_backward_pipelining_without_interleaving,
)

from rgkd_megatron.kernels import cpu_wgrad
from rgkd_megatron.kernels.selection import engine_selection, log_kernel_selection, resolve_optimizer_impl
from rgkd_megatron.parallel.groups import RoleGroups


@dataclass
class Engine:
    """Everything one trainable role needs to take a step."""

    model: list[DistributedDataParallel]
    optimizer: Any
    scheduler: OptimizerParamScheduler
    groups: RoleGroups

    @property
    def config(self):
        return self.model[0].config

    def unwrapped(self) -> torch.nn.Module:
        return self.model[0].module


@contextlib.contextmanager
def _world_collectives_on(window: dist.ProcessGroup | None) -> Iterator[None]:
    """Run megatron-core code that calls ``torch.distributed.all_gather_object`` on the default
    (world) group on the role's window instead. ``get_megatron_optimizer`` aligns optimizer param
    groups across "all ranks" that way; with roles on disjoint windows, all ranks of the *model* are
    the window's, and the other windows are busy with their own roles (a world call would deadlock
    or mix roles). ``window=None``: the role spans the world, nothing to redirect."""
    if window is None:
        yield
        return
    original = dist.all_gather_object

    def on_window(object_list: list, obj: Any, group: Any = None) -> None:
        if group is not None:
            return original(object_list, obj, group=group)
        local: list = [None] * dist.get_world_size(window)
        original(local, obj, group=window)
        object_list[:] = local + [obj] * (len(object_list) - len(local))

    dist.all_gather_object = on_window
    try:
        yield
    finally:
        dist.all_gather_object = original


def build_engine(
    model: torch.nn.Module,
    groups: RoleGroups,
    optimizer_cfg: Any,
    parallel_cfg: Any,
    lr: float,
    min_lr: float,
    warmup_iters: int,
    decay_iters: int,
    decay_style: str,
) -> Engine:
    """Wrap ``model`` in megatron-core DDP and build its optimizer and LR schedule."""
    config = model.config
    pg = groups.pg_collection
    resolve_optimizer_impl(getattr(optimizer_cfg, "impl", "auto"))  # ValueError before any allocation
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel_cfg.overlap_grad_reduce,
        overlap_param_gather=parallel_cfg.overlap_param_gather,
        use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    ddp_model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model, pg_collection=pg)
    # CPU, fp32: weight gradients accumulated into the DDP buffer by the GEMM (kernels/cpu_wgrad.py)
    wgrad_fused_on_cpu = cpu_wgrad.enable_for_ddp_model(ddp_model) > 0
    config.finalize_model_grads_func = finalize_model_grads  # REQUIRED: SP norm + tied-embedding grads
    if parallel_cfg.overlap_grad_reduce:
        config.no_sync_func = ddp_model.no_sync
        config.grad_sync_func = ddp_model.start_grad_sync
    opt_config = OptimizerConfig(
        optimizer=optimizer_cfg.name,
        lr=lr,
        min_lr=min_lr,
        weight_decay=optimizer_cfg.weight_decay,
        adam_beta1=optimizer_cfg.adam_beta1,
        adam_beta2=optimizer_cfg.adam_beta2,
        adam_eps=optimizer_cfg.adam_eps,
        clip_grad=optimizer_cfg.clip_grad,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
        overlap_param_gather=parallel_cfg.overlap_param_gather,
    )
    with _world_collectives_on(groups.window_group):
        optimizer = get_megatron_optimizer(
            opt_config, [ddp_model], use_gloo_process_groups=False, pg_collection=pg
        )
    # one INFO line: spec, optimizer class actually built, dtype, fp8, recompute, kd kernel, overlap
    selection = engine_selection(model, optimizer, ddp_config)
    if wgrad_fused_on_cpu:
        selection = dataclasses.replace(selection, fusions=(*selection.fusions, "wgrad_accum_cpu"))
    log_kernel_selection(selection)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup_iters > 0 else lr,
        max_lr=lr,
        min_lr=min_lr,
        lr_warmup_steps=warmup_iters,
        lr_decay_steps=max(decay_iters, warmup_iters + 1),
        lr_decay_style=decay_style,
        start_wd=optimizer_cfg.weight_decay,
        end_wd=optimizer_cfg.weight_decay,
        wd_incr_steps=max(decay_iters, 1),
        wd_incr_style="constant",
    )
    return Engine([ddp_model], optimizer, scheduler, groups)


def _forward_backward_func(groups: RoleGroups) -> Callable:
    if groups.layout.pp > 1:
        return forward_backward_pipelining_without_interleaving
    return forward_backward_no_pipelining


def run_forward_backward(
    engine: Engine,
    forward_step: Callable,
    data_iterator: Iterator,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
) -> dict[str, float]:
    """One forward(/backward) pass over ``num_microbatches``; returns globally reduced metric means."""
    pg = engine.groups.pg_collection
    p2p = P2PCommunicator(pp_group=pg.pp, config=engine.config) if engine.groups.layout.pp > 1 else None
    losses = _forward_backward_func(engine.groups)(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=engine.model if engine.groups.layout.pp > 1 else engine.model[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        p2p_communicator=p2p,
        pg_collection=pg,
    )
    return reduce_metrics(losses, engine.groups)


def train_step(
    engine: Engine,
    forward_step: Callable,
    data_iterator: Iterator,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
) -> dict[str, float]:
    """Zero grads, forward/backward over the micro-batches, optimizer step, LR step."""
    for chunk in engine.model:
        chunk.zero_grad_buffer()
    engine.optimizer.zero_grad()
    metrics = run_forward_backward(
        engine, forward_step, data_iterator, num_microbatches, seq_length, micro_batch_size
    )
    update_ok, grad_norm, _ = engine.optimizer.step()
    if update_ok:
        engine.scheduler.step(increment=1)
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    metrics["lr"] = engine.optimizer.param_groups[0]["lr"]
    metrics["update_skipped"] = float(not update_ok)
    return metrics


def reduce_metrics(per_microbatch: list[dict], groups: RoleGroups) -> dict[str, float]:
    """Sum the [sum, count] pairs over micro-batches and DP ranks; share with every PP stage."""
    pg = groups.pg_collection
    names = sorted(per_microbatch[0]) if per_microbatch else []
    # every stage must agree on the metric names; the last stage knows them
    obj = [names]
    if groups.layout.pp > 1:
        dist.broadcast_object_list(obj, src=dist.get_global_rank(pg.pp, groups.layout.pp - 1), group=pg.pp)
    names = obj[0]
    totals = torch.zeros(len(names), 2, dtype=torch.float64)
    for item in per_microbatch:
        for i, name in enumerate(names):
            totals[i] += item[name].detach().to(torch.float64).reshape(2)
    if groups.layout.pp > 1:
        dist.broadcast(totals, src=dist.get_global_rank(pg.pp, groups.layout.pp - 1), group=pg.pp)
    dist.all_reduce(totals, group=pg.dp)
    return {name: (totals[i, 0] / totals[i, 1].clamp(min=1)).item() for i, name in enumerate(names)}


def metric_pair(total: torch.Tensor, count: torch.Tensor | float) -> torch.Tensor:
    """A [sum, count] pair for ``reduce_metrics`` (detached clone: the schedule edits losses in place)."""
    return torch.stack(
        [total.detach().clone().double().reshape(()), torch.as_tensor(count, dtype=torch.float64)]
    )
