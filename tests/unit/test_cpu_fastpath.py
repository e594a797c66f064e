"""CPU fast paths (rgkd_megatron/models/cpu_fastpath.py) against megatron-core's own code paths.

- ``SdpaDotProductAttention`` against megatron-core's ``DotProductAttention`` (the reference: its
  explicit baddbmm / masked softmax / bmm) with the same inputs: causal training shapes (outputs and
  input gradients), a KV-cache decode step (sq = 1), no mask, and a case it must hand back to
  megatron (an explicit attention mask).
- the batch-major output layer: the per-token cross-entropy of the logits our forward returns (hooks
  active) against megatron's own loss path (``labels=``, where the hooks stand aside and megatron
  reads the [s, b, V] logits), values and weight gradients.
- the spec choice: the SDPA attention only without CUDA.
"""

from __future__ import annotations

import functools

import torch
from distributed_utils import run_distributed


def _attention_pair(groups, num_query_groups: int, causal: bool = True):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from rgkd_megatron.config.schema import ModelConfig, ParallelConfig
    from rgkd_megatron.models.builders import transformer_config
    from rgkd_megatron.models.cpu_fastpath import SdpaDotProductAttention

    model_cfg = ModelConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=num_query_groups,
        spec="local",
        params_dtype="fp32",
    )
    config = transformer_config(model_cfg, ParallelConfig())
    kw = dict(
        config=config,
        layer_number=1,
        attn_mask_type=AttnMaskType.causal if causal else AttnMaskType.no_mask,
        attention_type="self",
        pg_collection=groups.pg_collection,
    )
    return DotProductAttention(**kw), SdpaDotProductAttention(**kw)


def _qkv(sq: int, sk: int, b: int, heads: int, groups: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, b, heads, 16, generator=g, requires_grad=True)
    k = torch.randn(sk, b, groups, 16, generator=g, requires_grad=True)
    v = torch.randn(sk, b, groups, 16, generator=g, requires_grad=True)
    return q, k, v


def _attention_cases(groups) -> dict:
    out = {}
    for ng in (2, 4):  # GQA and MHA
        ref, ours = _attention_pair(groups, ng)
        # training shapes: causal, sq == sk; outputs and gradients wrt q, k, v
        q, k, v = _qkv(12, 12, 3, 4, ng, seed=ng)
        got = ours(q, k, v, None)
        grads_got = torch.autograd.grad(got.pow(2).sum(), (q, k, v))
        want = ref(q, k, v, None)
        grads_want = torch.autograd.grad(want.pow(2).sum(), (q, k, v))
        out[f"train_ng{ng}"] = (got - want).abs().max().item()
        out[f"train_grad_ng{ng}"] = max((a - b).abs().max().item() for a, b in zip(grads_got, grads_want))
        out[f"shape_ng{ng}"] = tuple(got.shape) == tuple(want.shape) == (12, 3, 64)
        # a decode step: one query over a cache of 9 keys (megatron: no mask for sq == 1)
        with torch.no_grad():
            q, k, v = _qkv(1, 9, 2, 4, ng, seed=10 + ng)
            out[f"decode_ng{ng}"] = (ours(q, k, v, None) - ref(q, k, v, None)).abs().max().item()
            q, k, v = _qkv(5, 7, 2, 4, ng, seed=20 + ng)
            ref_nomask, ours_nomask = _attention_pair(groups, ng, causal=False)
            out[f"nomask_ng{ng}"] = (
                (ours_nomask(q, k, v, None) - ref_nomask(q, k, v, None)).abs().max().item()
            )
            # an explicit mask tensor (True = masked out): handed to megatron's implementation
            q, k, v = _qkv(6, 6, 2, 4, ng, seed=30 + ng)
            mask = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(ng)) > 0.6
            mask[..., 0] = False
            out[f"mask_ng{ng}"] = (ours(q, k, v, mask) - ref(q, k, v, mask)).abs().max().item()
    return out


def test_sdpa_attention_matches_megatron_dot_product_attention():
    out = _results()
    for ng in (2, 4):
        assert out[f"shape_ng{ng}"]
        for case in ("train", "train_grad", "decode", "nomask"):
            assert out[f"{case}_ng{ng}"] < 1e-5, (case, ng, out)
        assert out[f"mask_ng{ng}"] == 0.0, out  # the same code ran


def _output_layer_cases(groups) -> dict:
    import torch.nn.functional as F

    from rgkd_megatron.config.schema import ModelConfig, ParallelConfig
    from rgkd_megatron.models.builders import build_policy

    out = {}
    for tied in (True, False):
        cfg = ModelConfig(
            num_layers=1, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, max_position_embeddings=10,
            tie_word_embeddings=tied, init_method_std=0.1, spec="local", params_dtype="fp32",
        )  # fmt: skip
        model = build_policy(cfg, ParallelConfig(), groups, 256)
        g = torch.Generator().manual_seed(7)
        tokens = torch.randint(0, 256, (3, 10), generator=g)
        labels = torch.randint(0, 256, (3, 10), generator=g)
        pos = torch.arange(10).expand(3, 10)
        params = [p for p in model.parameters() if p.requires_grad]

        logits_bsv = model(tokens, pos, None)  # hooks active
        ours = F.cross_entropy(logits_bsv.flatten(0, 1), labels.flatten(), reduction="none").view(3, 10)
        grads_ours = torch.autograd.grad(ours.sum(), params)
        ref = model(tokens, pos, None, labels=labels)  # megatron's loss on the [s, b, V] logits
        grads_ref = torch.autograd.grad(ref.sum(), params)
        out[f"contiguous_{tied}"] = logits_bsv.is_contiguous() and tuple(logits_bsv.shape) == (3, 10, 256)
        out[f"loss_{tied}"] = (ours - ref).abs().max().item()
        out[f"grad_{tied}"] = max((a - b).abs().max().item() for a, b in zip(grads_ours, grads_ref))
    return out


def _body(rank, world_size):
    from rgkd_megatron.parallel.groups import layout_for_world
    from rgkd_megatron.training.setup import init_role, teardown_roles

    groups = init_role(layout_for_world(1, 1, 1), seed=3)
    out = {**_attention_cases(groups), **_output_layer_cases(groups)}
    teardown_roles()
    return out


@functools.cache
def _results() -> dict:
    """One gloo process for both comparisons (a process start costs more than the cases)."""
    return run_distributed(_body, 1)[0]


def test_batch_major_output_layer_matches_megatron_loss_path():
    out = _results()
    for tied in (True, False):
        assert out[f"contiguous_{tied}"], out
        assert out[f"loss_{tied}"] < 1e-5, out
        assert out[f"grad_{tied}"] < 1e-5, out


def test_sdpa_attention_only_without_cuda(monkeypatch):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from rgkd_megatron.models import specs
    from rgkd_megatron.models.cpu_fastpath import SdpaDotProductAttention

    def core(cuda: bool):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        return specs.gpt_layer_spec("local").submodules.self_attention.submodules.core_attention

    assert core(False) is SdpaDotProductAttention
    assert core(True) is DotProductAttention
