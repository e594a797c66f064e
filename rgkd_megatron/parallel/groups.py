"""Process groups per role: a role owns a window of ranks with its own TP/PP/DP layout.

Design (docs/design.md, roles and the scheduler): nothing here assumes one model per job. A ``RoleLayout`` says which
ranks a role owns and how they are split; ``build_role_groups`` turns it into a megatron-core
``ProcessGroupCollection`` that every model, loss and optimizer of that role receives explicitly.

- A role spanning the whole world (the colocated placement, and the single-model jobs of today)
  is built through ``parallel_state.initialize_model_parallel`` so the megatron-core code paths
  that still read its globals (RNG seeding, the pipeline schedules' defaults, dist_checkpointing)
  see exactly the same groups as the ones we pass around.
- A role on a sub-window of ranks is built with ``HyperCommGrid`` (rank_offset = window start).
  Group creation is collective over the whole world, so every rank builds every role's groups,
  including those of roles it is not part of (it then gets ``None`` groups and ``is_member=False``).

Rank order inside a window follows megatron-core's default ``tp-cp-dp-pp`` (TP fastest), so
TP peers are neighbouring ranks, i.e. on the same node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.hyper_comm_grid import HyperCommGrid
from megatron.core.process_groups_config import ProcessGroupCollection

from rgkd_megatron.config.roles import window_data_parallel_size

_DIM_NAMES = ["tp", "cp", "dp", "pp"]


@dataclass(frozen=True)
class RoleLayout:
    """Where a role lives and how it is split."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    dp: int = 1
    """Data-parallel size."""
    rank_offset: int = 0
    """First global rank of the role's window."""

    @property
    def size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def ranks(self) -> range:
        return range(self.rank_offset, self.rank_offset + self.size)

    def validate(self, world_size: int, name: str = "role") -> None:
        for field_name in ("tp", "pp", "dp"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}.{field_name}: expected a positive int, got {value!r}")
        if self.rank_offset < 0 or self.rank_offset + self.size > world_size:
            raise ValueError(
                f"{name}: window [{self.rank_offset}, {self.rank_offset + self.size}) "
                f"(tp={self.tp} x pp={self.pp} x dp={self.dp}) does not fit in world size {world_size}"
            )


@dataclass
class RoleGroups:
    """The groups of one role, as seen from this rank."""

    layout: RoleLayout
    pg_collection: ProcessGroupCollection | None
    """None on ranks outside the role's window."""
    is_member: bool
    window_group: dist.ProcessGroup | None = None
    """All ranks of the role's window (None when the role spans the world: the default group)."""

    def _rank(self, group_name: str) -> int:
        if not self.is_member:
            raise RuntimeError("this rank is not part of the role's window")
        return dist.get_rank(getattr(self.pg_collection, group_name))

    @property
    def tp_rank(self) -> int:
        return self._rank("tp")

    @property
    def pp_rank(self) -> int:
        return self._rank("pp")

    @property
    def dp_rank(self) -> int:
        return self._rank("dp")

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1


def layout_for_world(tp: int, pp: int, world_size: int) -> RoleLayout:
    """The layout of a role spanning all ``world_size`` ranks (DP from
    ``config.roles.window_data_parallel_size``, the one place it is computed)."""
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size {world_size} is not a multiple of tensor_model_parallel_size * "
            f"pipeline_model_parallel_size = {tp} * {pp}"
        )
    return RoleLayout(tp=tp, pp=pp, dp=window_data_parallel_size(world_size, tp, pp))


def build_role_groups(layout: RoleLayout, timeout_minutes: int = 30) -> RoleGroups:
    """Create (collectively, on every rank of the world) the process groups of one role."""
    world_size = dist.get_world_size()
    layout.validate(world_size)
    if layout.rank_offset == 0 and layout.size == world_size:
        return _build_world_role(layout, timeout_minutes)
    return _build_window_role(layout)


def _build_world_role(layout: RoleLayout, timeout_minutes: int) -> RoleGroups:
    if parallel_state.model_parallel_is_initialized():
        current = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
        )
        if current != (layout.tp, layout.pp):
            raise RuntimeError(
                f"megatron-core parallel state already initialised with (tp, pp) = {current}; "
                f"a second world-spanning role needs the same layout, got {(layout.tp, layout.pp)}"
            )
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            distributed_timeout_minutes=timeout_minutes,
            create_gloo_process_groups=True,
        )
    return RoleGroups(layout, ProcessGroupCollection.use_mpu_process_groups(), is_member=True)


def _build_window_role(layout: RoleLayout) -> RoleGroups:
    # not a group: the scratch allocator megatron's local attention takes its matmul buffer from
    if parallel_state._GLOBAL_MEMORY_BUFFER is None:
        parallel_state._set_global_memory_buffer()
    grid = HyperCommGrid([layout.tp, 1, layout.dp, layout.pp], _DIM_NAMES, rank_offset=layout.rank_offset)
    groups = {
        "tp": grid.create_pg("tp"),
        "cp": grid.create_pg("cp"),
        "dp": grid.create_pg("dp"),
        "pp": grid.create_pg("pp"),
        "mp": grid.create_pg(["tp", "pp"]),
        "tp_cp": grid.create_pg(["tp", "cp"]),
        "dp_cp": grid.create_pg(["cp", "dp"]),
        "tp_dp_cp": grid.create_pg(["tp", "cp", "dp"]),
    }
    window = grid.create_pg(["tp", "cp", "dp", "pp"])
    pp_enum = grid.get_rank_enum("pp")
    embd_enum = [sorted({r[0], r[-1]}) for r in pp_enum]
    groups["embd"], _ = dist.new_subgroups_by_enumeration(embd_enum)
    groups["pos_embd"], _ = dist.new_subgroups_by_enumeration([[r[0]] for r in pp_enum])
    is_member = dist.get_rank() in layout.ranks
    if not is_member:
        return RoleGroups(layout, None, is_member=False, window_group=window)
    collection = ProcessGroupCollection(
        **groups,
        intra_dp_cp=groups["dp_cp"],
        # No expert parallelism: the expert groups coincide with the dense ones.
        ep=groups["cp"],
        expt_tp=groups["tp"],
        tp_ep=groups["tp"],
        tp_ep_pp=groups["mp"],
        expt_dp=groups["dp"],
        intra_expt_dp=groups["dp"],
    )
    return RoleGroups(layout, collection, is_member=True, window_group=window)
