"""Placement as data: which ranks each role owns and how they are split (docs/design.md, roles and the scheduler).

Roles: POLICY (the student, train + generate, plus its frozen reference copy), REWARD (the reward
model or MM-PbKD's Q-function, train + score), TEACHER (live teacher: scores student rollouts,
judges with ``teacher_loglik``).

- ``colocated``: every role on every rank, time-sliced, one layout: the ``parallel`` section
  (TP x PP, DP = world / (TP * PP)). The per-role windows are ignored, so one recipe can carry
  both and switch with ``placement.mode=...``.
- ``disaggregated``: each role on its own window ``[first_rank, first_rank + num_ranks)`` with its
  own TP and PP; DP = num_ranks / (TP * PP). Rank order inside a window is megatron-core's
  (TP fastest), so a window starting at a node boundary keeps TP peers on one node.

Validation reports every problem at once, each message starting with the dotted field to change:
overlapping windows, windows outside the world, ranks in no window (unless
``placement.allow_idle_ranks``), a layout not dividing its window, heads / query groups / FFN
width / layers not divisible by the role's TP / PP (for the role's own model: the student's for
POLICY and REWARD, ``pbkd.teacher_model_config`` for TEACHER), and a role the method needs but the
placement lacks (a live teacher for MM-PbKD, the teacher_loglik judge and white-box KD, except
off-policy KD with ``pbkd.cache_path`` set, which reads the teacher top-k cache instead; a reward
model for PbKD / MM-PbKD).

Usage::

    errors = validate_placement(cfg, world_size=32)      # [] when valid
    layouts = role_layouts(cfg, world_size=32)           # {"policy": RoleLayout(...), ...}
    groups = {role: build_role_groups(layout) for role, layout in layouts.items()}  # on every rank

``role_layouts`` returns the roles in the fixed order policy, reward, teacher: group creation is
collective, so every rank must build them in the same order.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no runtime import of the config package: its loader may import this module
    from rgkd_megatron.config.pbkd import PbKDConfig
    from rgkd_megatron.config.schema import ModelConfig, RGKDConfig
    from rgkd_megatron.parallel.groups import RoleLayout

POLICY, REWARD, TEACHER = "policy", "reward", "teacher"
ROLES: tuple[str, ...] = (POLICY, REWARD, TEACHER)
KD_METHODS = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")


@dataclass(frozen=True)
class RoleWindow:
    """A placed role, resolved: its ranks and layout (a torch-free view of ``RoleLayout``)."""

    role: str
    first_rank: int
    num_ranks: int
    tp: int
    pp: int

    @property
    def dp(self) -> int:
        return self.num_ranks // (self.tp * self.pp)

    @property
    def end(self) -> int:
        return self.first_rank + self.num_ranks


# ---------------------------------------------------------------------------------------------
# What the method needs


def role_needs(pbkd: PbKDConfig) -> dict[str, str | None]:
    """For each role, why the method needs it (a sentence naming the field), or None if it does not."""
    reward = None
    if pbkd.method == "pbkd":
        reward = "pbkd.method=pbkd trains a reward model"
    elif pbkd.method == "mm_pbkd":
        reward = "pbkd.method=mm_pbkd trains a Q-function"
    teacher = None
    if pbkd.method == "mm_pbkd":
        teacher = "pbkd.method=mm_pbkd reads the live teacher's probabilities"
    elif pbkd.method in KD_METHODS and pbkd.on_policy:
        teacher = (
            f"pbkd.method={pbkd.method} with pbkd.on_policy=true reads the live teacher's probabilities "
            "on the student's samples (pbkd.cache_path holds only the teacher's responses)"
        )
    elif pbkd.method in KD_METHODS and not pbkd.cache_path:
        # off-policy KD with pbkd.cache_path set reads the teacher top-k cache instead (KDTrainer)
        teacher = f"pbkd.method={pbkd.method} reads the live teacher's probabilities"
    elif pbkd.judge == "teacher_loglik" and pbkd.method == "pbkd":
        teacher = "pbkd.judge=teacher_loglik scores pairs with the live teacher"
    return {POLICY: "the student is always trained", REWARD: reward, TEACHER: teacher}


def role_model_configs(cfg: RGKDConfig) -> tuple[dict[str, ModelConfig | None], list[str]]:
    """Each role's architecture: the student's for POLICY and REWARD (same spec, another head), the
    teacher's for TEACHER (``pbkd.teacher_model_config`` YAML, else the ``pbkd.teacher_load``
    checkpoint's; None when neither says). Returns (configs, errors)."""
    from rgkd_megatron.config.architecture import teacher_architecture

    models: dict[str, ModelConfig | None] = {POLICY: cfg.model, REWARD: cfg.model, TEACHER: None}
    errors: list[str] = []
    path = cfg.pbkd.teacher_model_config
    if path and not os.path.isfile(path):
        errors.append(f"pbkd.teacher_model_config: expected a YAML file, got {path!r} (not found)")
        return models, errors
    try:
        models[TEACHER] = teacher_architecture(cfg)
    except ValueError as exc:
        errors.append(f"pbkd.teacher_model_config: {path}: {exc}" if path else str(exc))
    return models, errors


