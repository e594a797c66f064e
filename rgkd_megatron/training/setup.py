"""Bring up one role on the current process group: CPU accommodations, groups, seeds."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import random as mcore_random

from rgkd_megatron.parallel import cpu_compat
from rgkd_megatron.parallel.groups import RoleGroups, RoleLayout, build_role_groups


def init_role(layout: RoleLayout, seed: int) -> RoleGroups:
    """Create the role's groups (collective) and seed its RNGs (TP-aware, as megatron does)."""
    cpu_compat.apply()
    groups = build_role_groups(layout)
    seed_model_init(seed, groups)
    return groups


def seed_model_init(seed: int, groups: RoleGroups) -> None:
    """Seed the generators a model build draws from: the default one (CPU-initialised weights) and
    megatron-core's model-parallel tracker (TP-aware). Calling it before each role's build makes a
    role's initial weights independent of which other roles this rank builds (placement)."""
    torch.manual_seed(seed)
    if groups.is_member:
        # ranks passed explicitly: megatron-core would otherwise read them from parallel_state,
        # which describes at most one (world-spanning) role
        tp_rank = groups.tp_rank
        mcore_random.model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=tp_rank)


ROLE_SEED_OFFSETS = {"policy": 0, "reward": 7919, "teacher": 15838}
"""Added to train.seed before building a role's models (policy keeps train.seed itself)."""


def role_seed(seed: int, role: str) -> int:
    return seed + ROLE_SEED_OFFSETS[role]


def teardown_roles() -> None:
    """Destroy megatron-core's global groups (tests reuse processes for several layouts)."""
    parallel_state.destroy_model_parallel()
