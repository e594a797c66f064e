"""Triton KD kernels (interpreted on CPU) against the torch reference, value and gradient.

The kernels run on CPU under TRITON_INTERPRET=1, which triton reads when IT is imported (its own
``tl.max`` & co. are jit functions too) and when each kernel is defined. This module sets it before
importing triton. In a pytest process where triton was already imported without it (megatron-core
imports triton, so any earlier test module that imports megatron does that), every test here
runs this file once in a fresh subprocess with TRITON_INTERPRET=1 and reports that subprocess's
outcome for itself (failures carry the child's report). Triton missing is a FAILURE with install
instructions, never a skip. Shapes are small and the column block is 16, so every row pass runs
several blocks including a partial one; fp32 unless a test says otherwise.

- every KD kind, k < V and k = V: ``topk_kd_loss_triton`` == ``topk_kd_loss`` (loss, per-token loss,
  metrics, grad_logits) and ``fused_linear_topk_kd_triton`` == the unfused torch path (logits = h W^T)
  (loss, grad_hidden, grad_weight);
- padded vocab + given teacher tail + normalizer, alpha = 0 skew, duplicate ids, k > 128, per-token
  gradients, bf16 inputs, the backend switch. TP = 2 is in tests/distributed/test_triton_kd_tp.py.
"""

from __future__ import annotations

import functools
import importlib
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

_NEEDS_CHILD = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    import triton  # noqa: E402, F401

    TRITON_IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - CI installs triton through the dev extra
    TRITON_IMPORT_ERROR = exc

from rgkd_megatron.losses import KD_KINDS, topk_kd_loss, topk_kd_per_token, vocab_parallel_topk_logits  # noqa: E402

T_SHAPE, V, D, BLOCK_V = (2, 5), 40, 8, 16
RTOL, ATOL = 1e-4, 1e-5


@functools.lru_cache(maxsize=1)
def _child_outcomes() -> dict[str, tuple[str, str]]:
    """Run this file in a fresh interpreter with TRITON_INTERPRET=1: {test name: (outcome, report)}."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "report.xml")
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
        proc = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[2], capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        if not os.path.exists(xml):
            return {"*": ("error", proc.stdout[-4000:] + proc.stderr[-4000:])}
        out = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            bad = [c for c in case if c.tag in ("failure", "error", "skipped")]
            out[case.get("name")] = (
                (bad[0].tag, (bad[0].text or bad[0].get("message") or "")[-4000:]) if bad else ("passed", "")
            )
        return out


def interpreted(test):
    """Run ``test`` here, or report its outcome in the TRITON_INTERPRET=1 subprocess (module docstring)."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        if TRITON_IMPORT_ERROR is not None:
            pytest.fail(
                f"triton is not importable ({TRITON_IMPORT_ERROR}); these tests need it: install it with "
                "`pip install triton==3.7.1` (it is in the dev extra: pip install -e '.[dev]')",
                pytrace=False,
            )
        if not _NEEDS_CHILD:
            return test(*args, **kwargs)
        name = os.environ["PYTEST_CURRENT_TEST"].split("::")[-1].rsplit(" ", 1)[0]
        outcomes = _child_outcomes()
        outcome, report = outcomes.get(
            name, outcomes.get("*", ("missing", f"{name} not in the child's report"))
        )
        if outcome != "passed":
            pytest.fail(f"{name}: {outcome} in the TRITON_INTERPRET=1 subprocess:\n{report}", pytrace=False)

    return wrapper


def _kernels():
    """The kernel modules (their kernels must be the interpreted ones)."""
    names = ("rgkd_megatron.kernels.topk_kd_triton", "rgkd_megatron.kernels.fused_linear_topk_triton")
    modules = tuple(importlib.import_module(name) for name in names)
    assert modules[0].kernels_interpreted(), "kernel module imported before TRITON_INTERPRET=1 was set"
    return modules


def _data(seed: int, k: int, vocab_size: int = V, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*T_SHAPE, D, generator=g)
    weight = torch.randn(V, D, generator=g) / D**0.5 * 3
    teacher = torch.log_softmax(3 * torch.randn(*T_SHAPE, vocab_size, generator=g), -1)
    lp, ids = teacher.topk(k, dim=-1)
    mask = torch.rand(T_SHAPE, generator=g) > 0.25
    return hidden.to(dtype), weight.to(dtype), ids.to(torch.int32), lp, mask


