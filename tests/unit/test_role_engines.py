"""The trainer hierarchy: baselines derive from DistillTrainer (the policy engine, data, evaluation)
and not from PbKDTrainer, so they have no judge, preference store or RM step."""

from __future__ import annotations

from rgkd_megatron.pbkd.distill import DistillTrainer
from rgkd_megatron.pbkd.kd import KDTrainer
from rgkd_megatron.pbkd.mm import MMPbKDTrainer
from rgkd_megatron.pbkd.seqkd import SeqKDTrainer
from rgkd_megatron.pbkd.trainer import PbKDTrainer

GAME_METHODS = (
    "rm_step",
    "collect_round",
    "judge_round",
    "score_rollout",
    "receive_round",
    "remember_rollout",
)


def test_baselines_do_not_inherit_the_game():
    for cls in (SeqKDTrainer, KDTrainer):
        assert issubclass(cls, DistillTrainer) and not issubclass(cls, PbKDTrainer), cls
        assert [m for m in GAME_METHODS if hasattr(cls, m)] == [], cls
        assert not cls.splits_policy_step and not cls.reports_reward_gap


def test_game_methods_and_their_flags():
    assert issubclass(MMPbKDTrainer, PbKDTrainer)
    assert all(hasattr(PbKDTrainer, m) for m in GAME_METHODS)
    assert PbKDTrainer.splits_policy_step and PbKDTrainer.reports_reward_gap
    assert not MMPbKDTrainer.splits_policy_step and not MMPbKDTrainer.reports_reward_gap
