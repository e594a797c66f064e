"""Inspect a teacher top-k cache: verify its checksums, report its size and how much mass the top-k covers.

Prints the manifest summary (teacher, tokenizer, vocabulary, k, temperature, dtype, format version,
samples, rows, shards), the storage cost (bytes per token, vs a dense fp16 distribution of the same
vocabulary), for q8 caches the quantisation error bound of the stored log-probs (largest and mean
per-row bound ``max(s / 2, |m - fp16(m)|)`` over the histogram rows, ``cache/format.py``),
the verification result (sha256 of every shard and of the row index, crc32 of every block, headers
and sizes), and a histogram of the per-token top-k probability mass ``sum_i exp(logprob_i)``.

Usage::

    python tools/inspect_cache.py runs/cache/train                  # verify + report; exit 1 if corrupt
    python tools/inspect_cache.py runs/cache/train --no-verify --max-rows 100000 --json
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from rgkd_megatron.utils.cli_errors import cli_main
from rgkd_megatron.utils.cli_flags import add_common_flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inspect_cache", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("cache", help="teacher cache directory (holding manifest.json)")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the sha256 / crc32 verification (sizes and headers are still checked)",
    )
    p.add_argument(
        "--bins", type=int, default=10, help="histogram bins over [0, 1] of the top-k probability mass"
    )
    p.add_argument(
        "--max-rows",
        type=int,
        default=1_000_000,
        help="rows used for the histogram (evenly strided over the cache)",
    )
    p.add_argument(
        "--json", action="store_true", help="also print the statistics as a JSON object on the last line"
    )
    return add_common_flags(p)


def _topk_mass(logprobs: np.ndarray, dtype: str) -> np.ndarray:
    """Per-row sum of exp(log-prob) of decoded rows (bf16 arrives as raw bits)."""
    if dtype == "bf16":  # raw bits -> fp32
        logprobs = (logprobs.astype(np.uint32) << 16).view(np.float32)
    return np.exp(logprobs.astype(np.float32)).sum(-1)


def inspect(directory: str, verify: bool = True, bins: int = 10, max_rows: int = 1_000_000) -> dict:
    """Statistics of a cache (raises CacheCorruptionError / ValueError on a bad cache when verifying)."""
    from rgkd_megatron.cache.codec import q8_error_bound
    from rgkd_megatron.cache.reader import TeacherCacheReader

    reader = TeacherCacheReader(directory, verify="blocks" if verify else "none")
    if verify:  # sha256 of every shard, then (below) the crc32 of every block as it is read
        reader.verify_checksums(mark_verified=False)
    m = reader.manifest
    stride = max(1, -(-reader.num_rows // max(1, max_rows)))
    masses, tails, bounds = [], [], []
    for s in range(reader.num_shards):
        first = m["shards"][s]["first_row"]
        rows = np.arange((-first) % stride, m["shards"][s]["num_rows"], stride)
        logprobs, _, _, tail = reader.shard_columns(s, rows)  # crc32 of every block checked here
        masses.append(_topk_mass(logprobs, m["dtype"]))
        tails.append(np.asarray(tail, dtype=np.float32))
        if m["dtype"] == "q8":
            bounds.append(q8_error_bound(reader.shard_sections(s)["qparams"][rows]))
    bound = np.concatenate(bounds) if bounds else np.zeros(0, np.float32)
    mass = np.concatenate(masses) if masses else np.zeros(0, np.float32)
    tail = np.concatenate(tails) if tails else np.zeros(0, np.float32)
    counts, edges = np.histogram(np.clip(mass.astype(np.float64), 0.0, 1.0), bins=bins, range=(0.0, 1.0))
    total_bytes = sum(e["size"] for e in m["shards"]) + m["row_index"]["size"]
    rows = max(1, reader.num_rows)
    return {
        "cache": directory,
        "verified": verify,
        "teacher_fingerprint": m["teacher"].get("fingerprint"),
        "teacher_source": m["teacher"].get("source"),
        "tokenizer_fingerprint": m["tokenizer_fingerprint"],
        "dataset_fingerprint": m["dataset"]["fingerprint"],
        "vocab_size": m["vocab_size"],
        "k": m["k"],
        "temperature": m["temperature"],
        "dtype": m["dtype"],
        "format_version": reader.format_version,
        "ids_dtype": m.get("ids_dtype"),
        "seq_length": m["seq_length"],
        "samples": reader.num_samples,
        "rows": reader.num_rows,
        "shards": reader.num_shards,
        "bytes": total_bytes,
        "bytes_per_token": total_bytes / rows,
        "dense_fp16_bytes_per_token": 2 * m["vocab_size"],
        "fraction_of_dense_fp16": total_bytes / rows / (2 * m["vocab_size"]),
        "histogram_rows": int(mass.size),
        "q8_error_bound_max": float(bound.max()) if bound.size else None,
        "q8_error_bound_mean": float(bound.mean()) if bound.size else None,
        "topk_mass_mean": float(mass.mean()) if mass.size else float("nan"),
        "tail_mass_mean": float(tail.mean()) if tail.size else float("nan"),
        "max_abs_mass_plus_tail_minus_1": float(np.abs(mass + tail - 1).max()) if mass.size else 0.0,
        "histogram": {"edges": edges.round(6).tolist(), "counts": counts.tolist()},
    }


def _report(stats: dict) -> str:
    lines = [
        f"cache        {stats['cache']}",
        f"teacher      {str(stats['teacher_fingerprint'])[:16]}... ({stats['teacher_source']})",
        f"tokenizer    {stats['tokenizer_fingerprint'][:16]}...   dataset {stats['dataset_fingerprint'][:16]}...",
        f"vocab        {stats['vocab_size']}   k {stats['k']}   T {stats['temperature']}   dtype {stats['dtype']}   "
        f"seq_length {stats['seq_length']}",
        f"format       version {stats['format_version']}   ids {stats['ids_dtype']}   " + _bound_line(stats),
        f"samples      {stats['samples']}   tokens {stats['rows']}   shards {stats['shards']}   "
        f"{stats['bytes'] / 2**20:.2f} MiB",
        f"bytes/token  {stats['bytes_per_token']:.1f}  (dense fp16: {stats['dense_fp16_bytes_per_token']}, "
        f"{100 * stats['fraction_of_dense_fp16']:.3f}%)",
        f"checksums    {'OK (sha256 of every shard and the row index, crc32 of every block)' if stats['verified'] else 'not verified (--no-verify)'}",
        f"top-k mass   mean {stats['topk_mass_mean']:.4f}, tail mean {stats['tail_mass_mean']:.4f} "
        f"over {stats['histogram_rows']} tokens; |mass + tail - 1| <= {stats['max_abs_mass_plus_tail_minus_1']:.2e}",
    ]
    counts, edges = stats["histogram"]["counts"], stats["histogram"]["edges"]
    total = max(1, sum(counts))
    for c, lo, hi in zip(counts, edges[:-1], edges[1:]):
        lines.append(
            f"  [{lo:.2f}, {hi:.2f}{']' if hi == 1.0 else ')'} {'#' * round(40 * c / total):<40} {100 * c / total:5.1f}%"
        )
    return "\n".join(lines)


def _bound_line(stats: dict) -> str:
    if stats["q8_error_bound_max"] is None:
        return f"log-probs stored as {stats['dtype']} (rounding of that type, no quantisation)"
    return (
        f"q8 log-prob error <= {stats['q8_error_bound_max']:.4f} nats (row bound; mean "
        f"{stats['q8_error_bound_mean']:.4f})"
    )


@cli_main("inspect_cache")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.bins < 1 or args.max_rows < 1:
        print("inspect_cache: error: --bins and --max-rows must be >= 1", file=sys.stderr)
        return 2
    try:
        stats = inspect(args.cache, verify=not args.no_verify, bins=args.bins, max_rows=args.max_rows)
    except (ValueError, OSError) as exc:
        print(f"inspect_cache: FAILED: {exc}", file=sys.stderr)
        return 1
    print(_report(stats))
    if args.json:
        print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
