"""Few-row products against large weights on the CPU, fp32, one process: megatron's and
transformers' ``x @ W^T``, the weight-major ``(W @ x^T)^T`` and the same product in blocks of
~576 KiB of W per torch thread (``blocked_product``): the three that ``no_grad_product``
(``rgkd_megatron/parallel/cpu_shortcuts.py``) chooses among for 2-8 rows against fp32 weights of
1 MiB or more, by its own quick measurement.

For each weight shape [N, K] and row count M: the median time of each product over alternated
repeats, the speedup of each alternative over ``x @ W^T``, the largest relative difference of each
result to a float64 product (and whether ``blocked`` equals ``x @ W^T`` bit for bit), which product
``no_grad_product`` chose (``RGKD_CPU_SKINNY_GEMM`` as set, ``auto`` by default) and its speedup over
``x @ W^T`` as this benchmark's longer timing measures it (< 1 means the quick choice was wrong).
The LAST line printed is a JSON object.

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

# vocabulary projections of SmolLM2 / Llama-2 / Qwen2 shapes, then the SmolLM2 student's layers
SHAPES = (
    (49152, 576), (32000, 1024), (32000, 2048), (151936, 896), (3072, 576), (576, 1536), (960, 576),
    (576, 576),
)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--rows", default="1,2,3,4,6,8", help="row counts M")
    p.add_argument("--repeats", type=int, default=7, help="alternated timings per product (median)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch default")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from rgkd_megatron.parallel.cpu_shortcuts import (
        SKINNY_MIN_BYTES,
        SKINNY_PRODUCTS,
        SKINNY_ROWS,
        blocked_product,
        skinny_product_choice,
        time_products,
        weight_major_product,
    )

    g = torch.Generator().manual_seed(0)
    rows = [int(m) for m in args.rows.split(",")]
    results = []
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=g)
        big = w.numel() * 4 >= SKINNY_MIN_BYTES
        for m in rows:
            x = torch.randn(m, k, generator=g)
            ref = (x.double() @ w.double().t()).float()
            out = {"input": x @ w.t(), "weight": weight_major_product(x, w), "blocked": blocked_product(x, w)}
            scale = ref.abs().max().item()
            ms = {name: statistics.median(t) * 1e3 for name, t in time_products(x, w, args.repeats).items()}
            eligible = big and m in SKINNY_ROWS
            chosen = skinny_product_choice(x, w) if eligible else "input"  # its own quick measurement
            results.append({
                "n": n, "k": k, "m": m, "weight_mib": round(w.numel() * 4 / 2**20, 1),
                **{f"{name}_ms": round(t, 3) for name, t in ms.items()},
                "weight_major_speedup": round(ms["input"] / ms["weight"], 3),
                "blocked_speedup": round(ms["input"] / ms["blocked"], 3),
                "shortcut_eligible": eligible, "shortcut_takes": chosen,
                "shortcut_speedup": round(ms["input"] / ms[chosen], 3),
                "blocked_equals_input": bool(torch.equal(out["blocked"], out["input"])),
                **{f"max_rel_diff_{name}": (t - ref).abs().max().item() / scale for name, t in out.items()},
            })  # fmt: skip
            r = results[-1]
            print(
                f"W [{n:>6}, {k:>4}] {r['weight_mib']:>6.1f} MiB  M={m}: x@W^T {ms['input']:8.3f} ms  "
                f"W@x^T {ms['weight']:8.3f} ms (x{r['weight_major_speedup']:.2f})  blocked {ms['blocked']:8.3f} ms "
                f"(x{r['blocked_speedup']:.2f})  {'<- ' + chosen if eligible else ''}"
            )
    eligible = [r for r in results if r["shortcut_eligible"]]
    speedups = [r["shortcut_speedup"] for r in eligible]
    summary = {
        "benchmark": "skinny_gemm",
        "torch_threads": torch.get_num_threads(),
        "product_env": os.environ.get("RGKD_CPU_SKINNY_GEMM", "auto"),
        "shortcut_eligible": len(eligible),
        "shortcut_takes": {
            name: sum(r["shortcut_takes"] == name for r in eligible) for name in SKINNY_PRODUCTS
        },
        # over the eligible shapes; 1.0 where the shortcut keeps x @ W^T
        "shortcut_speedup_min": min(speedups, default=None),
        "shortcut_speedup_median": statistics.median(speedups) if speedups else None,
        "blocked_equals_input_everywhere": all(r["blocked_equals_input"] for r in results),
        **{
            f"max_rel_diff_{name}": max(r[f"max_rel_diff_{name}"] for r in results)
            for name in SKINNY_PRODUCTS
        },
        "results": results,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
