"""CPU shortcuts past megatron-core's autograd wrappers (rgkd_megatron/parallel/cpu_shortcuts.py).

- ``no_grad_product`` against a float64 dense product; which product it takes (2-8 rows and an
  fp32 weight of 1 MiB or more: the requested or measured one of x @ W^T, weight-major, blocked;
  else megatron's ``torch.matmul(x, W^T)``, bit for bit); the measured choice: once per shape, the
  fastest by a margin; the blocked product column by column against a dense one.
- each wrapper hands every case it does not cover to the original (recorded), and computes the
  cases it covers like a dense reference.
- whole models, with the shortcuts installed vs megatron's originals put back in the same process:
  TP=1 forward logits, loss and every weight gradient bit for bit (small weights: the matmul path);
  TP=2 (two gloo ranks) inference logits bit for bit; generation the same tokens and log-probs.
"""

from __future__ import annotations

import functools

import pytest
import torch
from distributed_utils import run_distributed

from rgkd_megatron.parallel import cpu_shortcuts
from rgkd_megatron.parallel.cpu_shortcuts import (
    BLOCK_BYTES,
    SKINNY_MIN_BYTES,
    block_rows,
    blocked_product,
    no_grad_product,
    pick_product,
    shortcut_linear,
    shortcut_tp_region,
    shortcut_viewless,
)


def _dense(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.double() @ w.double().t()).float()


