"""The method registry (rgkd_megatron.methods): one MethodSpec per pbkd.method, read by config
validation, placement and the plan instead of branching on names; the KD divergence registry."""

import itertools

import pytest
import torch

from rgkd_megatron.config import load_config
from rgkd_megatron.config.pbkd import PbKDConfig, validate_pbkd
from rgkd_megatron.losses import KD_KINDS, divergences, topk_kd_loss
from rgkd_megatron.methods import (
    MethodSpec,
    TeacherNeed,
    get_method,
    method_names,
    register_method,
    registered_methods,
)
from rgkd_megatron.methods.kd import kd_method
from rgkd_megatron.schedule.placement import role_needs
from rgkd_megatron.schedule.plan import PlanSpec

BUILTIN = ("pbkd", "mm_pbkd", "seqkd", "fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")
TOKEN_KD = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")


def test_builtin_methods_are_registered_in_config_order():
    assert method_names() == BUILTIN
    assert [m.name for m in registered_methods()] == list(BUILTIN)
    assert KD_KINDS == TOKEN_KD == divergences.kd_loss_names()
    assert tuple(m.name for m in registered_methods() if m.kd_loss) == KD_KINDS


def test_unknown_method_names_the_field_and_the_choices():
    with pytest.raises(ValueError, match=r"pbkd.method: expected one of \('pbkd', .*got 'distill'"):
        get_method("distill")


def test_a_name_is_registered_once_and_specs_are_checked():
    with pytest.raises(ValueError, match="already registered"):
        register_method(MethodSpec("pbkd", "again", "rgkd_megatron.pbkd.trainer:PbKDTrainer"))
    with pytest.raises(ValueError, match="needs LIVE"):
        MethodSpec("x", "x", "m:C", teacher=TeacherNeed.CACHE)
    with pytest.raises(ValueError, match="reward_head"):
        MethodSpec("x", "x", "m:C", reward_head="value")
    with pytest.raises(ValueError, match="module:Class"):
        MethodSpec("x", "x", "PbKDTrainer")


@pytest.mark.parametrize("name", BUILTIN)
def test_trainer_factory_imports_the_named_class(name):
    cls = get_method(name).trainer_class()
    expected = {"pbkd": "PbKDTrainer", "mm_pbkd": "MMPbKDTrainer", "seqkd": "SeqKDTrainer"}.get(
        name, "KDTrainer"
    )
    assert cls.__name__ == expected and hasattr(cls, "splits_policy_step")


# The branching the registry replaced (schedule/placement.py role_needs, schedule/plan.py
# PlanSpec.from_config before the registry), kept here as the reference the specs must reproduce.
def _reference_flags(p):
    adversarial = p.method in ("pbkd", "mm_pbkd")
    kd = p.method in TOKEN_KD
    cached_kd = kd and not p.on_policy and bool(p.cache_path)
    reward = {
        "pbkd": "pbkd.method=pbkd trains a reward model",
        "mm_pbkd": "pbkd.method=mm_pbkd trains a Q-function",
    }
    teacher = None
    if p.method == "mm_pbkd":
        teacher = "pbkd.method=mm_pbkd reads the live teacher's probabilities"
    elif kd and p.on_policy:
        teacher = f"pbkd.method={p.method} with pbkd.on_policy=true reads"
    elif kd and not p.cache_path:
        teacher = f"pbkd.method={p.method} reads the live teacher's probabilities"
    elif p.judge == "teacher_loglik" and p.method == "pbkd":
        teacher = "pbkd.judge=teacher_loglik scores pairs with the live teacher"
    flags = {
        "collect": adversarial,
        "teacher_judges": adversarial and p.judge == "teacher_loglik",
        "reward_model": adversarial,
        "rollouts": adversarial or (kd and p.on_policy),
        "teacher_scores": p.method == "mm_pbkd" or (kd and not cached_kd),
    }
    return reward.get(p.method), teacher, flags


@pytest.mark.parametrize(
    "method, on_policy, cache, judge",
    list(
        itertools.product(BUILTIN, (False, True), (None, "/data/cache"), ("teacher_wins", "teacher_loglik"))
    ),
)
def test_specs_reproduce_the_name_branching(method, on_policy, cache, judge):
    overrides = [f"pbkd.method={method}", f"pbkd.on_policy={str(on_policy).lower()}", f"pbkd.judge={judge}"]
    if cache:
        overrides.append(f"pbkd.cache_path={cache}")
    cfg = load_config(None, overrides, validate=False)
    reward, teacher, flags = _reference_flags(cfg.pbkd)
    needs = role_needs(cfg.pbkd)
    assert needs["reward"] == reward
    assert (needs["teacher"] is None) == (teacher is None)
    if teacher is not None:
        assert needs["teacher"].startswith(teacher)
    spec = PlanSpec.from_config(cfg)
    assert {name: getattr(spec, name) for name in flags} == flags


def test_policy_gradient_methods_need_rloo_samples():
    for name in BUILTIN:
        errors = validate_pbkd(PbKDConfig(method=name, samples_per_prompt=1, temperature=0.7))
        named = {e.split(":")[0] for e in errors}
        expected = {"pbkd.samples_per_prompt", "pbkd.temperature"} if name in ("pbkd", "mm_pbkd") else set()
        assert named == expected, name


def test_heads_and_teacher_needs():
    assert get_method("pbkd").reward_head == "scalar" and get_method("mm_pbkd").reward_head == "q"
    assert get_method("seqkd").reward_head is None and get_method("seqkd").teacher == TeacherNeed.NONE
    assert TeacherNeed.SAMPLES in get_method("pbkd").teacher
    assert not get_method("mm_pbkd").adversary_pipeline
    for name in TOKEN_KD:
        assert get_method(name).kd_loss == name and TeacherNeed.CACHE in get_method(name).teacher


@pytest.fixture
def symmetric_kl():
    """A KD divergence registered for the test only (the registry is global)."""

    @divergences.register_kd_loss("test_sym_kl", description="KL(p || q) + KL(q || p)")
    def sym_kl(log_p_tb, log_q_tb, p_tb, q_tb, **_):
        return ((p_tb - q_tb) * (log_p_tb - log_q_tb)).sum(-1)

    yield "test_sym_kl"
    divergences._KD_LOSSES.pop("test_sym_kl")


def test_a_registered_kd_loss_runs_and_makes_a_method_spec(symmetric_kl):
    torch.manual_seed(0)
    logits = torch.randn(5, 7, dtype=torch.float64)
    teacher = torch.log_softmax(torch.randn(5, 7, dtype=torch.float64), -1)
    ids = torch.arange(7).expand(5, 7)  # k = V: the tail is empty, the loss is the dense form
    mask = torch.ones(5)
    loss, _ = topk_kd_loss(logits, ids, teacher, mask, kind=symmetric_kl)
    fkl, _ = topk_kd_loss(logits, ids, teacher, mask, kind="fkl")
    rkl, _ = topk_kd_loss(logits, ids, teacher, mask, kind="rkl")
    torch.testing.assert_close(loss, fkl + rkl)
    spec = kd_method(symmetric_kl, divergences.get_kd_loss(symmetric_kl).description)
    assert spec.kd_loss == symmetric_kl and spec.trainer.endswith(":KDTrainer")
    with pytest.raises(ValueError, match="new identifier"):
        divergences.register_kd_loss(symmetric_kl)


def test_unknown_kd_kind_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"kind='nope': expected one of \('fkl', 'rkl'"):
        divergences.get_kd_loss("nope")
