"""Peak memory and forward+backward time of the sparse top-k KD losses vs a dense KD reference and CE.

Variants (each is one training step from the final hidden states: output layer + loss, forward and
backward, gradients wrt hidden and output weight):

    cross_entropy  logits = h @ W.T; F.cross_entropy(logits, targets)           (the time baseline)
    dense_fkl      logits = h @ W.T; forward KL against the full teacher distribution [t, V]
                   (log_softmax + F.kl_div: the usual dense implementation; the memory baseline)
    sparse_topk    logits = h @ W.T; topk_kd_loss(...) on the top-k + tail buckets
    fused_topk     fused_linear_topk_kd(...): chunked output layer + loss, no [t, V] logits

How memory is measured (honestly, and the same way for every variant):
    * Each variant runs in a fresh subprocess. The shared inputs (hidden, weight) are created first
      and define the baseline; the variant's own inputs (targets / the dense teacher distribution /
      the top-k ids and log-probs) are created inside the measured region, because holding them is
      part of that method's cost.
    * CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the baseline.
    * CPU: peak resident set size (getrusage ru_maxrss) after the first step minus the current RSS
      (/proc/self/statm) at the baseline. PyTorch's CPU allocator does not cache, and glibc serves
      these large blocks with mmap/munmap, so RSS follows live tensor memory.
    The gradients of hidden and weight, alive after the step, are included for every variant.
Time: median of --iters steps after --warmup steps (CUDA synchronised).
Chunk: the sparse and fused losses take the largest token chunk whose [chunk, V] work tensors fit
--chunk-budget-mib (``rgkd_megatron.losses.chunking``; --chunk-size overrides it); the chunk each
variant used and the memory method are printed and are in the JSON.

Usage:
    python benchmarks/kd_loss.py                        # V=49,152, 2,048 tokens, k=64, hidden 576
    python benchmarks/kd_loss.py --vocab 152064 --tokens 4096 --device cuda --dtype bf16
Prints a table, then a JSON object as the last line (ratios: memory vs dense_fkl, time vs CE).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from rgkd_megatron.losses.chunking import DEFAULT_CHUNK_BUDGET_MIB

VARIANTS = ("cross_entropy", "dense_fkl", "sparse_topk", "fused_topk")


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=49_152, help="vocabulary size V")
    p.add_argument("--tokens", type=int, default=2_048, help="tokens per step")
    p.add_argument("--k", type=int, default=64, help="teacher top-k")
    p.add_argument("--hidden", type=int, default=576, help="hidden size of the output layer")
    p.add_argument(
        "--kind", default="fkl", help="sparse KD divergence (fkl, rkl, jsd, skew_fkl, skew_rkl, tvd)"
    )
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    p.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="token chunk of the sparse and fused losses (default: from the budget)",
    )
    p.add_argument(
        "--chunk-budget-mib", type=float, default=DEFAULT_CHUNK_BUDGET_MIB,
        help="memory budget of the per-chunk work tensors (rgkd_megatron/losses/chunking.py)",
    )  # fmt: skip
    p.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = cuda if available"
    )
    p.add_argument(
        "--dtype", default="auto", choices=("auto", "fp32", "bf16"), help="auto = bf16 on cuda, fp32 on cpu"
    )
    p.add_argument("--iters", type=int, default=3, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the memory-measured step")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    return p.parse_args(argv)


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _make_step(args: argparse.Namespace, T: int, V: int, D: int, k: int):
    """(make_inputs, step) for variant ``args.child`` at these sizes; step = zero grads, fwd, bwd."""
    import torch
    import torch.nn.functional as F

    from rgkd_megatron.losses import fused_linear_topk_kd, topk_kd_loss

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(T, D, device=device, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(V, D, device=device, dtype=dtype, generator=g) * D**-0.5).requires_grad_()
    temp, variant = args.temperature, args.child

    def make_inputs():
        mask = torch.ones(T, dtype=torch.bool, device=device)
        if variant == "cross_entropy":
            return (torch.randint(0, V, (T,), device=device, generator=g),)
        if variant == "dense_fkl":  # built in row chunks so no [t, V] temporary inflates the peak
            teacher_lp = torch.empty(T, V, device=device, dtype=torch.float32)
            for r in range(0, T, 256):
                rows = teacher_lp[r : r + 256]
                rows.copy_(torch.log_softmax(3 * torch.randn(rows.shape, device=device, generator=g), -1))
            return teacher_lp, mask
        lp, _ = torch.log_softmax(3 * torch.randn(T, 4 * k, device=device, generator=g), -1).topk(k, dim=-1)
        lp = (lp - 1.0).to(torch.float16)  # leave ~60% of the mass in the tail; the cache stores fp16
        # distinct ids per token; clone() so that no [V] permutation stays alive behind a view
        ids = torch.stack([torch.randperm(V, device=device, generator=g)[:k].clone() for _ in range(T)])
        return ids.to(torch.int32), lp, mask

    def step(inputs):
        hidden.grad = weight.grad = None
        if variant == "fused_topk":
            ids, lp, mask = inputs
            loss, _ = fused_linear_topk_kd(
                hidden,
                weight,
                ids,
                lp,
                mask,
                args.kind,
                temp,
                args.chunk_size,
                chunk_budget_mib=args.chunk_budget_mib,
            )
        else:
            logits = hidden @ weight.T
            if variant == "cross_entropy":
                loss = F.cross_entropy(logits, inputs[0])
            elif variant == "dense_fkl":
                teacher_lp, mask = inputs
                log_q = torch.log_softmax(logits.float() / temp, -1)
                per_tok = F.kl_div(log_q, teacher_lp, log_target=True, reduction="none").sum(-1)
                loss = (per_tok * mask).sum() / mask.sum()
            else:
                ids, lp, mask = inputs
                loss, _ = topk_kd_loss(
                    logits, ids, lp, mask, args.kind, temp, chunk_size=args.chunk_size,
                    chunk_budget_mib=args.chunk_budget_mib,
                )  # fmt: skip
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return make_inputs, step


def _run_child(args: argparse.Namespace) -> dict:
    import torch

    cuda = args.device == "cuda"
    tiny_inputs, tiny_step = _make_step(args, 16, 256, 32, min(args.k, 8))
    tiny_step(tiny_inputs())  # load kernels / touch library code pages before the baseline
    make_inputs, step = _make_step(args, args.tokens, args.vocab, args.hidden, args.k)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _current_rss_bytes()
    inputs = make_inputs()
    step(inputs)
    peak = (torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()) - base
    for _ in range(args.warmup):
        step(inputs)
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step(inputs)
        times.append(time.perf_counter() - t0)
    return {"variant": args.child, "peak_mib": peak / 2**20, "time_ms": 1e3 * statistics.median(times),
            "chunk": _chunk_used(args)}  # fmt: skip


def _chunk_used(args: argparse.Namespace) -> int | None:
    """The token chunk the variant's loss resolves (same function the loss calls), None if it has none."""
    import torch

    from rgkd_megatron.losses.chunking import resolve_chunk_size

    impl = {"sparse_topk": "torch", "fused_topk": "torch_fused"}.get(args.child)
    if impl is None:
        return None
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    return resolve_chunk_size(args.chunk_size, args.tokens, args.vocab, dtype, impl, args.chunk_budget_mib)


