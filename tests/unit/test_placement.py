"""Placement (rgkd_megatron.schedule.placement): valid placements map to the expected RoleLayouts,
every bad placement is rejected with the field to change named first."""

import re

import pytest

from rgkd_megatron.config import ModelConfig, config_to_dict, load_config
from rgkd_megatron.schedule.placement import (
    check_placement,
    placed_windows,
    role_layouts,
    role_needs,
    validate_placement,
)

# 70B -> 7B on 4 nodes: teacher TP=8 on node 0, student TP=2 x DP=8 on nodes 1-2, RM TP=2 x DP=4 on node 3
STUDENT = ModelConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32)
TEACHER = ModelConfig(
    num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64, num_query_groups=8
)
MODELS = {"policy": STUDENT, "reward": STUDENT, "teacher": TEACHER}
CLUSTER = [
    "pbkd.method=mm_pbkd",
    "pbkd.teacher_load=/ckpt/teacher",
    "placement.mode=disaggregated",
    "placement.teacher.first_rank=0",
    "placement.teacher.num_ranks=8",
    "placement.teacher.tp=8",
    "placement.policy.first_rank=8",
    "placement.policy.num_ranks=16",
    "placement.policy.tp=2",
    "placement.reward.first_rank=24",
    "placement.reward.num_ranks=8",
    "placement.reward.tp=2",
]


def _cfg(*overrides):
    return load_config(None, [*CLUSTER, *overrides], validate=False)


def _errors(*overrides, world=32, models=MODELS):
    return validate_placement(_cfg(*overrides), world, models)


def _one(errors, field, detail=""):
    hits = [e for e in errors if e.startswith(f"{field}: ") and detail in e]
    assert hits, f"no error on {field} containing {detail!r} in {errors}"
    return hits[0]


def test_cluster_placement_is_valid_and_maps_to_role_layouts():
    from rgkd_megatron.parallel.groups import RoleLayout

    assert _errors() == []
    layouts = role_layouts(_cfg(), 32, MODELS)
    assert list(layouts) == ["policy", "reward", "teacher"]  # fixed order: group creation is collective
    assert layouts == {
        "policy": RoleLayout(tp=2, pp=1, dp=8, rank_offset=8),
        "reward": RoleLayout(tp=2, pp=1, dp=4, rank_offset=24),
        "teacher": RoleLayout(tp=8, pp=1, dp=1, rank_offset=0),
    }
    for layout in layouts.values():
        layout.validate(32)


def test_colocated_maps_every_needed_role_to_the_parallel_layout():
    from rgkd_megatron.parallel.groups import RoleLayout

    cfg = load_config(None, ["parallel.tensor_model_parallel_size=2"], validate=False)
    assert role_layouts(cfg, 8) == {"policy": RoleLayout(2, 1, 4, 0), "reward": RoleLayout(2, 1, 4, 0)}
    with pytest.raises(
        ValueError, match=r"^world_size: expected a multiple of parallel.tensor_model_parallel_size"
    ):
        role_layouts(cfg, 3)
    # the teacher is placed (colocated) when it has a checkpoint
    cfg = load_config(None, ["pbkd.method=fkl", "pbkd.teacher_load=/t"], validate=False)
    assert [w.role for w in placed_windows(cfg, 4)] == ["policy", "teacher"]


def test_overlapping_windows_name_the_later_role_and_the_shared_ranks():
    message = _one(_errors("placement.reward.first_rank=20"), "placement.reward.first_rank")
    assert message == (
        "placement.reward.first_rank: window [20, 28) of the reward role overlaps window [8, 24) of the "
        "policy role (shared ranks: 20-23)"
    )


def test_idle_ranks_are_listed_unless_allowed():
    errors = _errors(world=40)
    assert errors == [
        "placement.allow_idle_ranks: ranks 32-39 of the world (size 40) are in no role's window; got false "
        "(resize the windows, or set it to true to leave them idle)"
    ]
    gap = _errors(
        "placement.policy.first_rank=10", "placement.policy.num_ranks=14", "placement.policy.tp=1", world=32
    )
    _one(gap, "placement.allow_idle_ranks", "ranks 8-9 of the world")
    assert _errors("placement.allow_idle_ranks=true", world=40) == []


def test_window_outside_the_world():
    _one(
        _errors(world=24),
        "placement.reward.num_ranks",
        "window [24, 32) of the reward role exceeds the world (size 24",
    )


def test_layout_not_dividing_its_window():
    errors = _errors(
        "placement.policy.num_ranks=14", "placement.policy.tp=4", "placement.allow_idle_ranks=true"
    )
    assert _one(errors, "placement.policy.num_ranks") == (
        "placement.policy.num_ranks: expected a multiple of placement.policy.tp * placement.policy.pp (4 * 1 = 4), got 14"
    )
    _one(_errors("placement.reward.pp=3"), "placement.reward.num_ranks", "(2 * 3 = 6), got 8")
    _one(_errors("placement.teacher.tp=0"), "placement.teacher.tp", "expected a value >= 1, got 0")


