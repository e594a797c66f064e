"""Write a megatron-core distributed checkpoint one tensor chunk at a time.

``dist_checkpointing.save`` normally needs every tensor in memory (its async writer stages all of
them before writing). Here the sharded state dict comes from a *meta-device* model (keys, global
shapes, dtypes, replicas: exactly what megatron-core would save) and each chunk's data is produced
only when PyTorch Distributed Checkpoint's serial writer asks for it (``SavePlanner.resolve_data``),
written, and dropped. Per-layer tensors are separate chunks (one per layer, and gate/up separately
for SwiGLU), so the peak memory is about one layer's largest tensor, whatever the model size.

Everything else is megatron-core's own save path (``dist_checkpointing.save``: validation, common
state, ``metadata.json``; ``MCoreSavePlanner`` and the MCore -> PyTorch sharded-tensor translation),
so the result is a regular ``torch_dist`` checkpoint that ``load_model_weights`` reads at any TP/PP.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner
from torch.distributed.checkpoint.planner import WriteItemType

from rgkd_megatron.checkpoint.writer import InProcessTorchDistSaveStrategy, disk_errors
from rgkd_megatron.utils.progress import ProgressBar

__all__ = ["Resolver", "save_lazily"]

Resolver = Callable[[str, tuple[int, ...], tuple[int, ...]], torch.Tensor]
"""(checkpoint key, global offset of the chunk, chunk shape) -> the chunk's data."""


class _LazyPlanner(MCoreSavePlanner):
    def __init__(self, resolve: Resolver, desc: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self._resolve = resolve
        self._desc = desc
        self.bar: ProgressBar | None = None

    def finish_plan(self, new_plan):
        plan = super().finish_plan(new_plan)
        total = sum(1 for item in plan.items if item.type != WriteItemType.BYTE_IO)
        self.bar = ProgressBar(total=total, desc=self._desc, unit="tensor")
        return plan

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        fqn = write_item.index.fqn
        offset = tuple(int(x) for x in write_item.index.offset)
        sizes = tuple(int(x) for x in write_item.tensor_data.chunk.sizes)
        tensor = self._resolve(fqn, offset, sizes)
        expected_dtype = write_item.tensor_data.properties.dtype
        if tuple(tensor.shape) != sizes or tensor.dtype != expected_dtype:
            raise AssertionError(
                f"{fqn} at {offset}: resolved {tuple(tensor.shape)} {tensor.dtype}, "
                f"planned {sizes} {expected_dtype}"
            )
        if self.bar is not None:
            self.bar.update(1, MB=round(tensor.numel() * tensor.element_size() / 1e6, 1))
        return tensor.contiguous()


class _LazyTorchDistSaveStrategy(InProcessTorchDistSaveStrategy):
    """The ``torch_dist`` format, written synchronously by the serial (lazy) DCP file writer."""

    def __init__(self, resolve: Resolver, desc: str) -> None:
        super().__init__()
        self._resolve = resolve
        self._desc = desc
        self._planner: _LazyPlanner | None = None

    def make_planner(self) -> _LazyPlanner:
        self._planner = _LazyPlanner(
            self._resolve, self._desc, dedup_replicated_tensors=False, flatten_state_dict=False
        )
        return self._planner

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        try:
            super().save(sharded_state_dict, checkpoint_dir)
        finally:
            if self._planner is not None and self._planner.bar is not None:
                self._planner.bar.close()


def save_lazily(
    sharded_state_dict: dict, checkpoint_dir: str | os.PathLike, resolve: Resolver, desc: str = "write"
) -> None:
    """Save ``sharded_state_dict`` (meta tensors) with data from ``resolve``, one chunk at a time.
    Needs a (single-process) torch.distributed group."""
    with disk_errors(checkpoint_dir):
        dist_checkpointing.save(
            sharded_state_dict,
            str(checkpoint_dir),
            sharded_strategy=_LazyTorchDistSaveStrategy(resolve, desc),
        )