KW = dict(temperature=1.5, beta=0.3, alpha=0.2)
CASES = [(kind, k) for kind in KD_KINDS for k in (6, V)]


def _close(a, b, msg, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol, msg=lambda m: f"{msg}: {m}")


@pytest.mark.parametrize("kind, k", CASES)
@interpreted
def test_unfused_equals_torch(kind, k):
    tk, _ = _kernels()
    hidden, weight, ids, lp, mask = _data(1, k)
    logits = hidden @ weight.T
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ref, ref_m = topk_kd_loss(a, ids, lp, mask, kind, **KW)
    out, out_m = tk.topk_kd_loss_triton(b, ids, lp, mask, kind, **KW, block_v=BLOCK_V)
    ref.backward()
    out.backward()
    assert ref.item() > 1e-3, "degenerate case"
    _close(out, ref, "loss")
    for key in ref_m:
        _close(out_m[key], ref_m[key], key)
    _close(b.grad, a.grad, "grad_logits")


@pytest.mark.parametrize("kind, k", CASES)
@interpreted
def test_fused_equals_unfused_torch(kind, k):
    _, fl = _kernels()
    hidden, weight, ids, lp, mask = _data(2, k)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref, ref_m = topk_kd_loss(h1 @ w1.T, ids, lp, mask, kind, **KW)
    out, out_m = fl.fused_linear_topk_kd_triton(
        h2, w2, ids, lp, mask, kind, chunk_size=4, **KW, block_v=BLOCK_V
    )
    scale = 1.0 if k == V else 0.5  # also the backward path that rescales the stored gradients
    (scale * ref).backward()
    (scale * out).backward()
    _close(out, ref, "loss")
    _close(out_m["kd/per_token_loss"], ref_m["kd/per_token_loss"], "per_token")
    _close(h2.grad, h1.grad, "grad_hidden")
    _close(w2.grad, w1.grad, "grad_weight")


@pytest.mark.parametrize("kind", ["skew_fkl", "skew_rkl", "jsd"])
@interpreted
def test_padded_vocab_teacher_tail_normalizer_alpha0(kind):
    tk, fl = _kernels()
    hidden, weight, ids, lp, mask = _data(3, 5, vocab_size=33)  # 7 padding columns, 2 of them in block 3
    tail = torch.rand(T_SHAPE, generator=torch.Generator().manual_seed(9)) * 0.5
    kw = dict(temperature=0.7, beta=0.6, alpha=0.0, vocab_size=33, teacher_tail_t=tail, normalizer=13.0)
    logits = hidden @ weight.T
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ref, ref_m = topk_kd_loss(a, ids, lp, mask, kind, **kw)
    out, out_m = tk.topk_kd_loss_triton(b, ids, lp, mask, kind, **kw, block_v=BLOCK_V)
    ref.backward()
    out.backward()
    _close(out, ref, "loss")
    _close(b.grad, a.grad, "grad_logits")
    assert b.grad[..., 33:].abs().max() == 0  # padding columns get no gradient
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fout, _ = fl.fused_linear_topk_kd_triton(h, w, ids, lp, mask, kind, chunk_size=3, **kw, block_v=BLOCK_V)
    fout.backward()
    _close(fout, ref, "fused loss")
    _close(h.grad, (a.grad.reshape(-1, V) @ weight).reshape(h.shape), "fused grad_hidden")


@interpreted
def test_topk_logits_and_per_token_gradients_with_duplicate_ids():
    tk, _ = _kernels()
    hidden, weight, ids, lp, _ = _data(4, 6)
    ids[0, 0, 1] = ids[0, 0, 3] = ids[0, 0, 0]  # scatter must sum duplicates like scatter_add_
    logits = hidden @ weight.T
    g = torch.Generator().manual_seed(5)
    g_lse, g_topk, g_tok = (
        torch.randn(T_SHAPE, generator=g),
        torch.randn(*T_SHAPE, 6, generator=g),
        torch.randn(T_SHAPE, generator=g),
    )
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    lse_a, top_a = vocab_parallel_topk_logits(a, ids, temperature=1.3)
    lse_b, top_b = tk.vocab_parallel_topk_logits_triton(b, ids, temperature=1.3, block_v=BLOCK_V)
    _close(lse_b, lse_a, "lse")
    _close(top_b, top_a, "topk logits")
    ((lse_a * g_lse).sum() + (top_a * g_topk).sum()).backward()
    ((lse_b * g_lse).sum() + (top_b * g_topk).sum()).backward()
    _close(b.grad, a.grad, "grad_logits (duplicates)")
    a.grad = b.grad = None
    per_a = topk_kd_per_token(a, ids, lp, kind="rkl", temperature=1.3)
    per_b = tk.topk_kd_per_token_triton(b, ids, lp, kind="rkl", temperature=1.3, block_v=BLOCK_V)
    _close(per_b, per_a, "per-token loss")
    (per_a * g_tok).sum().backward()
    (per_b * g_tok).sum().backward()
    _close(b.grad, a.grad, "per-token grad_logits")


