"""Role engines and method trainers: the baselines are a DistillTrainer with the policy engine only
(no judge, preference store, reward engine or RM step, and no reward model built); PbKD adds the reward engine, the judge and
the store; the engines serve sampling and reward scoring on the trainer's models."""

from __future__ import annotations

from pathlib import Path

from distributed_utils import run_distributed

REPO = Path(__file__).resolve().parents[2]
GAME_ONLY = ("store", "judge", "reward", "rm_step", "judge_round", "score_rollout", "rm_pool", "rm_steps")


def _build(rank, world_size, run_dir):
    from dataclasses import replace

    import torch

    from rgkd_megatron.config import load_config
    from rgkd_megatron.data.tokenizer import load_tokenizer
    from rgkd_megatron.parallel.groups import layout_for_world
    from rgkd_megatron.pbkd.engines import PolicyEngine, RewardEngine
    from rgkd_megatron.pbkd.prompts import load_prompt_set, split_prompts
    from rgkd_megatron.pbkd.roles import build_pbkd_models
    from rgkd_megatron.pbkd.seqkd import SeqKDTrainer
    from rgkd_megatron.pbkd.trainer import PbKDTrainer
    from rgkd_megatron.training.setup import init_role

    cfg = load_config(
        str(REPO / "examples" / "tiny_pbkd.yaml"),
        [f"pbkd.prompts_path={REPO}/examples/data/tiny_sft.jsonl",
         f"data.tokenizer={REPO}/examples/tokenizer/tokenizer.json", f"logging.run_dir={run_dir}",
         "pbkd.max_new_tokens=8"],
    )  # fmt: skip
    groups = init_role(layout_for_world(1, 1, world_size), cfg.train.seed)
    tok = load_tokenizer(cfg.data.tokenizer)
    items = load_prompt_set(cfg.pbkd.prompts_path, tok, cfg.data.seq_length // 2, cfg.data.seq_length // 2)
    train, heldout = split_prompts(items, cfg.pbkd.heldout_fraction, cfg.pbkd.heldout_seed)
    models = build_pbkd_models(cfg, groups, tok.vocab_size)
    seqkd_models = build_pbkd_models(
        replace(cfg, pbkd=replace(cfg.pbkd, method="seqkd")), groups, tok.vocab_size
    )
    seqkd = SeqKDTrainer(cfg, seqkd_models, tok, train, heldout, f"{run_dir}/seqkd")
    pbkd = PbKDTrainer(cfg, models, tok, train, heldout, f"{run_dir}/pbkd")
    prompts = [list(i.prompt_ids) for i in train[:3]]
    out = pbkd.policy.generate(prompts, seed=5)
    sequences = [p + r for p, r in zip(prompts, out.response_ids())]
    return {
        "seqkd_has": [name for name in GAME_ONLY if hasattr(seqkd, name)],
        "seqkd_state": sorted(seqkd.state_dict()),
        "seqkd_policy": isinstance(seqkd.policy, PolicyEngine) and seqkd.teacher is None,
        "seqkd_models": (seqkd_models.policy is not None, seqkd_models.reward, seqkd_models.teacher),
        "pbkd_models": (models.policy is not None, models.reward is not None),
        "pbkd_engines": isinstance(pbkd.policy, PolicyEngine) and isinstance(pbkd.reward, RewardEngine),
        "pbkd_judge": pbkd.judge.name,
        "same_samples": out.response_ids() == seqkd._sample(prompts, seed=5).response_ids(),
        "rewards_bounded": bool((pbkd.score_rollout(sequences).abs() <= cfg.pbkd.reward_bound).all()),
        "rewards_shape": tuple(pbkd.reward.rewards(sequences).shape),
        "ref_shape": tuple(pbkd.policy.reference_logprobs(sequences).shape),
        "max_len": max(len(s) for s in sequences),
        "float": pbkd.reward.rewards(sequences).dtype == torch.float32,
    }


def test_baselines_carry_only_the_policy_engine_and_pbkd_adds_the_game(tmp_path):
    got = run_distributed(_build, 1, args=(str(tmp_path),))[0]
    assert got["seqkd_has"] == [], got["seqkd_has"]
    assert got["seqkd_state"] == ["policy_steps"]
    assert got["seqkd_policy"] and got["pbkd_engines"]
    assert got["seqkd_models"] == (True, None, None)  # SeqKD builds no reward model (nor a teacher)
    assert got["pbkd_models"] == (True, True)
    assert got["pbkd_judge"] == "teacher_wins"
    assert got["same_samples"] and got["rewards_bounded"] and got["float"]
    assert got["rewards_shape"] == (3,) and got["ref_shape"] == (3, got["max_len"] - 1)
    assert not (tmp_path / "seqkd" / "preferences.jsonl").exists()