def test_model_shapes_must_divide_by_each_roles_layout():
    # student: 32 heads (MHA), 32 layers; teacher: 64 heads, 8 query groups, 80 layers
    errors = _errors("placement.policy.tp=16", "placement.policy.num_ranks=16")
    assert errors == []  # 32 heads, 11008 ffn: TP=16 divides both
    errors = _errors("placement.reward.tp=8", "placement.reward.pp=1")
    assert errors == []
    teacher_tp16 = _errors("placement.teacher.tp=16", "placement.teacher.num_ranks=16", "placement.policy.first_rank=16",
                           "placement.policy.num_ranks=8", world=32)  # fmt: skip
    assert _one(teacher_tp16, "placement.teacher.tp") == (
        "placement.teacher.tp: expected a divisor of the teacher's model (pbkd.teacher_model_config)"
        ".num_query_groups (8), got 16"
    )
    errors = _errors("placement.policy.pp=3", "placement.policy.tp=1", "placement.policy.num_ranks=15")
    _one(errors, "placement.policy.pp", "model.num_layers (32), got 3")
    odd = ModelConfig(
        num_layers=6, hidden_size=96, ffn_hidden_size=256, num_attention_heads=6, num_query_groups=3
    )
    errors = _errors(models={"policy": odd, "reward": odd, "teacher": TEACHER})
    assert (
        _one(errors, "placement.policy.tp")
        == "placement.policy.tp: expected a divisor of model.num_query_groups (3), got 2"
    )
    _one(errors, "placement.reward.tp", "model.num_query_groups (3), got 2")
    errors = _errors(
        "placement.policy.pp=4",
        "placement.policy.tp=1",
        models={"policy": odd, "reward": odd, "teacher": TEACHER},
    )
    _one(errors, "placement.policy.pp", "model.num_layers (6), got 4")


def test_teacher_shapes_come_from_the_teacher_model_config_file(tmp_path):
    path = tmp_path / "model_config.yaml"
    path.write_text(
        "model:\n  num_layers: 4\n  hidden_size: 96\n  ffn_hidden_size: 256\n  num_attention_heads: 6\n"
    )
    cfg = _cfg(f"pbkd.teacher_model_config={path}", "model.num_attention_heads=4", "model.hidden_size=64")
    errors = validate_placement(cfg, 32)
    assert errors == [
        "placement.teacher.tp: expected a divisor of the teacher's model (pbkd.teacher_model_config).num_attention_heads (6), got 8"
    ]
    missing = validate_placement(_cfg(f"pbkd.teacher_model_config={tmp_path / 'nope.yaml'}"), 32)
    _one(missing, "pbkd.teacher_model_config", "not found")
    _one(
        validate_placement(_cfg(), 32),
        "pbkd.teacher_model_config",
        "required when the teacher role is placed",
    )


def test_colocated_teacher_shapes_checked_against_the_parallel_section():
    cfg = load_config(
        None,
        ["pbkd.method=fkl", "pbkd.teacher_load=/t", "parallel.tensor_model_parallel_size=16"],
        validate=False,
    )
    errors = validate_placement(cfg, None, {"policy": STUDENT, "reward": STUDENT, "teacher": TEACHER})
    assert errors == [
        "parallel.tensor_model_parallel_size: expected a divisor of the teacher's model "
        "(pbkd.teacher_model_config).num_query_groups (8), got 16"
    ]


def test_missing_roles_the_method_needs():
    no_teacher = _errors("placement.teacher.num_ranks=0", "placement.allow_idle_ranks=true")
    assert _one(no_teacher, "placement.teacher.num_ranks") == (
        "placement.teacher.num_ranks: pbkd.method=mm_pbkd reads the live teacher's probabilities, so the role "
        "needs a window; got 0 (not placed)"
    )
    no_reward = _errors("pbkd.method=pbkd", "placement.reward.num_ranks=0", "placement.allow_idle_ranks=true")
    _one(no_reward, "placement.reward.num_ranks", "pbkd.method=pbkd trains a reward model")
    colocated = load_config(None, ["pbkd.method=rkl"], validate=False)
    assert validate_placement(colocated, 8) == [
        "pbkd.teacher_load: pbkd.method=rkl reads the live teacher's probabilities, so it needs a teacher "
        "checkpoint; got null"
    ]
    judge = load_config(None, ["pbkd.judge=teacher_loglik"], validate=False)
    _one(validate_placement(judge, 8), "pbkd.teacher_load", "pbkd.judge=teacher_loglik")
    assert role_needs(load_config(None, validate=False).pbkd)["teacher"] is None


def test_off_policy_kd_reads_the_teacher_cache_instead_of_a_live_teacher():
    # off-policy KD with pbkd.cache_path: KDTrainer reads the cached top-k, no TEACHER role needed
    cached = load_config(None, ["pbkd.method=fkl", "pbkd.cache_path=/data/cache"], validate=False)
    assert role_needs(cached.pbkd)["teacher"] is None
    assert validate_placement(cached, 8) == []
    assert [w.role for w in placed_windows(cached, 8)] == ["policy"]
    disagg = [
        "pbkd.method=fkl", "pbkd.cache_path=/data/cache", "placement.mode=disaggregated",
        "placement.policy.num_ranks=8", "placement.teacher.num_ranks=0", "placement.reward.num_ranks=0",
    ]  # fmt: skip
    assert validate_placement(load_config(None, disagg, validate=False), 8, MODELS) == []
    # a placed teacher would idle: the cache takes precedence off-policy
    _one(_errors("pbkd.method=fkl", "pbkd.cache_path=/data/cache", "placement.reward.num_ranks=0",
                 "placement.allow_idle_ranks=false"), "placement.teacher.num_ranks", "never uses the teacher")  # fmt: skip


