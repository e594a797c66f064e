"""Few-row products against large weights on the CPU: ``x @ W^T`` (megatron's and transformers'
orientation) vs ``(W @ x^T)^T`` (what ``parallel.cpu_shortcuts.no_grad_product`` takes for 2-8
rows against fp32 weights of 16 MiB or more when its own quick measurement finds it faster), fp32,
one process.

For each weight shape [N, K] and row count M: the median time of each orientation over alternated
repeats, the ratio (``x @ W^T`` time / weight-major time), the largest relative difference of each
result to a float64 product, which orientation ``no_grad_product`` chose (``RGKD_CPU_SKINNY_GEMM``
as set, ``auto`` by default) and its speedup over ``x @ W^T`` as this benchmark's longer timing
measures it (< 1 means the quick choice was wrong). The LAST line printed is a JSON object.

    OMP_NUM_THREADS=1 python benchmarks/skinny_gemm.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ["CUDA_VISIBLE_DEVICES"] = ""
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

SHAPES = ((49152, 576), (32000, 1024), (32000, 2048), (151936, 896), (1728, 576), (3072, 576))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--rows", default="1,2,3,4,6,8", help="row counts M")
    p.add_argument("--repeats", type=int, default=7, help="alternated timings per orientation (median)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch default")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from rgkd_megatron.parallel.cpu_shortcuts import (
        WEIGHT_MAJOR_MIN_BYTES,
        WEIGHT_MAJOR_ROWS,
        time_orientations,
        weight_major_chosen,
        weight_major_product,
    )

    g = torch.Generator().manual_seed(0)
    rows = [int(m) for m in args.rows.split(",")]
    results = []
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=g)
        big = w.numel() * 4 >= WEIGHT_MAJOR_MIN_BYTES
        for m in rows:
            x = torch.randn(m, k, generator=g)
            ref = (x.double() @ w.double().t()).float()
            input_major, weight_major = x @ w.t(), weight_major_product(x, w)  # also the warm-up
            scale = ref.abs().max().item()
            t_in, t_w = (statistics.median(t) * 1e3 for t in time_orientations(x, w, args.repeats))
            chosen = big and m in WEIGHT_MAJOR_ROWS and weight_major_chosen(x, w)  # its own quick measurement
            results.append({
                "n": n, "k": k, "m": m, "weight_mib": round(w.numel() * 4 / 2**20, 1),
                "input_major_ms": round(t_in, 3), "weight_major_ms": round(t_w, 3),
                "weight_major_speedup": round(t_in / t_w, 3), "shortcut_takes_weight_major": chosen,
                "shortcut_eligible": big and m in WEIGHT_MAJOR_ROWS,
                "shortcut_speedup": round(t_in / (t_w if chosen else t_in), 3),
                "max_rel_diff_input_major": (input_major - ref).abs().max().item() / scale,
                "max_rel_diff_weight_major": (weight_major - ref).abs().max().item() / scale,
            })  # fmt: skip
            r = results[-1]
            print(
                f"W [{n:>6}, {k:>4}] {r['weight_mib']:>6.1f} MiB  M={m}: x@W^T {t_in:8.2f} ms  W@x^T {t_w:8.2f} ms  "
                f"x{r['weight_major_speedup']:.2f}  {'<- shortcut' if chosen else ''}"
            )
    eligible = [r for r in results if r["shortcut_eligible"]]
    speedups = [r["shortcut_speedup"] for r in eligible]
    summary = {
        "benchmark": "skinny_gemm",
        "torch_threads": torch.get_num_threads(),
        "orientation_env": os.environ.get("RGKD_CPU_SKINNY_GEMM", "auto"),
        "shortcut_takes_weight_major": sum(r["shortcut_takes_weight_major"] for r in eligible),
        "shortcut_eligible": len(eligible),
        # over the eligible shapes; 1.0 where the shortcut keeps x @ W^T
        "shortcut_speedup_min": min(speedups, default=None),
        "shortcut_speedup_median": statistics.median(speedups) if speedups else None,
        "max_rel_diff_weight_major": max(r["max_rel_diff_weight_major"] for r in results),
        "max_rel_diff_input_major": max(r["max_rel_diff_input_major"] for r in results),
        "results": results,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
