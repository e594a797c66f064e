"""The prepared one-GPU check of issue 9 (run it through ``benchmarks/gpu_check.sh``). JSON last line.

Sections, each guarded (a failure is recorded as {"error": ...} and the next section still runs; a
soft deadline skips what no longer fits; results are written after every section). What each one
measures, the MFU formula and the goals: docs/performance.md.

1. ``kernel_correctness``  the COMPILED Triton KD kernels vs the torch reference (fp32, all kinds).
2. ``kd_kernels``  V=128,256, 8,192 tokens, k=64, bf16: time + peak memory, torch vs Triton, on given
   logits (``loss_only``) and from the hidden states (``linear+loss``, unfused and fused).
3. ``student_step``  1B-class Llama, seq 4,096, bf16, our builders + engine: tokens/s and MFU =
   tokens (6 N + 12 L s H Q) / (step time x 989 TFLOP/s), N = matmul params incl. the output layer.
4. ``cache_reader``  synthetic teacher cache (1M rows, k=64) through TeacherCacheReader into the GPU;
   "skipped: cache module not available" when rgkd_megatron.cache cannot be imported.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if (ROOT / "runs" / "gpu_deps").is_dir():  # gpu_check.sh --prepare-deps: fills only what is missing
    sys.path.append(str(ROOT / "runs" / "gpu_deps"))

PEAK_TFLOPS = 989.0
PEAK_SOURCE = "NVIDIA H100/H200 SXM dense BF16 tensor-core peak (989 TFLOP/s, no sparsity)"
GOALS = {"mfu": 0.45, "kd_speedup": 2.0, "kd_peak_memory_ratio": 0.25}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default="kernel_correctness,kd_kernels,student_step,cache_reader",
                   help="comma-separated sections to run (in this order)")  # fmt: skip
    p.add_argument("--budget-s", type=float, default=440.0, help="soft deadline: skip sections past it")
    p.add_argument("--output", default=str(ROOT / "runs" / "gpu_check" / "gpu_check.json"), help="JSON file")
    p.add_argument("--spec", default="auto", choices=("auto", "te", "local"), help="student layer spec")
    p.add_argument("--micro-batch-size", type=int, default=4, help="student sequences per micro-batch")
    p.add_argument("--num-microbatches", type=int, default=2, help="student micro-batches per step")
    p.add_argument("--steps", type=int, default=8, help="timed student steps (after 3 warm-up)")
    p.add_argument("--recompute", default="none", choices=("none", "selective", "full"))
    p.add_argument("--kd-iters", type=int, default=5, help="timed iterations per KD variant")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes: validates every code path in seconds (numbers meaningless)")  # fmt: skip
    p.add_argument("--allow-cpu", action="store_true",
                   help="with --smoke: run on CPU (needs TRITON_INTERPRET=1 for the Triton kernels)")  # fmt: skip
    return p.parse_args(argv)


class Sizes:
    """Shapes of every section: the real ones, or tiny ones for --smoke (CPU-testable)."""

    def __init__(self, smoke: bool, device: str):
        self.device, self.cuda = device, device == "cuda"
        if not smoke:
            self.corr = dict(t=300, v=5000, pad=4990, d=64, v_full=1000, big_k=256)
            self.kd = dict(T=8192, V=128256, k=64, d=2048)
            self.student = dict(L=16, d=2048, heads=32, kv=8, ffn=8192, vocab=128256, seq=4096, dtype="bf16")
            self.cache = dict(samples=256, seq=4096, batch=8, rows_per_shard=131072, block_rows=1024)
        else:
            self.corr = dict(t=20, v=300, pad=290, d=16, v_full=100, big_k=150)
            self.kd = dict(T=64, V=1000, k=16, d=32)
            self.student = dict(
                L=2, d=64, heads=4, kv=2, ffn=128, vocab=512, seq=64, dtype="bf16" if self.cuda else "fp32"
            )
            self.cache = dict(samples=6, seq=64, batch=2, rows_per_shard=128, block_rows=32)


# --------------------------------------------------------------------------------------------------
# helpers


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


WARMUP = 2  # untimed calls per measurement (0 in CPU smoke runs)


def measure(fn, iters: int, warmup: int | None = None) -> dict:
    """Peak memory (MiB above what was allocated before; CUDA only) of the first call, then the
    median time (ms) of ``iters`` calls after ``warmup``."""
    import torch

    cuda = torch.cuda.is_available()
    gc.collect()
    _sync()
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    fn()
    _sync()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
    for _ in range(WARMUP if warmup is None else warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return {"time_ms": round(statistics.median(times), 3), "peak_mib": round(peak, 1)}


def _env() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    out = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(0) if cuda else "none (CPU smoke run)",
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        if cuda
        else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
    }
    for mod in ("triton", "megatron.core", "transformer_engine", "apex"):
        try:
            module = __import__(mod, fromlist=["_"])
            out[mod] = str(getattr(module, "__version__", "installed"))
        except Exception as exc:  # noqa: BLE001 - report, never fail here
            out[mod] = f"not importable ({type(exc).__name__})"
    return out


# --------------------------------------------------------------------------------------------------
# 1. compiled-kernel correctness


def kernel_correctness(args, sz: Sizes) -> dict:
    import torch

    from rgkd_megatron.kernels.fused_linear_topk_triton import fused_linear_topk_kd_triton
    from rgkd_megatron.kernels.topk_kd_triton import topk_kd_loss_triton
    from rgkd_megatron.losses import KD_KINDS, topk_kd_loss

    dev, c = sz.device, sz.corr
    g = torch.Generator(device=dev).manual_seed(0)
    out, worst = {}, 0.0
    cases = [(kind, 64, c["pad"]) for kind in KD_KINDS]
    cases += [("fkl", 16, None), ("jsd", c["big_k"], None), ("rkl", c["v_full"], None)]  # k > 128; k = V
    for kind, k, vocab_size in cases:
        t, v, d = c["t"], c["v_full"] if k == c["v_full"] else c["v"], c["d"]
        h = torch.randn(t, d, device=dev, generator=g)
        w = torch.randn(v, d, device=dev, generator=g) * 0.3
        lp, ids = torch.log_softmax(3 * torch.randn(t, vocab_size or v, device=dev, generator=g), -1).topk(
            k, -1
        )
        mask = torch.rand(t, device=dev, generator=g) > 0.2
        kw = dict(temperature=1.5, beta=0.3, alpha=0.2, vocab_size=vocab_size)
        res = {}
        for name in ("torch", "triton", "fused"):
            hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
            if name == "fused":
                loss, _ = fused_linear_topk_kd_triton(
                    hh, ww, ids, lp, mask, kind, chunk_size=t // 3 + 1, **kw
                )
            else:
                fn = topk_kd_loss if name == "torch" else topk_kd_loss_triton
                loss, _ = fn(hh @ ww.T, ids, lp, mask, kind, **kw)
            loss.backward()
            res[name] = (loss.detach(), hh.grad, ww.grad)
        diffs = {
            f"{name}_{what}": ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()
            for name in ("triton", "fused") for what, a, b in zip(("loss", "grad_h", "grad_w"), res[name], res["torch"])
        }  # fmt: skip
        worst = max(worst, *diffs.values())
        out[f"{kind}/k{k}" + (f"/vocab{vocab_size}" if vocab_size else "")] = {
            n: f"{x:.2e}" for n, x in diffs.items()
        }
    return {"max_relative_diff": f"{worst:.2e}", "pass": worst < 1e-4, "cases": out}


# --------------------------------------------------------------------------------------------------
# 2. KD kernels at scale


def kd_kernels(args, sz: Sizes) -> dict:
    import torch

    from rgkd_megatron.kernels.fused_linear_topk_triton import fused_linear_topk_kd_triton
    from rgkd_megatron.kernels.topk_kd_triton import topk_kd_loss_triton
    from rgkd_megatron.losses import KD_KINDS, fused_linear_topk_kd, topk_kd_loss

    T, V, k, d = (sz.kd[x] for x in ("T", "V", "k", "d"))
    dev = sz.device
    g = torch.Generator(device=dev).manual_seed(0)
    h = (torch.randn(T, d, device=dev, generator=g, dtype=torch.bfloat16)).requires_grad_()
    w = (torch.randn(V, d, device=dev, generator=g, dtype=torch.bfloat16) * d**-0.5).requires_grad_()
    ids = torch.empty(T, k, dtype=torch.int32, device=dev)
    for r in range(0, T, 512):  # distinct ids per token, like a real teacher top-k
        ids[r : r + 512] = torch.rand(min(512, T - r), V, device=dev, generator=g).topk(k, -1).indices
    lp, _ = torch.log_softmax(3 * torch.randn(T, 4 * k, device=dev, generator=g), -1).topk(k, -1)
    lp = (lp - 1.0).half()  # ~60% of the mass in the tail; the cache stores fp16
    mask = torch.ones(T, dtype=torch.bool, device=dev)
    res: dict = {"config": {"tokens": T, "vocab": V, "k": k, "hidden": d, "dtype": "bf16"}}

    def step_of(fn, leaves, make_args, kind="fkl", **kw):
        def step():
            for leaf in leaves:
                leaf.grad = None
            fn(*make_args(), ids, lp, mask, kind, **kw)[0].backward()

        return step

    x = (h.detach() @ w.detach().T).requires_grad_()  # given logits (loss_only), freed after use
    for kind in KD_KINDS:
        for name, fn in (("torch", topk_kd_loss), ("triton", topk_kd_loss_triton)):
            res[f"loss_only/{name}/{kind}"] = measure(step_of(fn, [x], lambda: (x,), kind), args.kd_iters)
            x.grad = None
    x = None
    variants = {  # from the hidden states: output layer + loss, gradients wrt h and W
        "torch_unfused": step_of(topk_kd_loss, [h, w], lambda: (h @ w.T,)),
        "triton_unfused": step_of(topk_kd_loss_triton, [h, w], lambda: (h @ w.T,)),
        "torch_fused": step_of(fused_linear_topk_kd, [h, w], lambda: (h, w)),
        "triton_fused": step_of(fused_linear_topk_kd_triton, [h, w], lambda: (h, w)),
        "triton_fused_param": step_of(
            fused_linear_topk_kd_triton, [h, w], lambda: (h, w), grad_weight_accum="param"
        ),
    }
    for name, step in variants.items():
        res[f"linear+loss/{name}"] = measure(step, args.kd_iters)
        h.grad = w.grad = None
    t, p = ({key: v["time_ms"] for key, v in res.items() if key != "config"},
            {key: v["peak_mib"] for key, v in res.items() if key != "config"})  # fmt: skip
    speed = {kind: t[f"loss_only/torch/{kind}"] / t[f"loss_only/triton/{kind}"] for kind in KD_KINDS}
    mem = p["linear+loss/triton_fused"] / p["linear+loss/torch_unfused"]
    res["summary"] = {
        "loss_only_speedup_triton_vs_torch": {kk: round(v, 2) for kk, v in speed.items()},
        "loss_only_peak_ratio_fkl": round(p["loss_only/triton/fkl"] / p["loss_only/torch/fkl"], 3),
        "fused_peak_ratio_vs_torch_unfused": round(mem, 3),
        "fused_param_peak_ratio_vs_torch_unfused": round(p["linear+loss/triton_fused_param"] / p["linear+loss/torch_unfused"], 3),
        "fused_speedup_vs_torch_unfused": round(t["linear+loss/torch_unfused"] / t["linear+loss/triton_fused"], 2),
        "fused_speedup_vs_torch_fused": round(t["linear+loss/torch_fused"] / t["linear+loss/triton_fused"], 2),
        "goal_speedup_ge_2": min(speed.values()) >= GOALS["kd_speedup"],
        "goal_peak_memory_le_quarter": mem <= GOALS["kd_peak_memory_ratio"],
    }  # fmt: skip
    return res


# --------------------------------------------------------------------------------------------------
# 3. student step MFU


def student_step(args, sz: Sizes, state: dict) -> dict:
    import torch
    import torch.distributed as dist

    from rgkd_megatron.config.schema import ModelConfig, OptimizerConfig, ParallelConfig
    from rgkd_megatron.models.builders import build_policy
    from rgkd_megatron.parallel.groups import layout_for_world
    from rgkd_megatron.training.engine import build_engine, train_step
    from rgkd_megatron.training.objectives import make_sft_forward_step
    from rgkd_megatron.training.setup import init_role, teardown_roles

    st, dev = sz.student, sz.device
    seq, mbs, nmb, vocab = st["seq"], args.micro_batch_size, args.num_microbatches, st["vocab"]
    L, d, heads, groups_kv, ffn = st["L"], st["d"], st["heads"], st["kv"], st["ffn"]
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("rgkd_megatron").addHandler(handler)
    logging.getLogger("rgkd_megatron").setLevel(logging.INFO)
    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("GPU_CHECK_PORT", "29531"))
        if sz.cuda:
            torch.cuda.set_device(0)
            dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
        else:
            dist.init_process_group("gloo", rank=0, world_size=1)
    model_cfg = ModelConfig(
        num_layers=L, hidden_size=d, ffn_hidden_size=ffn, num_attention_heads=heads, num_query_groups=groups_kv,
        max_position_embeddings=seq, rotary_base=500000.0, tie_word_embeddings=True, spec=args.spec,
        params_dtype=st["dtype"], recompute=args.recompute,
    )  # fmt: skip
    par = ParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True)
    groups = init_role(layout_for_world(1, 1, 1), seed=1234)
    model = build_policy(model_cfg, par, groups, vocab)
    n_params = sum(p.numel() for p in model.parameters())
    engine = build_engine(model, groups, OptimizerConfig(), par, 1e-5, 1e-5, 0, 1000, "constant")
    gen = torch.Generator(device=dev).manual_seed(0)

    def batch():
        tokens = torch.randint(0, vocab, (mbs, seq + 1), device=dev, generator=gen)
        return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                "loss_mask": torch.ones(mbs, seq, device=dev),
                "position_ids": torch.arange(seq, device=dev).expand(mbs, seq)}  # fmt: skip

    fwd = make_sft_forward_step(groups.pg_collection.tp)
    times, losses = [], []
    if sz.cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(3 + args.steps):
        mbs_list = [batch() for _ in range(nmb)]
        _sync()
        t0 = time.perf_counter()
        metrics = train_step(engine, fwd, iter(mbs_list), nmb, seq, mbs)
        _sync()
        losses.append(metrics["lm_loss"])
        if i >= 3:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = mbs * nmb * seq
    head_dim = d // heads
    n_matmul = L * (d * heads * head_dim + 2 * d * groups_kv * head_dim + heads * head_dim * d + 3 * d * ffn)
    n_matmul += model.embedding.word_embeddings.weight.shape[0] * d  # the (tied) output layer
    attn = 12 * L * seq * heads * head_dim
    mfu = tokens * (6 * n_matmul + attn) / step_s / (PEAK_TFLOPS * 1e12)
    state["student_tokens_per_s"] = tokens / step_s
    out = {
        "model": {"layers": L, "hidden": d, "heads": heads, "kv_heads": groups_kv, "ffn": ffn, "vocab": vocab,
                  "params": n_params, "matmul_params_N": n_matmul, "seq": seq, "micro_batch_size": mbs,
                  "num_microbatches": nmb, "recompute": args.recompute},
        "kernel_selection": [x for x in lines if x.startswith("kernel selection:")],
        "step_time_s": round(step_s, 4), "tokens_per_s": round(tokens / step_s, 1),
        "mfu": round(mfu, 4), "mfu_causal_attention": round(tokens * (6 * n_matmul + attn / 2) / step_s / (PEAK_TFLOPS * 1e12), 4),
        "peak_tflops": PEAK_TFLOPS, "peak_source": PEAK_SOURCE,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if sz.cuda else None,
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
        "goal_mfu_ge_0.45": mfu >= GOALS["mfu"],
    }  # fmt: skip
    del engine, model
    teardown_roles()
    return out


# --------------------------------------------------------------------------------------------------
# 4. cache reader feeding the GPU


def cache_reader(args, sz: Sizes, state: dict) -> dict:
    try:
        import numpy as np

        from rgkd_megatron.cache.format import ShardArrays
        from rgkd_megatron.cache.manifest import new_identity
        from rgkd_megatron.cache.reader import TeacherCacheReader
        from rgkd_megatron.cache.writer import CacheWriter
    except ImportError as exc:
        return {"skipped": f"cache module not available ({exc})"}

    c = sz.cache
    k, seq, n_samples, b = 64, c["seq"], c["samples"], c["batch"]
    with tempfile.TemporaryDirectory(prefix="gpu_check_cache_") as tmp:
        identity, offsets = new_identity(
            teacher={"fingerprint": "synthetic"}, tokenizer_fingerprint="synthetic", vocab_size=128256,
            dataset={"fingerprint": "synthetic"}, lengths=np.full(n_samples, seq + 1), k=k, temperature=1.0,
            dtype="fp16", seq_length=seq, rows_per_shard=c["rows_per_shard"], block_rows=c["block_rows"],
            build={"micro_batch_size": 1, "num_microbatches": 1, "pad_multiple": 8, "tp": 1, "pp": 1, "device": "gpu_check"},
        )  # fmt: skip
        writer = CacheWriter(tmp, identity, offsets)
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        for i in writer.prepare():
            n = writer.plan[i]["num_rows"]
            lp = np.sort(-rng.exponential(1.0, (n, k)).astype(np.float16) - 1.0, axis=1)[:, ::-1].copy()
            ids = rng.integers(0, 128256, (n, k), dtype=np.int32)
            writer.commit(i, ShardArrays(lp, ids, np.zeros(n, np.float32), np.full(n, 0.4, np.float32)))
        writer.finalize()
        write_s = time.perf_counter() - t0
        reader = TeacherCacheReader(tmp, verify="blocks")
        order = np.random.default_rng(1).permutation(n_samples)
        batches = [{"sample_ids": np.repeat(order[i : i + b, None], seq, 1),
                    "position_ids": np.tile(np.arange(seq), (b, 1))} for i in range(0, n_samples, b)]  # fmt: skip

        def evict():
            for name in os.listdir(tmp):
                if name.endswith(".bin"):
                    fd = os.open(os.path.join(tmp, name), os.O_RDONLY)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)

        def gather_pass():
            t = time.perf_counter()
            for batch in batches:
                reader.gather(batch["sample_ids"], batch["position_ids"])
            return b * seq * len(batches) / (time.perf_counter() - t)

        evict()
        cold = gather_pass()  # includes the first-read crc32 verification of every block
        warm = gather_pass()
        evict()
        t = time.perf_counter()
        for _batch, teacher in reader.prefetch(batches, depth=4):
            for key in ("logprobs", "ids", "tail"):
                teacher[key].pin_memory().to("cuda", non_blocking=True) if sz.cuda else teacher[key].clone()
        _sync()
        to_gpu = b * seq * len(batches) / (time.perf_counter() - t)
        student = state.get("student_tokens_per_s")
        return {
            "rows": int(offsets[-1]), "k": k, "dtype": "fp16", "bytes_per_row": reader.bytes_per_row,
            "write_s": round(write_s, 2), "gather_tokens_per_s_cold": round(cold), "gather_tokens_per_s_warm": round(warm),
            "prefetch_to_gpu_tokens_per_s_cold": round(to_gpu),
            "student_tokens_per_s": None if student is None else round(student),
            "reader_over_student": None if student is None else round(to_gpu / student, 2),
            "note": "one reader thread; cold = pages evicted with posix_fadvise(DONTNEED) first",
        }  # fmt: skip


# --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not (args.smoke and args.allow_cpu):
        print(
            "gpu_check: error: torch.cuda.is_available() is False: this check needs a CUDA GPU",
            file=sys.stderr,
        )
        return 2
    if args.smoke and not cuda:
        global WARMUP
        WARMUP, args.micro_batch_size, args.num_microbatches, args.steps, args.kd_iters = 0, 2, 1, 1, 1
    sz = Sizes(args.smoke, "cuda" if cuda else "cpu")
    started = time.monotonic()
    state: dict = {}
    summary: dict = {
        "benchmark": "gpu_check",
        "smoke": args.smoke,
        "env": _env(),
        "goals": GOALS,
        "sections": {},
    }
    runners = {
        "kernel_correctness": lambda: kernel_correctness(args, sz), "kd_kernels": lambda: kd_kernels(args, sz),
        "student_step": lambda: student_step(args, sz, state), "cache_reader": lambda: cache_reader(args, sz, state),
    }  # fmt: skip
    out_paths = [Path(args.output)] + (
        [Path(os.environ["OUT"], "gpu_check.json")] if os.environ.get("OUT") else []
    )
    for path in out_paths:
        path.parent.mkdir(parents=True, exist_ok=True)

    def write() -> str:
        text = json.dumps(_clean(summary))
        for path in out_paths:  # after every section: partial results survive a kill
            path.write_text(text)
        return text

    for name in [s for s in args.sections.split(",") if s]:
        if name not in runners:
            summary["sections"][name] = {"error": f"unknown section; choose from {sorted(runners)}"}
            continue
        if time.monotonic() - started > args.budget_s:
            summary["sections"][name] = {"skipped": f"time budget ({args.budget_s:.0f} s) spent"}
            continue
        t0 = time.monotonic()
        try:
            summary["sections"][name] = runners[name]()
        except Exception as exc:  # noqa: BLE001 - record and go on with the next section
            summary["sections"][name] = {
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-3000:],
            }
        summary["sections"][name]["wall_s"] = round(time.monotonic() - t0, 1)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        write()
        print(f"gpu_check: {name} done in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    summary["wall_s"] = round(time.monotonic() - started, 1)
    print(write())
    return 0


def _clean(obj):
    """JSON-safe: non-finite floats (CPU smoke runs have no peak memory) become null."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


if __name__ == "__main__":
    sys.exit(main())