@pytest.mark.parametrize("product", ["input", "weight", "blocked"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9])
def test_no_grad_product_matches_dense_and_takes_the_requested_product(rows, product, monkeypatch):
    monkeypatch.setenv(cpu_shortcuts.SKINNY_ENV, product)
    ran: list[str] = []
    for name, fn in list(cpu_shortcuts._PRODUCTS.items()):
        monkeypatch.setitem(
            cpu_shortcuts._PRODUCTS, name, lambda x_mk, w, name=name, fn=fn: ran.append(name) or fn(x_mk, w)
        )
    g = torch.Generator().manual_seed(rows)
    k = 256
    w = torch.randn(SKINNY_MIN_BYTES // (4 * k), k, generator=g)  # exactly the threshold
    x = torch.randn(rows, 1, k, generator=g)  # [s, b, K] like a decode step's [1, b, h] transposed
    got = no_grad_product(x, w)
    want = _dense(x, w)
    assert got.shape == (rows, 1, w.shape[0]) and got.is_contiguous()
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    if product == "weight" and 2 <= rows <= 8:
        assert torch.equal(got.view(rows, -1), torch.mm(w, x.view(rows, k).t()).t())
    elif product == "input" or not 2 <= rows <= 8:
        assert torch.equal(got, torch.matmul(x, w.t()))
    # megatron's product is computed in place (no entry of _PRODUCTS) unless another one is asked for
    assert ran == ([product] if product != "input" and 2 <= rows <= 8 else [])
    small = w[: w.shape[0] // 2]  # below the threshold: always megatron's matmul
    assert torch.equal(no_grad_product(x, small), torch.matmul(x, small.t()))
    assert torch.equal(no_grad_product(x.double(), w.double()), torch.matmul(x.double(), w.double().t()))


@pytest.mark.parametrize("n, k, block", [(1000, 64, 0), (1000, 64, 128), (1000, 64, 1000), (7, 4096, 0)])
def test_blocked_product_writes_every_column_like_a_dense_product(n, k, block):
    g = torch.Generator().manual_seed(n + k)
    w, x = torch.randn(n, k, generator=g), torch.randn(3, k, generator=g)
    got = blocked_product(x, w, block)
    want = _dense(x, w)
    assert got.shape == (3, n) and got.is_contiguous()
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    # each column is its own dot product: changing one weight row moves only that column
    w2 = w.clone()
    w2[n // 2] += 1.0
    moved = (blocked_product(x, w2, block) - got).abs().amax(dim=0) > 0
    assert moved.nonzero().flatten().tolist() == [n // 2]


@pytest.mark.parametrize(
    "n, block, sizes",
    [
        (1000, 128, [128] * 7 + [104]),  # a tail of 104 rows stays a block
        (1030, 128, [128] * 7 + [134]),  # a tail of 6 rows joins the block before
        (1039, 128, [128] * 7 + [143]),  # 15 rows: still joined
        (1040, 128, [128] * 8 + [16]),  # 16 rows: a block of its own
        (256, 128, [128, 128]),
        (1, 128, [1]),
        (5, 0, [5]),
    ],
)
def test_blocked_product_joins_a_short_last_block_to_the_one_before(n, block, sizes, monkeypatch):
    calls: list[int] = []
    real_mm = torch.mm

    def recording_mm(a, b, **kwargs):
        calls.append(b.shape[1])
        return real_mm(a, b, **kwargs)

    w, x = torch.randn(n, 8), torch.randn(3, 8)
    monkeypatch.setattr(torch, "mm", recording_mm)
    got = blocked_product(x, w, block)
    monkeypatch.setattr(torch, "mm", real_mm)
    assert calls == sizes and sum(calls) == n
    assert ((got - _dense(x, w)).abs().max() / _dense(x, w).abs().max()).item() < 1e-5


def test_blocked_product_builds_no_graph_and_refuses_nothing_with_grad_mode_on():
    w = torch.nn.Parameter(torch.randn(300, 16))
    x = torch.randn(4, 16, requires_grad=True)
    got = blocked_product(x, w, 64)  # grad mode on: an out= product would raise without no_grad
    assert not got.requires_grad
    assert torch.allclose(got, x.detach() @ w.detach().t(), rtol=1e-5, atol=1e-5)


def test_block_rows_follow_the_byte_budget_per_thread(monkeypatch):
    assert block_rows(torch.empty(49152, 576), 1) == BLOCK_BYTES // (576 * 4) // 16 * 16
    assert block_rows(torch.empty(49152, 576), 2) == 2 * BLOCK_BYTES // (576 * 4) // 16 * 16
    assert block_rows(torch.empty(100, 576), 1) == 100  # never more than N
    assert block_rows(torch.empty(4096, 1 << 20, device="meta"), 1) == 16  # at least 16 rows
    assert block_rows(torch.empty(4096, 576, dtype=torch.bfloat16), 1) == BLOCK_BYTES // (576 * 2) // 16 * 16
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # 0: torch's thread count
    assert block_rows(torch.empty(49152, 576)) == 3 * BLOCK_BYTES // (576 * 4) // 16 * 16


def test_pick_product_needs_a_clear_win_of_the_medians():
    assert (
        pick_product({"input": [10.0, 10.0, 30.0], "weight": [9.0, 1.0, 50.0], "blocked": [20.0] * 3})
        == "weight"
    )
    assert pick_product({"input": [10.0] * 3, "weight": [9.5] * 3, "blocked": [8.0, 9.0, 1.0]}) == "blocked"
    assert pick_product({"input": [10.0] * 3, "weight": [9.1] * 3, "blocked": [9.2] * 3}) == "input"  # 0.91x
    assert (
        pick_product({"input": [5.0, 6.0, 7.0], "weight": [6.0] * 3, "blocked": [6.0] * 3}) == "input"
    )  # ties
    assert (
        pick_product({"input": [10.0] * 3, "weight": [8.0] * 3, "blocked": [7.0] * 3}) == "blocked"
    )  # the fastest


@pytest.mark.parametrize("fastest", ["input", "weight", "blocked"])
def test_auto_product_measures_each_shape_once_and_keeps_the_fastest(fastest, monkeypatch):
    monkeypatch.delenv(cpu_shortcuts.SKINNY_ENV, raising=False)
    timed: list[tuple[int, int]] = []
    calls: list[str] = []

    def fake_timing(x_mk, weight):
        timed.append((weight.shape[0], x_mk.shape[0]))
        return {name: [1.0 if name == fastest else 2.0] * 3 for name in cpu_shortcuts.SKINNY_PRODUCTS}

    def recording_blocked(x_mk, weight, rows_per_block=0):
        calls.append("blocked")
        return torch.mm(x_mk, weight.t())

    monkeypatch.setattr(cpu_shortcuts, "time_products", fake_timing)
    monkeypatch.setitem(cpu_shortcuts._PRODUCTS, "blocked", recording_blocked)
    cpu_shortcuts.reset_product_choices()
    try:
        g = torch.Generator().manual_seed(0)
        k = 256
        w = torch.randn(SKINNY_MIN_BYTES // (4 * k), k, generator=g)
        for rows in (3, 3, 4, 3):
            x = torch.randn(rows, 1, k, generator=g)
            weight_major = torch.mm(w, x.view(rows, k).t()).t()
            got = no_grad_product(x, w).view(rows, -1)
            assert torch.equal(
                got, weight_major if fastest == "weight" else torch.matmul(x, w.t()).view(rows, -1)
            )
        assert timed == [(w.shape[0], 3), (w.shape[0], 4)]  # once per (N, K, rows)
        assert calls == (["blocked"] * 4 if fastest == "blocked" else [])
    finally:
        cpu_shortcuts.reset_product_choices()


def test_auto_product_times_every_product_on_the_call_tensors(monkeypatch):
    monkeypatch.delenv(cpu_shortcuts.SKINNY_ENV, raising=False)
    seen: list[torch.Tensor] = []
    real_mm = torch.mm

    def recording_mm(a, b, **kwargs):
        weight_operand = a if a.shape[0] > b.shape[1] else b  # the weight (block), or its transpose
        seen.append(weight_operand)
        return real_mm(a, b, **kwargs)

    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(1024, 64, generator=g), torch.randn(2, 64, generator=g)
    monkeypatch.setattr(cpu_shortcuts, "block_rows", lambda weight: 256)  # four blocks
    monkeypatch.setattr(torch, "mm", recording_mm)
    seconds = cpu_shortcuts.time_products(x, w)
    monkeypatch.setattr(torch, "mm", real_mm)
    assert list(seconds) == list(cpu_shortcuts.SKINNY_PRODUCTS)
    assert all(len(t) == cpu_shortcuts.CALIBRATION_TRIALS and min(t) > 0 for t in seconds.values())
    assert len(seen) == (2 + 4) * cpu_shortcuts.CALIBRATION_TRIALS
    storage = w.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == storage for t in seen)


def test_unknown_product_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(cpu_shortcuts.SKINNY_ENV, "fastest")
    w = torch.zeros(SKINNY_MIN_BYTES // (4 * 256), 256)
    with pytest.raises(
        ValueError, match=r"RGKD_CPU_SKINNY_GEMM='fastest'.*'auto', 'input', 'weight', 'blocked'"
    ):
        no_grad_product(torch.zeros(2, 256), w)


def _recording(calls: list):
    def original(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel, **kw):
        calls.append(kw)
        return torch.full((1,), -1.0)

    return original


def test_linear_shortcut_only_without_a_graph_and_without_sequence_parallelism():
    calls: list = []
    linear = shortcut_linear(_recording(calls))
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 2, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(5, generator=g)
    with torch.no_grad():
        got = linear(x, w, b, False, False, False, tp_group=None)
    assert not calls and torch.allclose(got, _dense(x, w) + b, atol=1e-6)
    assert torch.equal(
        linear(x, w, None, False, False, False), torch.matmul(x, w.t())
    )  # nothing needs a grad
    with torch.no_grad():
        linear(x, w, b, False, False, True)  # sequence parallel: gathers the input first
        linear(x, w, b, False, False, False, gtp_remat_size=2)
    linear(x.requires_grad_(), w, b, False, False, False)  # a graph to build
    linear(x.detach(), w.requires_grad_(), b, False, False, False)
    assert len(calls) == 4


class _Group:
    def __init__(self, n: int) -> None:
        self.n = n

    def size(self) -> int:
        return self.n


def test_tp_region_is_the_identity_on_one_rank_only():
    calls: list = []
    region = shortcut_tp_region(lambda t, group: calls.append(group) or t * 2)
    x = torch.randn(1, 3, 4).transpose(0, 1).contiguous().requires_grad_()  # odd size-1 stride
    one = region(x, _Group(1))
    assert one.data_ptr() == x.data_ptr() and torch.equal(one, x) and not calls
    assert one.stride() == torch.empty(3, 1, 4).stride()  # what an autograd function gives back
    (grad,) = torch.autograd.grad(one.sum(), x)
    assert torch.equal(grad, torch.ones_like(x))
    assert torch.equal(region(x, _Group(2)), x * 2) and len(calls) == 1
    region(x, None)  # megatron's default group: decided by the original
    assert len(calls) == 2


def test_viewless_without_grad_mode_is_the_kernel_and_keeps_the_graph_otherwise():
    from megatron.core.utils import _kernel_make_viewless_tensor

    calls: list = []
    viewless = shortcut_viewless(lambda t, rg, kg: calls.append(kg) or t, _kernel_make_viewless_tensor)
    base = torch.randn(6, 4)
    view = base[1:3]
    with torch.no_grad():
        out = viewless(view, True, True)
    assert out._base is None and out.data_ptr() == view.data_ptr() and torch.equal(out, view)
    assert viewless(base, True, True) is base  # not a view: as megatron
    viewless(view, True, True)  # grad mode on: megatron's autograd function
    assert calls == [True]


def _small_model(groups, tp: int):
    from rgkd_megatron.config.schema import ModelConfig, ParallelConfig
    from rgkd_megatron.models.builders import build_policy

    cfg = ModelConfig(
        num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
        max_position_embeddings=32, init_method_std=0.1, spec="local", params_dtype="fp32",
    )  # fmt: skip
    torch.manual_seed(5)
    return build_policy(cfg, ParallelConfig(tensor_model_parallel_size=tp), groups, 256)


def _both_paths(fn):
    """fn() with the shortcuts installed, then with megatron's originals; reinstalled after."""
    cpu_shortcuts.install()
    with_shortcuts = fn()
    cpu_shortcuts.uninstall()
    from megatron.core.tensor_parallel import layers
    from megatron.core.transformer import transformer_block

    patched = [layers.linear_with_grad_accumulation_and_async_allreduce, layers.reduce_from_tensor_model_parallel_region,
               transformer_block.make_viewless_tensor]  # fmt: skip
    assert not any(hasattr(f, "__wrapped__") for f in patched), "uninstall left a shortcut in place"
    try:
        originals = fn()
    finally:
        cpu_shortcuts.install()
    return with_shortcuts, originals


def _model_body(rank, world_size):
    import torch.nn.functional as F

    from rgkd_megatron.generation import generate, score
    from rgkd_megatron.parallel.groups import layout_for_world
    from rgkd_megatron.training.setup import init_role, teardown_roles

    groups = init_role(layout_for_world(world_size, 1, world_size), seed=3)
    model = _small_model(groups, world_size)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 256, (3, 12), generator=g)
    labels = torch.randint(0, 256, (3, 12), generator=g)
    pos = torch.arange(12).expand(3, 12)
    params = [p for p in model.parameters() if p.requires_grad]
    prompts = [[5, 9, 11], [7, 3, 2, 8], [1, 4]]
    out = {}

    def inference():
        model.eval()
        with torch.no_grad():
            logits = model(tokens, pos, None)
        gen = generate(model, groups, prompts, max_new_tokens=6, temperature=1.0, eos_id=None, pad_id=0,
                       seed=11, vocab_size=256, decode_path="megatron")  # fmt: skip
        return logits, gen.responses, gen.logprobs, score(model, groups, gen.sequences(), vocab_size=256)

    def training():
        model.train()
        logits = model(tokens, pos, None)
        if world_size == 1:
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        else:
            loss = logits.float().pow(2).mean()  # vocab-parallel logits: any differentiable function
        return loss.detach(), torch.autograd.grad(loss, params)

    (a, b) = _both_paths(inference)
    out["inference_equal"] = all(torch.equal(x, y) for x, y in zip(a, b))
    (la, ga), (lb, gb) = _both_paths(training)
    out["loss_equal"] = torch.equal(la, lb)
    out["grads_equal"] = all(torch.equal(x, y) for x, y in zip(ga, gb))
    # a frozen model (a teacher): the linear layers' other entry point; every decode step's
    # products stay GEMMs (a TP region returning an odd-strided [b, 1, h] once made torch.matmul
    # broadcast the vocabulary projection into a batched product)
    model.requires_grad_(False)
    (a, b) = _both_paths(inference)
    out["frozen_inference_equal"] = all(torch.equal(x, y) for x, y in zip(a, b))
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        inference()
    vocab = model.vocab_size // world_size  # the projection's output width on this rank
    out["batched_projections"] = [
        e.input_shapes
        for e in prof.key_averages(group_by_input_shape=True)
        if e.key in ("aten::bmm", "aten::baddbmm") and any(sh and sh[-1] == vocab for sh in e.input_shapes)
    ]
    odd = torch.randn(1, 3, 8).transpose(0, 1).contiguous()  # stride 24 on the size-1 dimension
    tp = groups.pg_collection.tp
    from megatron.core.tensor_parallel import layers

    want = layers.copy_to_tensor_model_parallel_region.__wrapped__(odd, group=tp)
    got = layers.copy_to_tensor_model_parallel_region(odd, group=tp)
    out["region_strides"] = (got.stride(), want.stride(), torch.equal(got, want))
    out["installed_after"] = hasattr(
        __import__(
            "megatron.core.tensor_parallel.layers", fromlist=["x"]
        ).copy_to_tensor_model_parallel_region,
        "__wrapped__",
    )
    teardown_roles()
    return out


@functools.cache
def _model_results(world_size: int) -> list[dict]:
    return run_distributed(_model_body, world_size)


@pytest.mark.parametrize("world_size", [1, 2])
def test_models_with_and_without_shortcuts_agree_bit_for_bit(world_size):
    for out in _model_results(world_size):
        assert out["installed_after"], out
        assert out["inference_equal"], out
        assert out["loss_equal"] and out["grads_equal"], out
        assert out["frozen_inference_equal"], out
        assert not out["batched_projections"], out
        got, want, equal = out["region_strides"]
        assert equal and (got == want if world_size == 1 else True), out
