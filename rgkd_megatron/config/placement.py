"""The ``placement`` and ``schedule`` config sections (root sections of ``RGKDConfig``).

Design:
- Plain dataclasses with a docstring under every field, like the rest of the config tree; the
  generic loader parses, type-checks and overrides them (``placement.teacher.tp=8``).
- Only value types the loader knows (int, bool, Literal, nested dataclasses): a role's window is a
  fixed sub-section per role, not a list, so every field has a dotted name for errors and overrides.
- Validation lives in ``config/roles.py``; the mapping to ``RoleLayout`` and the plan in
  ``schedule/placement.py`` and ``schedule/plan.py``.

Example (a 70B teacher on node 0, a 7B student TP=2 x DP=8 on nodes 1-2, the RM on node 3)::

    placement:
      mode: disaggregated
      teacher: {first_rank: 0, num_ranks: 8, tp: 8}
      policy: {first_rank: 8, num_ranks: 16, tp: 2}
      reward: {first_rank: 24, num_ranks: 8, tp: 2}
    schedule: {overlap: true, staleness: 1}
"""

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class RoleWindowConfig:
    """One role's window of ranks and its parallel layout (disaggregated placement only)."""

    first_rank: int = 0
    """First global rank of the role's window."""
    num_ranks: int = 0
    """Ranks in the window; 0 = the role is not placed (allowed for a role the method does not use)."""
    tp: int = 1
    """Tensor-parallel size of the role."""
    pp: int = 1
    """Pipeline-parallel size of the role; the data-parallel size is num_ranks / (tp * pp)."""


@dataclass
class PlacementConfig:
    """Where the roles (policy, reward, teacher) run: all on all ranks, or each on its own window."""

    mode: Literal["colocated", "disaggregated"] = "colocated"
    """colocated: every role on every rank, time-sliced, with the ``parallel`` layout;
    disaggregated: each role on its own window below (the windows are ignored when colocated)."""
    policy: RoleWindowConfig = field(default_factory=RoleWindowConfig)
    """POLICY role: the student (train + generate) and its frozen reference copy."""
    reward: RoleWindowConfig = field(default_factory=RoleWindowConfig)
    """REWARD role: the reward model or MM-PbKD's Q-function (train + score)."""
    teacher: RoleWindowConfig = field(default_factory=RoleWindowConfig)
    """TEACHER role: the live teacher (scores student rollouts; judges with teacher_loglik)."""
    allow_idle_ranks: bool = False
    """Accept ranks that are in no role's window, or a placed role the method never uses."""


@dataclass
class ScheduleConfig:
    """How the policy and reward steps interleave (k_r, k_p, rounds and iterations are in ``pbkd``)."""

    overlap: bool = False
    """Disaggregated placement only: run the RM step on batch t+1 while the policy step on batch t runs."""
    staleness: int = 1
    """With overlap: a policy step may score with a reward model at most this many iterations old
    (0 = no overlap: exactly the colocated order)."""
