"""The models of a colocated PbKD run and the inference helpers on them.

Colocated placement (docs/design.md, roles and the scheduler): policy, frozen reference policy (the initial student, for the
KL term), reward model (methods with an adversary: none for SeqKD / KD) and optional live teacher
share one layout on all ranks. Role windows with
their own layouts are the scheduler's job; everything here takes the groups explicitly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from rgkd_megatron.checkpoint.rng import capture_rng_state, restore_rng_state
from rgkd_megatron.config import RGKDConfig
from rgkd_megatron.config.architecture import teacher_architecture
from rgkd_megatron.convert.hf_load import load_backbone, load_weights
from rgkd_megatron.generation.generate import broadcast_from_last_stage, inference_mode, score, stage_forward
from rgkd_megatron.methods import POLICY, REWARD, TEACHER, get_method
from rgkd_megatron.models.builders import build_policy, build_reward_model, build_teacher, sequence_rewards
from rgkd_megatron.models.q_head import attach_q_head
from rgkd_megatron.parallel.groups import RoleGroups
from rgkd_megatron.training.engine import Engine, build_engine
from rgkd_megatron.training.setup import role_seed, seed_model_init


@dataclass
class PbKDModels:
    """The models this rank holds; a role this rank is not part of is None (disaggregated)."""

    policy: Engine | None
    reward: Engine | None
    reference: torch.nn.Module | None
    teacher: torch.nn.Module | None
    vocab_size: int
    teacher_groups: RoleGroups | None = None
    """The groups the teacher runs on (the policy's when colocated)."""


def role_parallel(cfg: RGKDConfig, groups: RoleGroups):
    """``cfg.parallel`` with the TP/PP sizes of the role's layout."""
    return replace(
        cfg.parallel,
        tensor_model_parallel_size=groups.layout.tp,
        pipeline_model_parallel_size=groups.layout.pp,
    )


def _member(groups: RoleGroups | None) -> bool:
    return groups is not None and groups.is_member


def build_pbkd_models(
    cfg: RGKDConfig, groups: RoleGroups | Mapping[str, RoleGroups], vocab_size: int
) -> PbKDModels:
    """Build the models of every role this rank is part of.

    ``groups``: one ``RoleGroups`` (colocated: every role on it) or ``{role: RoleGroups}``. Each
    role's build is seeded with ``role_seed(train.seed, role)`` so its initial weights do not depend
    on the placement (a reward model built alone on its window equals the colocated one).
    """
    by_role = (
        dict(groups) if isinstance(groups, Mapping) else dict.fromkeys((POLICY, REWARD, TEACHER), groups)
    )
    if get_method(cfg.pbkd.method).reward_head is None:  # SeqKD / KD: no reward model to build
        by_role.pop(REWARD, None)
    t, seed = cfg.train, cfg.train.seed
    policy = reward = reference = teacher = None
    pg, rg, tg = by_role.get(POLICY), by_role.get(REWARD), by_role.get(TEACHER)
    if _member(pg):
        seed_model_init(role_seed(seed, POLICY), pg)
        policy = build_policy(cfg.model, role_parallel(cfg, pg), pg, vocab_size)
        reference = build_teacher(
            cfg.model, role_parallel(cfg, pg), pg, vocab_size
        )  # frozen copy of the init
    if _member(rg):
        seed_model_init(role_seed(seed, REWARD), rg)
        reward = build_reward_model(cfg.model, role_parallel(cfg, rg), rg, vocab_size)
        reward_rng = capture_rng_state()  # the Q head (attached after loading) continues the reward's stream
    teacher_cfg = None
    if cfg.pbkd.teacher_load:
        teacher_cfg = teacher_architecture(cfg)
        if teacher_cfg is None:
            raise ValueError(
                f"pbkd.teacher_model_config: required, pbkd.teacher_load={cfg.pbkd.teacher_load} "
                "describes no architecture (no config.json or model_config.yaml)"
            )
        if _member(tg):
            seed_model_init(role_seed(seed, TEACHER), tg)
            teacher = build_teacher(teacher_cfg, role_parallel(cfg, tg), tg, vocab_size)
    # loads are collective over the world: every rank makes the same calls (None = not held here)
    if cfg.model.load:
        load_weights(cfg.model.load, policy)
        load_weights(cfg.model.load, reference)
        load_backbone(cfg.model.load, reward)
    elif policy is not None:
        reference.load_state_dict(policy.state_dict())
    if teacher_cfg is not None:
        load_weights(cfg.pbkd.teacher_load, teacher, "pbkd.teacher_load")
    policy_engine = reward_engine = None
    if policy is not None:
        par = role_parallel(cfg, pg)
        policy_engine = build_engine(
            policy, pg, cfg.optimizer, par, t.lr, t.min_lr, t.lr_warmup_iters, t.train_iters, t.lr_decay_style
        )
    if reward is not None:
        if get_method(cfg.pbkd.method).reward_head == "q":  # a Q-function: backbone + bilinear head
            restore_rng_state(reward_rng)
            attach_q_head(
                reward, cfg.pbkd.q_bound or cfg.pbkd.reward_bound
            )  # after loading: the head has no checkpoint weights
        reward_engine = build_engine(
            reward, rg, cfg.optimizer, role_parallel(cfg, rg), cfg.pbkd.rm_lr, cfg.pbkd.rm_lr, 0, t.train_iters,
            "constant",
        )  # fmt: skip
    return PbKDModels(
        policy_engine, reward_engine, reference, teacher, vocab_size, tg if teacher is not None else None
    )


def reward_scores(
    model: torch.nn.Module, groups: RoleGroups, sequences: list[list[int]], pad_id: int
) -> torch.Tensor:
    """Raw reward r(x, y) of each full sequence (value at its last token), on every rank. [b] fp32."""
    length = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)] = torch.tensor(s)
    last = torch.tensor([len(s) - 1 for s in sequences])
    rewards = None
    with inference_mode(model):
        values = stage_forward(model, groups, tokens, 0, None, gather=False)
        if groups.is_last_stage:
            rewards = sequence_rewards(values.squeeze(-1).float(), last)
    return broadcast_from_last_stage(rewards, (len(sequences),), torch.float32, groups)


def response_nlls(
    model: torch.nn.Module,
    groups: RoleGroups,
    prompts: list[list[int]],
    responses: list[list[int]],
    vocab_size: int,
) -> list[tuple[float, int]]:
    """Per response: (sum of the negative log-likelihood of its tokens given its prompt, token count)
    under ``model``; an empty response gives (0.0, 0)."""
    rows = [(i, p + r) for i, (p, r) in enumerate(zip(prompts, responses)) if r]
    out = [(0.0, 0)] * len(prompts)
    if not rows:
        return out
    logprobs = score(model, groups, [s for _, s in rows], vocab_size=vocab_size)
    for row, (i, _) in enumerate(rows):
        p, r = prompts[i], responses[i]
        out[i] = (-float(logprobs[row, len(p) - 1 : len(p) - 1 + len(r)].sum()), len(r))
    return out


def mean_nll(pairs: list[tuple[float, int]]) -> float:
    """Token-weighted mean NLL of (sum, count) pairs: sum_i s_i / sum_i n_i."""
    return sum(s for s, _ in pairs) / max(sum(n for _, n in pairs), 1)