def _memory_method(device: str) -> str:
    if device == "cuda":
        return (
            "torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() at "
            "the baseline: live tensors only (the caching allocator's reserved-but-free blocks are not counted)"
        )
    return (
        "peak resident set size (getrusage ru_maxrss) minus the RSS at the baseline (/proc/self/statm): every "
        "resident page of the child process (tensors, allocator slack, library scratch); not counted: hidden, "
        "weight and code loaded before the baseline; counted: the variant's inputs, activations, grads"
    )


def main(argv=None) -> dict:
    args = _parse_args(argv)
    if args.device == "auto" or args.dtype == "auto":
        import torch

        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.dtype == "auto":
            args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.child:
        print(json.dumps(_run_child(args)))
        return {}
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {VARIANTS}")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    res = {}
    for v in variants:
        cmd = [sys.executable, os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)]
        cmd += ["--child", v, "--device", args.device, "--dtype", args.dtype]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        res[v] = json.loads(out.strip().splitlines()[-1])

    dense_mem = res.get("dense_fkl", {}).get("peak_mib")
    ce_time = res.get("cross_entropy", {}).get("time_ms")
    chunks = {v: r["chunk"] for v, r in res.items() if r.get("chunk") is not None}
    print(f"kd_loss: V={args.vocab} tokens={args.tokens} k={args.k} hidden={args.hidden} kind={args.kind} "
          f"device={args.device} dtype={args.dtype} chunk budget={args.chunk_budget_mib} MiB -> chunk used {chunks}")  # fmt: skip
    print(f"peak memory: {_memory_method(args.device)}")
    print(f"{'variant':<15}{'peak MiB':>11}{'fwd+bwd ms':>12}{'mem/dense':>11}{'time/CE':>9}")
    summary = {
        "benchmark": "kd_loss", "device": args.device, "dtype": args.dtype, "vocab": args.vocab,
        "tokens": args.tokens, "k": args.k, "hidden": args.hidden, "kind": args.kind, "chunk_budget_mib": args.chunk_budget_mib,
        "chunk_used": chunks, "memory_measure": _memory_method(args.device),
        "peak_mib": {}, "time_ms": {}, "mem_vs_dense": {}, "time_vs_ce": {},
    }  # fmt: skip
    for v, r in res.items():
        mem_ratio = r["peak_mib"] / dense_mem if dense_mem else float("nan")
        time_ratio = r["time_ms"] / ce_time if ce_time else float("nan")
        print(f"{v:<15}{r['peak_mib']:>11.1f}{r['time_ms']:>12.1f}{mem_ratio:>11.3f}{time_ratio:>9.3f}")
        summary["peak_mib"][v] = round(r["peak_mib"], 1)
        summary["time_ms"][v] = round(r["time_ms"], 2)
        summary["mem_vs_dense"][v] = round(mem_ratio, 4)
        summary["time_vs_ce"][v] = round(time_ratio, 4)
    if "fused_topk" in res and dense_mem and ce_time:
        summary["goals"] = {
            "fused_mem_le_0.25_dense": summary["mem_vs_dense"]["fused_topk"] <= 0.25,
            "fused_time_le_1.2_ce": summary["time_vs_ce"]["fused_topk"] <= 1.2,
        }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
