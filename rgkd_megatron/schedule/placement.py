"""Placement as data: which ranks each role owns and how they are split (docs/design.md, roles and the scheduler).

Roles: POLICY (the student, train + generate, plus its frozen reference copy), REWARD (the reward
model or MM-PbKD's Q-function, train + score), TEACHER (live teacher: scores student rollouts,
judges with ``teacher_loglik``). Which roles a method needs is its ``MethodSpec``'s answer
(``rgkd_megatron.methods``).

- ``colocated``: every role on every rank, time-sliced, one layout: the ``parallel`` section
  (TP x PP, DP = world / (TP * PP)). The per-role windows are ignored, so one recipe can carry
  both and switch with ``placement.mode=...``.
- ``disaggregated``: each role on its own window ``[first_rank, first_rank + num_ranks)`` with its
  own TP and PP; DP = num_ranks / (TP * PP). Rank order inside a window is megatron-core's
  (TP fastest), so a window starting at a node boundary keeps TP peers on one node.

Validation (``validate_placement``, ``check_placement``, ``role_needs``, ``role_model_configs``)
lives with the config, in ``config/roles.py``, and is re-exported here; this module resolves a
valid placement into windows and ``RoleLayout``s.

Usage::

    errors = validate_placement(cfg, world_size=32)      # [] when valid
    layouts = role_layouts(cfg, world_size=32)           # {"policy": RoleLayout(...), ...}
    groups = {role: build_role_groups(layout) for role, layout in layouts.items()}  # on every rank

``role_layouts`` returns the roles in the fixed order policy, reward, teacher: group creation is
collective, so every rank must build them in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from rgkd_megatron.config.roles import (
    RoleWindow,
    check_placement,
    data_parallel_size,
    role_model_configs,
    role_needs,
    validate_placement,
)
from rgkd_megatron.methods import POLICY, REWARD, ROLES, TEACHER

if TYPE_CHECKING:
    from rgkd_megatron.config.schema import ModelConfig, RGKDConfig
    from rgkd_megatron.parallel.groups import RoleLayout

__all__ = [
    "POLICY", "REWARD", "ROLES", "TEACHER", "RoleWindow", "check_placement", "disaggregated_world_size",
    "placed_windows", "role_layouts", "role_model_configs", "role_needs", "validate_placement",
]  # fmt: skip


def placed_windows(cfg: RGKDConfig, world_size: int) -> list[RoleWindow]:
    """The placed roles with their windows (colocated: every needed role on all ranks).

    Assumes a valid placement (see ``validate_placement``). In colocated mode the teacher is placed
    when ``pbkd.teacher_load`` is set, the reward model when the method trains one.
    """
    needs = role_needs(cfg.pbkd)
    if cfg.placement.mode == "colocated":
        tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
        present = {POLICY: True, REWARD: needs[REWARD] is not None, TEACHER: bool(cfg.pbkd.teacher_load)}
        return [RoleWindow(r, 0, world_size, tp, pp) for r in ROLES if present[r]]
    windows = []
    for role in ROLES:
        w = getattr(cfg.placement, role)
        if w.num_ranks > 0:
            windows.append(RoleWindow(role, w.first_rank, w.num_ranks, w.tp, w.pp))
    return windows


def disaggregated_world_size(cfg: RGKDConfig) -> int:
    """The smallest world holding every window (the end of the last window)."""
    ends = [getattr(cfg.placement, r).first_rank + getattr(cfg.placement, r).num_ranks for r in ROLES]
    return max(ends)


def role_layouts(
    cfg: RGKDConfig, world_size: int, role_models: Mapping[str, ModelConfig | None] | None = None
) -> dict[str, RoleLayout]:
    """Validate the placement, then ``{role: RoleLayout}`` for ``build_role_groups``, in ROLES order."""
    from rgkd_megatron.parallel.groups import RoleLayout

    if cfg.placement.mode == "colocated":
        data_parallel_size(cfg, world_size)  # raises naming the parallel fields
    check_placement(cfg, world_size, role_models)
    return {
        w.role: RoleLayout(tp=w.tp, pp=w.pp, dp=w.dp, rank_offset=w.first_rank)
        for w in placed_windows(cfg, world_size)
    }
