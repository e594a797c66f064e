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
    torch.manual_seed(seed)  # CPU-initialised weights draw from the default generator
    if groups.is_member:
        # ranks passed explicitly: megatron-core would otherwise read them from parallel_state,
        # which describes at most one (world-spanning) role
        tp_rank = groups.tp_rank
        mcore_random.model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=tp_rank)
    return groups


def teardown_roles() -> None:
    """Destroy megatron-core's global groups (tests reuse processes for several layouts)."""
    parallel_state.destroy_model_parallel()
