"""The lean CPU decode forward (rgkd_megatron/generation/lean_decode.py) against megatron-core.

References: megatron's own ``GPTModel.forward`` on the whole prefix without a KV cache (the logits
of every prefill and decode position), and ``generate(decode_path="megatron")`` (megatron's
``StaticInferenceContext`` path) for greedy and sampled tokens and their log-probs. Two models:
GQA with tied embeddings and a QKV bias; MHA, untied, with RoPE scaling. Also: ``generate`` really
takes the lean path by default on one rank, and the cases it must leave to megatron are refused
with a reason.
"""

from __future__ import annotations

import functools

import pytest
import torch
from distributed_utils import run_distributed

VOCAB = 250
MODELS = {
    "gqa_tied_qkv_bias": dict(num_query_groups=2, tie_word_embeddings=True, add_qkv_bias=True),
    "mha_untied_rope_scaling": dict(num_query_groups=4, tie_word_embeddings=False, rotary_scaling_factor=8.0),
}


def _model(groups, overrides: dict, dtype: str = "fp32"):
    from rgkd_megatron.config.schema import ModelConfig, ParallelConfig
    from rgkd_megatron.models.builders import build_policy

    cfg = ModelConfig(
        num_layers=3, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, max_position_embeddings=64,
        make_vocab_size_divisible_by=64, init_method_std=0.1, spec="local", params_dtype=dtype, **overrides,
    )  # fmt: skip
    torch.manual_seed(11)
    model = build_policy(cfg, ParallelConfig(), groups, VOCAB)
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    assert bool(biases) == bool(overrides.get("add_qkv_bias")), [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        for p in biases:  # megatron initialises biases to zero: make them count
            p.normal_(0.0, 0.5)
    return model


def _against_full_forward(model) -> float:
    """Max |lean - megatron full-prefix forward| over the logits of a prefill and 12 decode steps."""
    from rgkd_megatron.generation.lean_decode import LeanDecoder

    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (3, 17), generator=g)
    prefill = 5
    model.eval()
    with torch.no_grad():
        full = model(tokens, torch.arange(17).expand(3, 17), None)  # [b, s, V], no cache
    lean = LeanDecoder(model, 3, 17)
    worst = (lean.forward(tokens[:, :prefill], 0)[:, 0] - full[:, prefill - 1]).abs().max().item()
    for pos in range(prefill, 17):
        step = lean.forward(tokens[:, pos : pos + 1], pos)[:, 0]
        worst = max(worst, (step - full[:, pos]).abs().max().item())
    return worst


def _generations(model, groups) -> dict:
    from rgkd_megatron.generation import generate, lean_decode

    prompts = [[5, 17, 33], [100, 2, 7, 9, 41, 8, 77], [200], [3, 3, 3, 3]]
    calls = []
    original = lean_decode.LeanDecoder.forward

    def counting(self, tokens, start):
        calls.append(tokens.shape)
        return original(self, tokens, start)

    lean_decode.LeanDecoder.forward = counting
    out = {}
    try:
        for name, kw in (("greedy", dict(temperature=0.0)), ("sampled", dict(temperature=1.0, top_p=0.9))):
            runs = {}
            for path in ("auto", "megatron"):
                before = len(calls)
                o = generate(model, groups, prompts, max_new_tokens=12, eos_id=None, pad_id=0, seed=7,
                             vocab_size=VOCAB, decode_path=path, **kw)  # fmt: skip
                runs[path] = (o.responses, o.logprobs, o.steps, len(calls) - before)
            out[name] = runs
    finally:
        lean_decode.LeanDecoder.forward = original
    return out


def _refusals(model, groups) -> dict:
    from rgkd_megatron.generation import generate
    from rgkd_megatron.generation.lean_decode import LeanDecoder, lean_decode_unsupported

    out = {"supported": lean_decode_unsupported(model, 1, 1), "tp2": lean_decode_unsupported(model, 2, 1)}
    out["pp2"] = lean_decode_unsupported(model, 1, 2)
    model.config.multi_latent_attention = True
    out["mla"] = lean_decode_unsupported(model, 1, 1)
    model.config.multi_latent_attention = False
    layer = model.decoder.layers[1]
    norm = layer.input_layernorm
    from megatron.core.transformer.identity_op import IdentityOp

    layer.input_layernorm = IdentityOp()  # as when Transformer Engine fuses the norm into linear_qkv
    out["fused_norm"] = lean_decode_unsupported(model, 1, 1)
    layer.input_layernorm = norm
    lean = LeanDecoder(model, 2, 8)
    lean.forward(torch.tensor([[1, 2, 3], [4, 5, 6]]), 0)
    for name, args in (
        ("skip", (torch.tensor([[1], [2]]), 4)),
        ("multi", (torch.tensor([[1, 2], [3, 4]]), 3)),
    ):
        try:
            lean.forward(*args)
            out[f"bad_{name}"] = None
        except ValueError as e:
            out[f"bad_{name}"] = str(e)
    try:
        generate(model, groups, [[1, 2]], max_new_tokens=2, eos_id=None, pad_id=0, seed=1, vocab_size=VOCAB,
                 decode_path="lean")  # fmt: skip
        out["bad_path"] = None
    except ValueError as e:
        out["bad_path"] = str(e)
    return out


def _body(rank, world_size):
    from rgkd_megatron.generation.lean_decode import lean_decode_unsupported
    from rgkd_megatron.parallel.groups import layout_for_world
    from rgkd_megatron.training.setup import init_role, teardown_roles

    groups = init_role(layout_for_world(world_size, 1, world_size), seed=3)
    out = {}
    for name, overrides in MODELS.items():
        model = _model(groups, overrides)
        out[name] = {"full_forward_diff": _against_full_forward(model), "gen": _generations(model, groups)}
    out["refusals"] = _refusals(_model(groups, MODELS["gqa_tied_qkv_bias"]), groups)
    out["refusals"]["bf16"] = lean_decode_unsupported(_model(groups, {}, dtype="bf16"), 1, 1)
    teardown_roles()
    return out


@functools.cache
def _results() -> dict:
    return run_distributed(_body, 1)[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_match_megatron_full_forward_at_prefill_and_every_decode_step(name):
    assert _results()[name]["full_forward_diff"] < 2e-5, _results()[name]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_generate_lean_equals_megatron_static_cache(name, mode):
    runs = _results()[name]["gen"][mode]
    (lean_ids, lean_logp, lean_steps, lean_calls), (mc_ids, mc_logp, mc_steps, mc_calls) = (
        runs["auto"],
        runs["megatron"],
    )
    assert lean_calls == lean_steps > 0, "generate on one fp32 CPU rank takes the lean path"
    assert mc_calls == 0 and mc_steps == lean_steps, "decode_path='megatron' never uses it"
    assert torch.equal(lean_ids, mc_ids)
    assert torch.allclose(lean_logp, mc_logp, atol=1e-5, rtol=0), (lean_logp - mc_logp).abs().max()


def test_unsupported_cases_are_refused_with_a_reason():
    r = _results()["refusals"]
    assert r["supported"] is None, r
    assert "tp=2" in r["tp2"] and "pp=2" in r["pp2"], r
    assert "multi_latent_attention" in r["mla"], r
    assert "input_layernorm" in r["fused_norm"] and "decoder layer 2" in r["fused_norm"], r
    assert "fp32" in r["bf16"], r
    assert "[4, 5) after 3 cached" in r["bad_skip"], r
    assert "[3, 5) after 3 cached" in r["bad_multi"], r
    assert "decode_path='lean'" in r["bad_path"], r