# ---------------------------------------------------------------------------------------------
# Resolved windows


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


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Validation


def _shape_errors(
    model: ModelConfig, tp: int, pp: int, tp_field: str, pp_field: str, source: str
) -> list[str]:
    errors = []
    for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        value = getattr(model, name)
        if value is not None and value % tp:
            errors.append(f"{tp_field}: expected a divisor of {source}.{name} ({value}), got {tp}")
    if model.num_layers % pp:
        errors.append(f"{pp_field}: expected a divisor of {source}.num_layers ({model.num_layers}), got {pp}")
    return errors


def _source(role: str) -> str:
    return "the teacher's model (pbkd.teacher_model_config)" if role == TEACHER else "model"


def validate_placement(
    cfg: RGKDConfig,
    world_size: int | None = None,
    role_models: Mapping[str, ModelConfig | None] | None = None,
) -> list[str]:
    """Every problem of the ``placement`` section (and what it implies), each naming its field.

    ``role_models`` overrides the per-role architectures (default: ``role_model_configs(cfg)``,
    which reads ``pbkd.teacher_model_config``); a role whose model is None skips the shape checks.
    Without ``world_size`` the checks that need it (windows inside the world, idle ranks) are skipped.
    """
    errors: list[str] = []
    if role_models is None:
        role_models, errors = role_model_configs(cfg)
    needs = role_needs(cfg.pbkd)
    if cfg.placement.mode == "colocated":
        return errors + _validate_colocated(cfg, needs, role_models)
    return errors + _validate_disaggregated(cfg, world_size, needs, role_models)


def _validate_colocated(cfg: RGKDConfig, needs, role_models) -> list[str]:
    errors = []
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    if needs[TEACHER] and not cfg.pbkd.teacher_load:
        errors.append(f"pbkd.teacher_load: {needs[TEACHER]}, so it needs a teacher checkpoint; got null")
    teacher = role_models.get(TEACHER)
    if cfg.pbkd.teacher_load and teacher is not None and tp >= 1 and pp >= 1:
        # the student's shapes against `parallel` are checked by validate_config
        errors += _shape_errors(
            teacher,
            tp,
            pp,
            "parallel.tensor_model_parallel_size",
            "parallel.pipeline_model_parallel_size",
            _source(TEACHER),
        )
    return errors


