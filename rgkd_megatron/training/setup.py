"""Bring up one role on the current process group: CPU accommodations, groups, seeds."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import random as mcore_random

from rgkd_megatron.parallel import cpu_compat
from rgkd_megatron.parallel.groups import RoleGroups, RoleLayout, build_role_groups


def init_role(layout: RoleLayout, seed: int) -> RoleGroups:
    """Create the role's groups (collective) and seed its RNGs (TP-aware, as megatron does)."""
    cpu_compat.apply()
    groups = build_role_groups(layout)
    torch.manual_seed(seed)  # CPU-initialised weights draw from the default generator
    if groups.is_member and groups.layout.size == dist.get_world_size():
        # megatron-core's seeding reads parallel_state for the TP/PP/EP ranks (world-spanning roles)
        mcore_random.model_parallel_cuda_manual_seed(seed)
    return groups


def teardown_roles() -> None:
    """Destroy megatron-core's global groups (tests reuse processes for several layouts)."""
    parallel_state.destroy_model_parallel()