def test_on_policy_kd_needs_the_live_teacher_even_with_a_cache():
    for extra in ([], ["pbkd.cache_path=/data/cache"]):
        cfg = load_config(None, ["pbkd.method=fkl", "pbkd.on_policy=true", *extra], validate=False)
        assert role_needs(cfg.pbkd)["teacher"] is not None
        errors = validate_placement(cfg, 8)
        assert len(errors) == 1
        _one(errors, "pbkd.teacher_load", "pbkd.method=fkl with pbkd.on_policy=true reads the live teacher")
    # MM-PbKD always scores with the live teacher (MMPbKDTrainer requires models.teacher)
    mm = load_config(None, ["pbkd.method=mm_pbkd", "pbkd.cache_path=/data/cache"], validate=False)
    _one(validate_placement(mm, 8), "pbkd.teacher_load", "pbkd.method=mm_pbkd reads the live teacher")


def test_a_placed_role_the_method_never_uses_is_idle():
    errors = _errors("pbkd.method=pbkd")  # black-box PbKD with the teacher_wins judge: no live teacher
    assert _one(errors, "placement.teacher.num_ranks").endswith(
        "never uses the teacher role, so its 8 ranks would idle; got 8 (set it to 0, or placement.allow_idle_ranks=true)"
    )
    assert _errors("pbkd.method=pbkd", "placement.allow_idle_ranks=true") == []


def test_method_specific_layout_limits():
    errors = _errors("placement.reward.pp=2", "placement.reward.tp=1")
    _one(errors, "placement.reward.pp", "mm_pbkd does not support pipeline parallelism yet; got 2")
    errors = _errors("parallel.sequence_parallel=true", "parallel.tensor_model_parallel_size=2",
                     "placement.reward.tp=1")  # fmt: skip
    _one(errors, "placement.reward.tp", "parallel.sequence_parallel")


def test_check_placement_raises_every_problem():
    with pytest.raises(ValueError) as info:
        check_placement(_cfg("placement.reward.first_rank=20", "placement.teacher.tp=3"), 32, MODELS)
    text = str(info.value)
    assert text.startswith("6 placement errors:")
    assert re.search(
        r"(?m)^  placement.teacher.num_ranks: expected a multiple of .* \(3 \* 1 = 3\), got 8$", text
    )
    for name in ("num_attention_heads \\(64\\)", "num_query_groups \\(8\\)", "ffn_hidden_size \\(28672\\)"):
        assert re.search(rf"(?m)^  placement.teacher.tp: expected a divisor of .*{name}, got 3$", text)
    assert re.search(r"(?m)^  placement.reward.first_rank: window \[20, 28\)", text)
    assert re.search(r"(?m)^  placement.allow_idle_ranks: ranks 28-31 of the world", text)


def test_sections_load_from_yaml_and_reject_unknown_keys(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "placement:\n  mode: disaggregated\n  policy: {first_rank: 0, num_ranks: 4, tp: 2}\nschedule:\n  overlap: true\n"
    )
    cfg = load_config(str(recipe), validate=False)
    assert (
        cfg.placement.policy.num_ranks,
        cfg.placement.policy.tp,
        cfg.schedule.overlap,
        cfg.schedule.staleness,
    ) == (4, 2, True, 1)
    assert config_to_dict(cfg)["placement"]["policy"] == {"first_rank": 0, "num_ranks": 4, "tp": 2, "pp": 1}
    with pytest.raises(
        ValueError, match=r"placement.policy.tpp: unknown key.*did you mean 'placement.policy.tp'"
    ):
        load_config(None, ["placement.policy.tpp=2"], validate=False)
    with pytest.raises(ValueError, match=r"placement.mode: expected one of 'colocated', 'disaggregated'"):
        load_config(None, ["placement.mode=split"], validate=False)


@pytest.mark.parametrize(("tp", "pp", "world"), [(1, 1, 1), (2, 1, 8), (1, 2, 4), (2, 2, 16), (4, 1, 4)])
def test_world_layout_and_config_agree_on_data_parallel_size(tp, pp, world):
    from rgkd_megatron.config.roles import data_parallel_size
    from rgkd_megatron.parallel.groups import layout_for_world

    cfg = load_config(
        None,
        [f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}"],
        validate=False,
    )
    expected = world // tp // pp  # the replicas of a TP x PP model in the world
    assert layout_for_world(tp, pp, world).dp == data_parallel_size(cfg, world) == expected
    with pytest.raises(ValueError, match="world size 6 is not a multiple"):
        layout_for_world(2, 2, 6)