def _validate_disaggregated(cfg: RGKDConfig, world_size, needs, role_models) -> list[str]:
    errors: list[str] = []
    pl = cfg.placement
    placed: list[RoleWindow] = []
    for role in ROLES:
        w, prefix = getattr(pl, role), f"placement.{role}"
        bad = False
        for name, low in (("first_rank", 0), ("num_ranks", 0), ("tp", 1), ("pp", 1)):
            if getattr(w, name) < low:
                errors.append(f"{prefix}.{name}: expected a value >= {low}, got {getattr(w, name)}")
                bad = True
        if bad:
            continue
        if w.num_ranks == 0:
            if needs[role]:
                errors.append(
                    f"{prefix}.num_ranks: {needs[role]}, so the role needs a window; got 0 (not placed)"
                )
            continue
        if not needs[role] and not pl.allow_idle_ranks:
            errors.append(
                f"{prefix}.num_ranks: pbkd.method={cfg.pbkd.method} (judge {cfg.pbkd.judge}) never uses the "
                f"{role} role, so its {w.num_ranks} ranks would idle; got {w.num_ranks} (set it to 0, or "
                "placement.allow_idle_ranks=true)"
            )
        if w.num_ranks % (w.tp * w.pp):
            errors.append(
                f"{prefix}.num_ranks: expected a multiple of {prefix}.tp * {prefix}.pp "
                f"({w.tp} * {w.pp} = {w.tp * w.pp}), got {w.num_ranks}"
            )
        if world_size is not None and w.first_rank + w.num_ranks > world_size:
            errors.append(
                f"{prefix}.num_ranks: window [{w.first_rank}, {w.first_rank + w.num_ranks}) of the {role} "
                f"role exceeds the world (size {world_size}: ranks 0-{world_size - 1})"
            )
        model = role_models.get(role)
        if model is not None:
            errors += _shape_errors(model, w.tp, w.pp, f"{prefix}.tp", f"{prefix}.pp", _source(role))
        elif role == TEACHER and not cfg.pbkd.teacher_model_config:
            errors.append(
                "pbkd.teacher_model_config: required when the teacher role is placed and pbkd.teacher_load "
                "describes no architecture (no config.json or model_config.yaml there); got null"
            )
        if role == TEACHER and not cfg.pbkd.teacher_load:
            errors.append("pbkd.teacher_load: required when the teacher role is placed; got null")
        if role == REWARD and cfg.pbkd.method == "mm_pbkd" and w.pp > 1:
            errors.append(
                f"{prefix}.pp: pbkd.method=mm_pbkd does not support pipeline parallelism yet; got {w.pp}"
            )
        if cfg.parallel.sequence_parallel and w.tp == 1:
            errors.append(
                f"{prefix}.tp: parallel.sequence_parallel shards over the TP group, so every role needs "
                "tp > 1; got 1"
            )
        placed.append(RoleWindow(role, w.first_rank, w.num_ranks, w.tp, w.pp))
    for i, later in enumerate(placed):
        for earlier in placed[:i]:
            lo, hi = max(later.first_rank, earlier.first_rank), min(later.end, earlier.end)
            if lo < hi:
                errors.append(
                    f"placement.{later.role}.first_rank: window [{later.first_rank}, {later.end}) of the "
                    f"{later.role} role overlaps window [{earlier.first_rank}, {earlier.end}) of the "
                    f"{earlier.role} role (shared ranks: {_ranges(list(range(lo, hi)))})"
                )
    if world_size is not None and not pl.allow_idle_ranks:
        covered = {r for w in placed for r in range(w.first_rank, w.end)}
        idle = [r for r in range(world_size) if r not in covered]
        if idle:
            errors.append(
                f"placement.allow_idle_ranks: ranks {_ranges(idle)} of the world (size {world_size}) are in "
                "no role's window; got false (resize the windows, or set it to true to leave them idle)"
            )
    return errors


def check_placement(
    cfg: RGKDConfig,
    world_size: int | None = None,
    role_models: Mapping[str, ModelConfig | None] | None = None,
) -> None:
    """``validate_placement`` raising one ValueError that lists every problem."""
    errors = validate_placement(cfg, world_size, role_models)
    if len(errors) == 1:
        raise ValueError(errors[0])
    if errors:
        raise ValueError(f"{len(errors)} placement errors:\n  " + "\n  ".join(errors))


def role_layouts(
    cfg: RGKDConfig, world_size: int, role_models: Mapping[str, ModelConfig | None] | None = None
) -> dict[str, RoleLayout]:
    """Validate the placement, then ``{role: RoleLayout}`` for ``build_role_groups``, in ROLES order."""
    from rgkd_megatron.config.loader import data_parallel_size
    from rgkd_megatron.parallel.groups import RoleLayout

    if cfg.placement.mode == "colocated":
        data_parallel_size(cfg, world_size)  # raises naming the parallel fields
    check_placement(cfg, world_size, role_models)
    return {
        w.role: RoleLayout(tp=w.tp, pp=w.pp, dp=w.dp, rank_offset=w.first_rank)
        for w in placed_windows(cfg, world_size)
    }
