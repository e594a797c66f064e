"""The PbKD reward model must separate teacher from student by content only.

With the student equal to the teacher and both sides sampled the same way, fresh (teacher, student)
pairs are exchangeable, so any reward model trained by the game scores the teacher side higher on
about half of them. The control re-creates the old shortcut (an EOS only the teacher side has): the
same training must then separate the sides almost always, which shows the RM does learn and that
the first assertion is not vacuous.
"""

from __future__ import annotations

import math
from pathlib import Path

from distributed_utils import run_distributed

REPO = Path(__file__).resolve().parents[2]
FRESH_PAIRS = 64
RM_STEPS = 30


def _fresh_pair_accuracy(rank, world_size, run_dir, teacher_extra_eos):
    import numpy as np
    import torch

    from rgkd_megatron.config import load_config
    from rgkd_megatron.data.tokenizer import load_tokenizer
    from rgkd_megatron.parallel.groups import layout_for_world
    from rgkd_megatron.pbkd.prompts import load_prompt_set, split_prompts
    from rgkd_megatron.pbkd.roles import build_pbkd_models
    from rgkd_megatron.pbkd.trainer import PbKDTrainer
    from rgkd_megatron.training.setup import init_role

    cfg = load_config(
        str(REPO / "examples" / "tiny_pbkd.yaml"),
        [f"pbkd.prompts_path={REPO}/examples/data/tiny_sft.jsonl",
         f"data.tokenizer={REPO}/examples/tokenizer/tokenizer.json", f"logging.run_dir={run_dir}",
         "pbkd.max_new_tokens=12", "pbkd.pairs_per_round=16", "pbkd.prompts_per_step=8",
         "pbkd.rm_lr=1e-3", "pbkd.rm_magnitude_coef=0.0"],
    )  # fmt: skip
    groups = init_role(layout_for_world(1, 1, world_size), cfg.train.seed)
    tok = load_tokenizer(cfg.data.tokenizer)
    items = load_prompt_set(cfg.pbkd.prompts_path, tok, cfg.data.seq_length // 2, cfg.data.seq_length // 2)
    train, heldout = split_prompts(items, cfg.pbkd.heldout_fraction, cfg.pbkd.heldout_seed)
    models = build_pbkd_models(cfg, groups, tok.vocab_size)
    trainer = PbKDTrainer(cfg, models, tok, train, heldout, run_dir)
    eos = (tok.eos_id,) if teacher_extra_eos else ()

    def teacher_side(chosen, seed):  # the "teacher" is the student itself, sampled at the same T=1
        out = trainer._sample([list(i.prompt_ids) for i in chosen], seed)
        return [tuple(r) + eos for r in out.response_ids()]

    trainer.teacher_samples = {
        i.prompt_id: [a, b] for i, a, b in zip(train, teacher_side(train, 101), teacher_side(train, 102))
    }
    trainer.game_items = list(train)
    trainer.sample_round(1)
    trainer.judge_round(1)
    for _ in range(RM_STEPS):
        trainer.remember_rollout(trainer.rollout(1))  # fresh student samples, as the game feeds them
        trainer.policy_steps += 1  # new rollout seeds; the student is never updated (it stays the teacher)
        trainer.rm_step(1)
    rng = np.random.default_rng(7)
    fresh = [items[i] for i in rng.choice(len(items), FRESH_PAIRS, replace=False)]
    prompts = [list(i.prompt_ids) for i in fresh]
    student = trainer._sample(prompts, 9001).response_ids()
    teacher = teacher_side(fresh, 9002)
    r_teacher = trainer.score_rollout([p + list(t) for p, t in zip(prompts, teacher)])
    r_student = trainer.score_rollout([p + list(s) for p, s in zip(prompts, student)])
    wins = (r_teacher > r_student).float() + 0.5 * (r_teacher == r_student).float()
    return float(wins.mean()), float(torch.as_tensor(r_teacher).std())


def test_rm_cannot_separate_a_student_equal_to_the_teacher(tmp_path):
    accuracy, spread = run_distributed(_fresh_pair_accuracy, 1, args=(str(tmp_path / "same"), False))[0]
    assert spread > 0, "the reward model gives every response the same score: the check would be vacuous"
    three_sigma = 3 * math.sqrt(0.25 / FRESH_PAIRS)
    assert abs(accuracy - 0.5) <= three_sigma, (accuracy, three_sigma)


def test_rm_learns_a_one_sided_eos_shortcut(tmp_path):
    accuracy, _ = run_distributed(_fresh_pair_accuracy, 1, args=(str(tmp_path / "eos"), True))[0]
    assert accuracy >= 0.9, accuracy
