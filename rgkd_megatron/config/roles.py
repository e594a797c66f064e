"""What the roles need and whether the placement provides it: validation of the ``placement`` and
``schedule`` sections (docs/design.md, roles and the scheduler).

The scheduler (``schedule/placement.py``, ``schedule/plan.py``) maps a valid placement to process
group layouts and builds the plan; this module only checks, so ``validate_config`` never imports
the scheduler. What a method needs comes from its ``MethodSpec`` (``rgkd_megatron.methods``).

Validation reports every problem at once, each message starting with the dotted field to change:
overlapping windows, windows outside the world, ranks in no window (unless
``placement.allow_idle_ranks``), a layout not dividing its window, heads / query groups / FFN
width / layers not divisible by the role's TP / PP (for the role's own model: the student's for
POLICY and REWARD, ``pbkd.teacher_model_config`` for TEACHER), and a role the method needs but the
placement lacks (``MethodSpec.role_needs``).

Data-parallel size, the one place it is computed (``data_parallel_size``)::

    DP = world_size / (TP * PP)                 colocated: the ``parallel`` layout over the world
    DP = num_ranks / (tp * pp)                  disaggregated: the role's window
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rgkd_megatron.config.architecture import teacher_architecture
from rgkd_megatron.methods import POLICY, REWARD, ROLES, TEACHER, get_method

if TYPE_CHECKING:
    from rgkd_megatron.config.pbkd import PbKDConfig
    from rgkd_megatron.config.schema import ModelConfig, RGKDConfig

__all__ = [
    "RoleWindow", "check_placement", "data_parallel_size", "role_model_configs", "role_needs", "schedule_errors",
    "validate_placement", "validate_schedule", "window_data_parallel_size",
]  # fmt: skip


def window_data_parallel_size(num_ranks: int, tp: int, pp: int) -> int:
    """DP of ``num_ranks`` ranks split into TP x PP model replicas: num_ranks // (tp * pp)."""
    return num_ranks // (tp * pp)


def data_parallel_size(cfg: RGKDConfig, world_size: int | None = None, role: str = POLICY) -> int:
    """The data-parallel size of ``role``: colocated, world_size / (TP * PP) of the ``parallel``
    section (raises ValueError when the world size does not fit the layout); disaggregated, the
    role's window's (at least 1, so validation can divide by it; ``world_size`` is not needed)."""
    if cfg.placement.mode == "disaggregated":
        w = getattr(cfg.placement, role)
        return max(1, window_data_parallel_size(w.num_ranks, max(1, w.tp * w.pp), 1))
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size <= 0:
        raise ValueError(f"world_size: expected a positive int, got {world_size!r}")
    if world_size % (tp * pp):
        raise ValueError(
            f"world_size: expected a multiple of parallel.tensor_model_parallel_size * "
            f"parallel.pipeline_model_parallel_size ({tp} * {pp} = {tp * pp}), got {world_size}"
        )
    return window_data_parallel_size(world_size, tp, pp)


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
        return window_data_parallel_size(self.num_ranks, self.tp, self.pp)

    @property
    def end(self) -> int:
        return self.first_rank + self.num_ranks


def role_needs(pbkd: PbKDConfig) -> dict[str, str | None]:
    """For each role, why the method needs it (a sentence naming the field), or None if it does not."""
    return get_method(pbkd.method).role_needs(pbkd)


def role_model_configs(cfg: RGKDConfig) -> tuple[dict[str, ModelConfig | None], list[str]]:
    """Each role's architecture: the student's for POLICY and REWARD (same spec, another head), the
    teacher's for TEACHER (``pbkd.teacher_model_config`` YAML, else the ``pbkd.teacher_load``
    checkpoint's; None when neither says). Returns (configs, errors)."""
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
        if role == REWARD and not get_method(cfg.pbkd.method).adversary_pipeline and w.pp > 1:
            errors.append(
                f"{prefix}.pp: pbkd.method={cfg.pbkd.method} does not support pipeline parallelism yet; "
                f"got {w.pp}"
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


def schedule_errors(
    rounds: int, iterations_per_round: int, k_r: int, k_p: int, placement: str, overlap: bool, staleness: int
) -> list[str]:
    """Problems of the schedule fields (``pbkd.rounds`` ... ``schedule.staleness``), each naming its field."""
    errors = []
    for name, value, low in (
        ("rounds", rounds, 1), ("iterations_per_round", iterations_per_round, 1), ("k_r", k_r, 0), ("k_p", k_p, 0)
    ):  # fmt: skip
        if value < low:
            errors.append(f"pbkd.{name}: expected a value >= {low}, got {value}")
    if staleness < 0:
        errors.append(f"schedule.staleness: expected a value >= 0, got {staleness}")
    if overlap and placement == "colocated":
        errors.append(
            "schedule.overlap: expected false with placement.mode=colocated (colocated roles share "
            "their ranks and run in turn), got true"
        )
    return errors


def validate_schedule(cfg: RGKDConfig) -> list[str]:
    """Problems of the ``schedule`` section given the placement, each naming its field."""
    p = cfg.pbkd
    return schedule_errors(
        p.rounds, p.iterations_per_round, p.k_r, p.k_p, cfg.placement.mode, cfg.schedule.overlap,
        cfg.schedule.staleness,
    )  # fmt: skip
