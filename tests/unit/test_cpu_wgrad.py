"""Gradient-accumulation fusion on CPU (rgkd_megatron/kernels/cpu_wgrad.py).

- the kernel against a float64 ``main_grad + grad_output^T @ input`` (fp32, and low-precision
  activations against an fp32 buffer);
- whole engines: the DDP grad buffers after a forward/backward over two micro-batches with fusion
  (the GEMM accumulating into ``main_grad``, the word embedding's rows index-added into it) against
  the same engine without it (autograd's weight
  gradient added by megatron DDP's hook: megatron's own unfused path, the reference), for tied and
  untied embeddings; the fused engine really took the fused path (every linear weight marked
  ``grad_added_to_main_grad``) and the unfused one did not; a bf16 model and a model outside DDP
  are never switched.
"""

from __future__ import annotations

import pytest
import torch
from distributed_utils import run_distributed

VOCAB, SEQ = 200, 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_float64_accumulation(dtype):
    from rgkd_megatron.kernels.cpu_wgrad import wgrad_gemm_accum_fp32

    g = torch.Generator().manual_seed(0)
    inp = torch.randn(24, 8, generator=g).to(dtype)
    grad_out = torch.randn(24, 5, generator=g).to(dtype)
    main_grad = torch.randn(5, 8, generator=g)
    want = main_grad.double() + grad_out.double().t() @ inp.double()
    wgrad_gemm_accum_fp32(inp, grad_out, main_grad)
    tol = 1e-5 if dtype == torch.float32 else 0.1  # bf16: the product is rounded to bf16 first
    assert main_grad.dtype == torch.float32
    assert torch.allclose(main_grad.double(), want, atol=tol, rtol=0), (main_grad.double() - want).abs().max()


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=g)
    return {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": (torch.rand(2, SEQ, generator=g) > 0.3).float(),
        "position_ids": torch.arange(SEQ).expand(2, SEQ),
    }


def _engine_grads(groups, tied: bool, fused: bool, dtype: str = "fp32"):
    from megatron.core.tensor_parallel import layers

    from rgkd_megatron.config.schema import ModelConfig, OptimizerConfig, ParallelConfig
    from rgkd_megatron.kernels import cpu_wgrad
    from rgkd_megatron.models.builders import build_policy
    from rgkd_megatron.training.engine import build_engine, run_forward_backward
    from rgkd_megatron.training.objectives import make_sft_forward_step

    cfg = ModelConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
        max_position_embeddings=SEQ, init_method_std=0.1, spec="local", params_dtype=dtype,
        tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(7)
    model = build_policy(cfg, ParallelConfig(), groups, VOCAB)
    saved = layers.fused_weight_gradient_mlp_cuda
    if not fused:
        layers.fused_weight_gradient_mlp_cuda = None  # as without the patch: enable_for_ddp_model skips
    try:
        engine = build_engine(
            model, groups, OptimizerConfig(), ParallelConfig(), 1e-3, 1e-3, 0, 10, "constant"
        )
    finally:
        layers.fused_weight_gradient_mlp_cuda = saved
    linears = [
        m for m in model.modules() if isinstance(m, (layers.ColumnParallelLinear, layers.RowParallelLinear))
    ]
    switched = sum(bool(m.gradient_accumulation_fusion) for m in linears)
    for chunk in engine.model:
        chunk.zero_grad_buffer()
    run_forward_backward(
        engine, make_sft_forward_step(groups.pg_collection.tp), iter([_batch(1), _batch(2)]), 2, SEQ, 2
    )
    grads = {name: p.main_grad.detach().clone() for name, p in model.named_parameters()}
    added = {
        name: bool(p.grad_added_to_main_grad)
        for name, p in model.named_parameters()
        if name.endswith("weight")
    }
    embedding = model.embedding.word_embeddings
    return {"grads": grads, "switched": switched, "linears": len(linears), "added": added,
            "installed": cpu_wgrad.installed(), "embedding_switched": "forward" in vars(embedding),
            "zero_out_wgrad": getattr(embedding.weight, "zero_out_wgrad", None)}  # fmt: skip


def _body(rank, world_size):
    from rgkd_megatron.kernels import cpu_wgrad
    from rgkd_megatron.models.builders import build_policy
    from rgkd_megatron.parallel.groups import layout_for_world
    from rgkd_megatron.training.setup import init_role, teardown_roles

    groups = init_role(layout_for_world(1, 1, 1), seed=5)
    out = {}
    for tied in (True, False):
        fused, plain = _engine_grads(groups, tied, True), _engine_grads(groups, tied, False)
        out[tied] = {
            "installed": fused["installed"],
            "switched": (fused["switched"], plain["switched"], fused["linears"]),
            "fused_added": fused["added"],
            "embedding_switched": (fused["embedding_switched"], plain["embedding_switched"]),
            "zero_out_wgrad": (fused["zero_out_wgrad"], plain["zero_out_wgrad"]),
            "plain_added": plain["added"],
            "max_diff": max(
                (fused["grads"][n] - plain["grads"][n]).abs().max().item() for n in plain["grads"]
            ),
            "scale": max(g.abs().max().item() for g in plain["grads"].values()),
            "names": sorted(plain["grads"]),
        }
    out["bf16_switched"] = _engine_grads(groups, True, True, dtype="bf16")["switched"]
    from rgkd_megatron.config.schema import ModelConfig, ParallelConfig

    raw = build_policy(
        ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, spec="local",
                    params_dtype="fp32", max_position_embeddings=SEQ),
        ParallelConfig(), groups, VOCAB,
    )  # fmt: skip

    class NotDdp(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    out["raw_switched"] = cpu_wgrad.enable_for_ddp_model(NotDdp(raw))  # no main_grad: never switched
    teardown_roles()
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_body, 1)[0]


@pytest.mark.parametrize("tied", [True, False])
def test_fused_engine_gradients_equal_megatrons_unfused_path(results, tied):
    r = results[tied]
    assert r["installed"], "the wgrad_accum CPU patch is active in a default process"
    fused_switched, plain_switched, linears = r["switched"]
    assert fused_switched == linears > 0 and plain_switched == 0, r["switched"]
    assert r["embedding_switched"] == (True, False), r["embedding_switched"]
    # tied: megatron's zero placeholder is kept on the unfused path only
    assert r["zero_out_wgrad"] == ((False, True) if tied else (False, None)), r["zero_out_wgrad"]
    linear_weights = [n for n in r["fused_added"] if "linear_" in n or "output_layer" in n or "word_emb" in n]
    assert linear_weights and all(r["fused_added"][n] for n in linear_weights), r["fused_added"]
    assert not any(r["plain_added"].values()), r["plain_added"]
    assert r["scale"] > 1e-3, r
    assert r["max_diff"] <= 1e-6 * max(1.0, r["scale"]), r


def test_bf16_models_and_models_outside_ddp_are_not_switched(results):
    assert results["bf16_switched"] == 0
    assert results["raw_switched"] == 0
