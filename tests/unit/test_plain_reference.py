"""Our megatron-core policy against an independent plain PyTorch Llama (benchmarks/plain_llama.py).

One gloo process, TP=1, fp32: with the megatron weights copied over by ``load_from_mcore`` the plain
model must give the same logits and per-token cross-entropy (GQA + tied embeddings, MHA, untied
embeddings with another RoPE base), and one training step through our engine must match one plain
AdamW step with the same hyper-parameters. This validates both our model and the weight mapping
the step-overhead benchmark relies on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from distributed_utils import run_distributed

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

VOCAB = 200
SEQ = 16
CASES = {  # name: ModelConfig overrides
    "gqa_tied": {"num_query_groups": 2},
    "mha_tied": {"num_query_groups": None},
    "gqa_untied_base5e5": {"num_query_groups": 2, "tie_word_embeddings": False, "rotary_base": 500000.0},
}


def _model_cfg(**overrides):
    from rgkd_megatron.config.schema import ModelConfig

    base = dict(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        max_position_embeddings=SEQ,
        # std 0.1, not 0.02: with tiny weights attention is near-uniform and a wrong RoPE (base,
        # rotation) would move the logits by only ~4e-4; at 0.1 it moves them by ~0.2
        init_method_std=0.1,
        spec="local",
        params_dtype="fp32",
    )
    return ModelConfig(**{**base, **overrides})


def _batch(seed: int, rows: int = 2):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (rows, SEQ + 1), generator=g)
    return {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": (torch.rand(rows, SEQ, generator=g) > 0.3).float(),
        "position_ids": torch.arange(SEQ).expand(rows, SEQ),
    }


def _plain_copy(model, model_cfg):
    from plain_llama import PlainConfig, PlainLlama, load_from_mcore

    padded = model.embedding.word_embeddings.weight.shape[0]
    plain = PlainLlama(PlainConfig.from_model_config(model_cfg, padded))
    load_from_mcore(plain, model.state_dict())
    return plain


def _body(rank, world_size):
    import torch.nn.functional as F
    from plain_llama import adamw_param_groups, plain_train_step

    from rgkd_megatron.config.schema import OptimizerConfig, ParallelConfig
    from rgkd_megatron.models.builders import build_policy
    from rgkd_megatron.parallel.groups import layout_for_world
    from rgkd_megatron.training.engine import build_engine, train_step
    from rgkd_megatron.training.objectives import make_sft_forward_step
    from rgkd_megatron.training.setup import init_role, teardown_roles

    groups = init_role(layout_for_world(1, 1, 1), seed=5)
    parallel_cfg = ParallelConfig()
    out = {}
    for name, overrides in CASES.items():
        model_cfg = _model_cfg(**overrides)
        model = build_policy(model_cfg, parallel_cfg, groups, VOCAB)
        plain = _plain_copy(model, model_cfg)
        batch = _batch(1)
        with torch.no_grad():
            logits = model(batch["tokens"], batch["position_ids"], None)
            loss_bs = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            ref = plain(batch["tokens"])
        ref_ce = F.cross_entropy(ref.flatten(0, 1), batch["labels"].flatten(), reduction="none")
        out[name] = {
            "shapes": (tuple(logits.shape), tuple(ref.shape)),
            "logit_err": (logits - ref).abs().max().item(),
            "logit_scale": ref.abs().max().item(),
            "ce_err": (loss_bs - ref_ce.view_as(loss_bs)).abs().max().item(),
        }
        if name == "gqa_tied":  # one training step: engine vs plain AdamW, same hyper-parameters
            # adam_eps well above float noise (Adam turns a 1e-9 gradient difference into a full step)
            opt_cfg = OptimizerConfig(weight_decay=0.1, clip_grad=0.5, adam_eps=1e-4)
            engine = build_engine(model, groups, opt_cfg, parallel_cfg, 1e-2, 1e-2, 0, 10, "constant")
            optimizer = torch.optim.AdamW(
                adamw_param_groups(plain, opt_cfg.weight_decay),
                lr=1e-2,
                betas=(opt_cfg.adam_beta1, opt_cfg.adam_beta2),
                eps=opt_cfg.adam_eps,
            )
            mbs = [_batch(2), _batch(3)]
            before = [p.detach().clone() for p in plain.parameters()]
            metrics = train_step(
                engine, make_sft_forward_step(groups.pg_collection.tp), iter(mbs), len(mbs), SEQ, 2
            )
            plain_loss = plain_train_step(plain, optimizer, mbs, opt_cfg.clip_grad)
            stepped = _plain_copy(model, model_cfg)
            out["step"] = {
                "loss": (metrics["lm_loss"], plain_loss),
                "weight_err": max(
                    (p - q).abs().max().item() for p, q in zip(plain.parameters(), stepped.parameters())
                ),
                "moved": max((p - q).abs().max().item() for p, q in zip(plain.parameters(), before)),
            }
    teardown_roles()
    return out


def test_policy_matches_plain_pytorch_llama():
    result = run_distributed(_body, 1)[0]
    for name in CASES:
        r = result[name]
        assert r["shapes"] == ((2, SEQ, 256), (2, SEQ, 256)), (name, r)
        assert r["logit_scale"] > 1e-2, (name, r)  # not a trivially zero output
        assert r["logit_err"] <= 1e-5, (name, r)
        assert r["ce_err"] <= 1e-5, (name, r)
    step = result["step"]
    assert abs(step["loss"][0] - step["loss"][1]) <= 1e-5, step
    assert step["moved"] > 1e-3, step
    assert step["weight_err"] <= 1e-5, step