@interpreted
def test_large_k_distinct_ids_path():
    """k > 128: the grad kernel skips the duplicate-id reduction (teacher top-k ids are distinct)."""
    tk, _ = _kernels()
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(6, 300, generator=g) * 2
    lp, ids = torch.log_softmax(2 * torch.randn(6, 300, generator=g), -1).topk(150, dim=-1)
    mask = torch.ones(6, dtype=torch.bool)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ref, _ = topk_kd_loss(a, ids, lp, mask, "jsd", **KW)
    out, _ = tk.topk_kd_loss_triton(b, ids, lp, mask, "jsd", **KW, block_v=128)
    ref.backward()
    out.backward()
    _close(out, ref, "loss")
    _close(b.grad, a.grad, "grad_logits")


@interpreted
def test_bf16_inputs_match_torch_bf16():
    tk, fl = _kernels()
    hidden, weight, ids, lp, mask = _data(6, 6, dtype=torch.bfloat16)
    logits = hidden @ weight.T
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ref, _ = topk_kd_loss(a, ids, lp.half(), mask, "jsd", **KW)
    out, _ = tk.topk_kd_loss_triton(b, ids, lp.half(), mask, "jsd", **KW, block_v=BLOCK_V)
    ref.backward()
    out.backward()
    assert b.grad.dtype == torch.bfloat16
    _close(out, ref, "bf16 loss", rtol=1e-4, atol=1e-5)  # fp32 math on the same bf16 inputs
    _close(b.grad, a.grad, "bf16 grad_logits", rtol=1e-2, atol=1e-4)  # one bf16 rounding each
    for accum in ("fp32", "param"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        fout, _ = fl.fused_linear_topk_kd_triton(h, w, ids, lp, mask, "fkl", chunk_size=4, **KW,
                                                 grad_weight_accum=accum, block_v=BLOCK_V)  # fmt: skip
        fout.backward()
        assert w.grad.dtype == torch.bfloat16 and torch.isfinite(w.grad.float()).all(), accum


@interpreted
def test_backend_switch_and_errors(monkeypatch):
    tk, fl = _kernels()
    from rgkd_megatron.kernels import fused_linear_topk_kd
    from rgkd_megatron.kernels import topk_kd_loss as dispatch_loss

    calls = []
    for mod, name in ((tk, "topk_kd_loss_triton"), (fl, "fused_linear_topk_kd_triton")):
        real = getattr(mod, name)
        monkeypatch.setattr(
            mod, name, lambda *a, _real=real, _n=name, **kw: calls.append(_n) or _real(*a, **kw)
        )
    hidden, weight, ids, lp, mask = _data(7, 6)
    logits = hidden @ weight.T
    ref, _ = topk_kd_loss(logits, ids, lp, mask, "tvd")
    for backend in ("auto", "torch", "triton"):
        calls.clear()
        loss, _ = dispatch_loss(logits, ids, lp, mask, "tvd", backend=backend)
        floss, _ = fused_linear_topk_kd(hidden, weight, ids, lp, mask, "tvd", backend=backend)
        _close(loss, ref, backend)
        _close(floss, ref, f"fused {backend}")
        expected = ["topk_kd_loss_triton", "fused_linear_topk_kd_triton"] if backend == "triton" else []
        assert calls == expected, (backend, calls)  # auto = torch on CPU, even when interpreting
    with pytest.raises(ValueError, match="dtype torch.float64 not supported"):
        tk.topk_kd_loss_triton(logits.double(), ids, lp, mask)
    with pytest.raises(ValueError, match="block_v=24: must be a power of two"):
        tk.topk_kd_loss_triton(logits, ids, lp, mask, block_v=24)
    with pytest.raises(ValueError, match=r"top-k=20000 outside \[1, 16384\]; use the torch backend"):
        tk.vocab_parallel_topk_logits_triton(torch.zeros(1, 4), torch.zeros(1, 20000, dtype=torch.int64))
