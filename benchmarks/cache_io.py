"""Teacher top-k cache: storage vs a dense distribution, reader throughput vs raw memmap, build vs forward.

Three side-by-side ratios (one process; CPU/gloo or one GPU):

    bytes_vs_dense_fp16   cache bytes per token (shards + row index) / (2 * V), a dense fp16 distribution
    reader_vs_raw         TeacherCacheReader.get over every sample in random order, new output tensors
                          (default verification, blocks already verified: the steady state of training;
                          decoding the q8 codes and packed ids included, with the compiled one-pass
                          kernel when it is built: JSON native_decode) / the same byte ranges (one per
                          section) copied out of a plain np.memmap of the shard files, same order; both
                          after a warm-up pass, so the page cache is hot for both. Every read path runs
                          once per round, --read-passes alternated rounds; each ratio is the median over
                          the rounds of path vs that round's raw pass (wall time; *_cpu_time: process
                          CPU time). Every path drops each result before its next read, as the raw
                          pass drops its copies and a training loop its batches (until 2026-12-03 the
                          reader paths kept a whole pass's results alive, the raw pass none: the
                          reader paths then also paid the first touch of ~68 MB of fresh pages per
                          pass, about half of get's time). The other paths (JSON "paths"): get into
                          one reused buffer (reader_reuse), gather [8, S] with new buffers (gather:
                          the trainer's path with the loss on the CPU) and into reused ones
                          (gather_reuse), the prefetch
                          ring (prefetch_reuse), the stored payload of a sample without decoding
                          (reader_compact) and decoded on the CPU (reader_compact_decode), and the
                          trainer's GPU path (pbkd CachedTeacher.buckets): gather_compact [8, S], the
                          batch's stored bytes staged for the host-to-device copy, decoded on the GPU
                          (gather_compact: the host side), and the same payload decoded on the CPU
                          (gather_compact_decode; with the loss on the CPU the trainer calls gather);
                          get and gather with the numpy / torch q8 decode instead of the compiled
                          one-pass kernel (reader_fallback, gather_fallback; RGKD_CACHE_NATIVE=0);
                          the first pass with crc32 verification (reader_first_pass_vs_raw).
    build_vs_forward      build_teacher_cache (teacher forward + vocab-parallel top-k/lse/tail + copy to
                          host + shard writes with sha256/crc32/fsync + manifest) / the teacher forward
                          alone over exactly the same canonical micro-batches (same schedule, same
                          padding, logits discarded). Min over --repeats alternated runs, in wall time
                          and (less sensitive to other processes on a shared CPU) process CPU time.

The teacher is a random-init Llama-style GPTModel on megatron-core; the dataset is random tokens. The
ratio build/forward depends on the model size relative to the vocabulary: the defaults are a small
model (so the vocabulary-side work weighs more than it would for a real 7B-70B teacher).

Usage:
    python benchmarks/cache_io.py                      # defaults below, ~1-2 min on 2 CPU cores
    python benchmarks/cache_io.py --hidden 1024 --layers 16 --vocab 128256 --samples 64   # e.g. on a GPU
Prints a table, then a JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--vocab", type=int, default=32_000, help="vocabulary size V")
    p.add_argument("--hidden", type=int, default=512, help="teacher hidden size")
    p.add_argument("--layers", type=int, default=8, help="teacher layers")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--ffn", type=int, default=1408, help="SwiGLU inner size")
    p.add_argument("--seq-length", type=int, default=512, help="tokens per sample")
    p.add_argument("--samples", type=int, default=8, help="samples in the synthetic dataset (build timing)")
    p.add_argument("--read-samples", type=int, default=256, help="samples in the reader-throughput cache")
    p.add_argument("--k", type=int, default=64, help="top-k")
    p.add_argument("--dtype", default="q8", choices=("q8", "fp16", "bf16", "fp32"), help="log-prob storage")
    p.add_argument("--micro-batch-size", type=int, default=4, help="samples per teacher forward")
    p.add_argument("--rows-per-shard", type=int, default=1 << 20, help="rows per shard")
    p.add_argument("--repeats", type=int, default=3, help="alternated forward/build runs (min reported)")
    p.add_argument(
        "--read-passes", type=int, default=7, help="alternated rounds of every read path (medians)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir, removed)")
    return p.parse_args(argv)


def _dataset(prefix: str, samples: int, seq_length: int, vocab: int, seed: int):
    from rgkd_megatron.data.indexed_dataset import IndexedDataset, write_indexed_dataset

    rng = np.random.default_rng(seed)
    rows = [(rng.integers(0, vocab, seq_length + 1).tolist(), 1) for _ in range(samples)]
    write_indexed_dataset(prefix, rows, "benchmark-tokenizer", "benchmark-source", vocab)
    return IndexedDataset(prefix)


def _time_build_and_forward(args, work: str) -> dict:
    import torch
    import torch.distributed as dist

    from rgkd_megatron.cache.builder import (
        BuildOptions,
        build_identity,
        build_teacher_cache,
        run_teacher_forward,
        shard_calls,
    )
    from rgkd_megatron.config.schema import ModelConfig, ParallelConfig
    from rgkd_megatron.models.builders import build_teacher
    from rgkd_megatron.parallel.groups import layout_for_world
    from rgkd_megatron.parallel.launch import init_distributed
    from rgkd_megatron.training.setup import init_role

    if args.threads:
        torch.set_num_threads(args.threads)
    init_distributed()
    groups = init_role(layout_for_world(1, 1, dist.get_world_size()), seed=1)
    model_cfg = ModelConfig(
        num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn, num_attention_heads=args.heads,
        max_position_embeddings=args.seq_length, make_vocab_size_divisible_by=128, spec="local",
    )  # fmt: skip
    model = build_teacher(model_cfg, ParallelConfig(), groups, args.vocab)
    device = next(model.parameters()).device
    dataset = _dataset(os.path.join(work, "build_ds"), args.samples, args.seq_length, args.vocab, 0)
    options = BuildOptions(
        k=args.k, dtype=args.dtype, seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
        rows_per_shard=args.rows_per_shard, progress=False,
    )  # fmt: skip
    teacher = {"fingerprint": "benchmark", "source": "random_init"}
    identity, offsets = build_identity(options, teacher, dataset, args.vocab, groups.layout, device.type)
    rows = np.diff(offsets)
    from rgkd_megatron.cache.manifest import plan_shards

    plan = plan_shards(rows, options.rows_per_shard)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def discard(batch, logits, non_loss_data=True):
        return None

    def forward_only() -> tuple[float, float]:
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        for shard in plan:
            for batches, length in shard_calls(dataset, shard, rows, options, device):
                run_teacher_forward(model, groups, batches, discard, length)
        sync()
        return time.perf_counter() - start, time.process_time() - cpu

    def build(i: int) -> tuple[float, float]:
        out = os.path.join(work, f"build_{i}")
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        build_teacher_cache(model, groups, dataset, out, options, identity, offsets)
        sync()
        elapsed = time.perf_counter() - start, time.process_time() - cpu
        shutil.rmtree(out)
        return elapsed

    batches, length = next(shard_calls(dataset, plan[0], rows, options, device))  # warm-up
    run_teacher_forward(model, groups, batches[:1], discard, length)
    fwd, bld = [], []
    for i in range(args.repeats):
        fwd.append(forward_only())
        bld.append(build(i))
    dist.destroy_process_group()
    tokens = int(offsets[-1])
    wall_f, wall_b = min(w for w, _ in fwd), min(w for w, _ in bld)
    cpu_f, cpu_b = min(c for _, c in fwd), min(c for _, c in bld)
    return {
        "build_tokens": tokens,
        "forward_only_s": wall_f,
        "build_s": wall_b,
        "build_vs_forward": wall_b / wall_f,
        "forward_only_cpu_s": cpu_f,
        "build_cpu_s": cpu_b,
        "build_vs_forward_cpu_time": cpu_b / cpu_f,
        "build_tokens_per_s": tokens / wall_b,
        "all_forward_s": [round(w, 3) for w, _ in fwd],
        "all_build_s": [round(w, 3) for w, _ in bld],
    }


def _write_read_cache(args, work: str) -> str:
    """A cache with the benchmark's k/dtype over --read-samples samples (synthetic rows)."""
    import torch

    from rgkd_megatron.cache.codec import encode_logprobs
    from rgkd_megatron.cache.format import ShardArrays
    from rgkd_megatron.cache.manifest import new_identity
    from rgkd_megatron.cache.writer import CacheWriter

    lengths = np.full(args.read_samples, args.seq_length + 1)
    identity, offsets = new_identity(
        teacher={"fingerprint": "benchmark"}, tokenizer_fingerprint="benchmark-tokenizer", vocab_size=args.vocab,
        dataset={"fingerprint": "benchmark-read"}, lengths=lengths, k=args.k, temperature=1.0, dtype=args.dtype,
        seq_length=args.seq_length, rows_per_shard=min(args.rows_per_shard, 64 * args.seq_length), block_rows=1024,
        build={},
    )  # fmt: skip
    directory = os.path.join(work, "read_cache")
    writer = CacheWriter(directory, identity, offsets)
    writer.prepare()
    rng = np.random.default_rng(0)  # values do not matter for I/O: random sorted log-probs and ids
    for i, shard in enumerate(writer.plan):
        n = shard["num_rows"]
        logprobs = -torch.from_numpy(np.sort(rng.exponential(2.0, (n, args.k)).astype(np.float32), axis=1))
        ids = rng.integers(0, args.vocab, (n, args.k), dtype=np.int32)
        lse, tail = rng.normal(size=n).astype(np.float32), rng.random(n).astype(np.float32)
        writer.commit(i, ShardArrays(encode_logprobs(logprobs, args.dtype), ids, lse, tail))
    writer.finalize()
    return directory


def _time_reads(args, directory: str) -> dict:
    """Reader paths vs a raw memmap copy of the same bytes, in alternated passes (module docstring)."""
    from rgkd_megatron.cache.codec import native_decode
    from rgkd_megatron.cache.manifest import layout_of
    from rgkd_megatron.cache.reader import TeacherCacheReader

    reader = TeacherCacheReader(directory)
    order = np.random.default_rng(1).permutation(reader.num_samples)
    m = reader.manifest
    # raw: the same byte ranges per sample (one per section) out of plain memmaps of the shard files
    raw_maps, ranges = [], []
    for e in m["shards"]:
        raw_maps.append(np.memmap(os.path.join(directory, e["name"]), dtype=np.uint8, mode="r"))
    shard_of = np.searchsorted([e["first_sample"] for e in m["shards"]], order, side="right") - 1
    for s, i in zip(shard_of, order):
        e = m["shards"][s]
        lay = layout_of(m, e["num_rows"])
        lo, hi = reader.row_offsets[i] - e["first_row"], reader.row_offsets[i + 1] - e["first_row"]
        ranges.append(
            (s, [(sec.offset + sec.nbytes(lo), sec.offset + sec.nbytes(hi)) for sec in lay.sections])
        )
    payload = sum(b - a for _, rs in ranges for a, b in rs)
    # batches as the trainer asks for them: [b=8, s=seq_length], one sample per row
    mbs = 8
    pos = np.tile(np.arange(args.seq_length), (mbs, 1))
    batches = [
        {"sample_ids": np.repeat(order[j : j + mbs, None], args.seq_length, axis=1), "position_ids": pos}
        for j in range(0, len(order) - mbs + 1, mbs)
    ]
    gather_bytes = payload * len(batches) * mbs / len(order)
    rows_buf = reader.empty_rows(max(reader.num_rows_of(int(i)) for i in order))
    batch_buf = reader.empty_batch(mbs, args.seq_length)

    def timed(fn) -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - start, time.process_time() - cpu

    def raw_pass() -> None:
        for s, rs in ranges:
            mm = raw_maps[s]
            for a, b in rs:
                np.array(mm[a:b])

    def each(fn, items) -> None:
        """``fn`` over ``items``, each result dropped before the next read (as a training loop drops a
        batch after its step; the raw pass drops its copies the same way)."""
        for item in items:
            fn(item)

    def with_fallback_decode(fn) -> None:
        """``fn`` with the numpy / torch q8 decode (RGKD_CACHE_NATIVE=0) instead of the compiled one."""
        before = os.environ.get("RGKD_CACHE_NATIVE")
        os.environ["RGKD_CACHE_NATIVE"] = "0"
        try:
            fn()
        finally:
            if before is None:
                del os.environ["RGKD_CACHE_NATIVE"]
            else:
                os.environ["RGKD_CACHE_NATIVE"] = before

    ids = [int(i) for i in order]
    passes = {
        "raw": raw_pass,
        "get": lambda: each(reader.get, ids),
        "get_reuse": lambda: each(lambda i: reader.get(i, out=rows_buf), ids),
        "get_fallback": lambda: with_fallback_decode(lambda: each(reader.get, ids)),
        "gather_fallback": lambda: with_fallback_decode(
            lambda: each(lambda b: reader.gather(b["sample_ids"], b["position_ids"]), batches)
        ),
        "gather": lambda: each(lambda b: reader.gather(b["sample_ids"], b["position_ids"]), batches),
        "gather_reuse": lambda: each(lambda b: reader.gather(b["sample_ids"], b["position_ids"], out=batch_buf), batches),
        "prefetch_reuse": lambda: each(lambda item: None, reader.prefetch(batches, depth=2, reuse_buffers=True)),
        "get_compact": lambda: each(reader.get_compact, ids),
        "get_compact_decode": lambda: each(lambda i: reader.get_compact(i).decode(), ids),
        "gather_compact": lambda: each(lambda b: reader.gather_compact(b["sample_ids"], b["position_ids"]), batches),
        "gather_compact_decode": lambda: each(
            lambda b: reader.gather_compact(b["sample_ids"], b["position_ids"]).decode(), batches
        ),
    }  # fmt: skip
    raw_pass()  # page cache warm for both
    first = timed(passes["get"])[0]  # includes the crc32 verification of every block
    raw_first = timed(raw_pass)[0]
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in passes}
    for _ in range(args.read_passes):  # alternated, so a change of machine speed hits every path
        for name, fn in passes.items():
            times[name].append(timed(fn))
    per_byte = {
        name: (gather_bytes if name.startswith(("gather", "prefetch")) else payload) for name in passes
    }

    def ratios(name: str, clock: int) -> list[float]:
        """Per round: (bytes / time of the path) / (bytes / time of that round's raw pass)."""
        raw = [t[clock] for t in times["raw"]]
        return [(per_byte[name] / t[clock]) / (payload / r) for t, r in zip(times[name], raw)]

    out = {"read_payload_bytes": int(payload), "read_passes": args.read_passes}
    for name, key in [("raw", "raw_memmap"), ("get", "reader"), ("get_reuse", "reader_reuse"), ("get_fallback", "reader_fallback"), ("gather", "gather"), ("gather_fallback", "gather_fallback"),
                      ("gather_reuse", "gather_reuse"), ("prefetch_reuse", "prefetch_reuse"),
                      ("get_compact", "reader_compact"), ("get_compact_decode", "reader_compact_decode"),
                      ("gather_compact", "gather_compact"), ("gather_compact_decode", "gather_compact_decode")]:  # fmt: skip
        out[f"{key}_gb_per_s"] = per_byte[name] / float(np.median([t[0] for t in times[name]])) / 1e9
        if name != "raw":
            out[f"{key}_vs_raw"] = float(np.median(ratios(name, 0)))
            out[f"{key}_vs_raw_cpu_time"] = float(np.median(ratios(name, 1)))
    out["reader_first_pass_vs_raw"] = raw_first / first
    out["paths"] = {
        "reader": "get(i) per sample, new output tensors (the definition of reader_vs_raw since issue 17)",
        "reader_reuse": "get(i, out=buf), one reused buffer",
        "reader_fallback": "get(i) with the numpy / torch q8 decode (RGKD_CACHE_NATIVE=0) instead of the "
        "compiled one-pass decode (rgkd_megatron.cache._rowdecode, used by every other decoding path)",
        "gather_fallback": "gather [8, S] with the numpy / torch q8 decode (RGKD_CACHE_NATIVE=0)",
        "gather": "gather [8, S], new buffers: the trainer's path when the loss runs on the CPU (pbkd "
        "CachedTeacher.buckets)",
        "gather_reuse": "gather [8, S] into one reused set of buffers",
        "prefetch_reuse": "prefetch(depth=2, reuse_buffers=True), gathering in its thread",
        "reader_compact": "get_compact(i): the stored bytes copied, NOT decoded (decode deferred to the "
        "consumer's device)",
        "reader_compact_decode": "get_compact(i).decode() on the CPU",
        "gather_compact": "gather_compact [8, S]: the stored bytes of the batch staged, NOT decoded: the host "
        "side of the trainer's path (pbkd CachedTeacher.buckets) when the loss runs on a GPU, which copies "
        "them to the device and decodes there",
        "gather_compact_decode": "gather_compact [8, S] then .decode() on the CPU (staging copy + CPU decode; "
        "on the CPU the trainer calls gather, which decodes the same rows without the staging copy)",
        "ratios": "medians over --read-passes rounds of (path bytes/s) / (raw bytes/s of the same round); "
        "*_cpu_time: the same with process CPU time",
    }
    out["native_decode"] = native_decode()
    out["all_vs_raw"] = {name: [round(x, 3) for x in ratios(name, 0)] for name in passes if name != "raw"}
    return {
        **out,
        "bytes_per_token": reader.bytes_per_row + m["row_index"]["size"] / reader.num_rows,
    }


def main(argv=None) -> dict:
    args = _parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="cache_io_")
    os.makedirs(work, exist_ok=True)
    try:
        build = _time_build_and_forward(args, work)
        reads = _time_reads(args, _write_read_cache(args, work))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    dense = 2 * args.vocab
    result = {
        "vocab": args.vocab, "k": args.k, "dtype": args.dtype, "seq_length": args.seq_length,
        "teacher": f"{args.layers}x{args.hidden} (ffn {args.ffn}, {args.heads} heads)",
        "bytes_per_token": reads["bytes_per_token"], "dense_fp16_bytes_per_token": dense,
        "bytes_vs_dense_fp16": reads["bytes_per_token"] / dense,
        **{k: v for k, v in reads.items() if k != "bytes_per_token"}, **build,
        "goals": {"reader_vs_raw": ">= 0.5", "build_vs_forward": "<= 1.10"},
    }  # fmt: skip
    print(
        f"{'bytes/token':<28}{result['bytes_per_token']:>12.1f}   dense fp16 {dense} ({100 * result['bytes_vs_dense_fp16']:.2f}%)"
    )
    print(f"{'raw memmap read':<28}{reads['raw_memmap_gb_per_s']:>12.2f} GB/s")
    print(
        f"{'reader.get (verified)':<28}{reads['reader_gb_per_s']:>12.2f} GB/s   {reads['reader_vs_raw']:.2f}x raw"
    )
    print(f"{'reader.get (first, crc32)':<28}{'':>12}        {reads['reader_first_pass_vs_raw']:.2f}x raw")
    for label, key in [("reader.get, fallback decode", "reader_fallback"),
                       ("reader.gather [8, S]", "gather"), ("  fallback decode", "gather_fallback"),
                       ("reader.get into a buffer", "reader_reuse"),
                       ("gather into buffers", "gather_reuse"), ("prefetch ring", "prefetch_reuse"),
                       ("get_compact (no decode)", "reader_compact"),
                       ("gather_compact (GPU path)", "gather_compact"),
                       ("  + CPU decode", "gather_compact_decode")]:  # fmt: skip
        print(f"{label:<28}{reads[key + '_gb_per_s']:>12.2f} GB/s   {reads[key + '_vs_raw']:.2f}x raw")
    print(
        f"{'teacher forward only':<28}{build['forward_only_s']:>12.3f} s   ({build['build_tokens']} tokens)"
    )
    print(f"{'cache build':<28}{build['build_s']:>12.3f} s   {build['build_vs_forward']:.3f}x forward, "
          f"{build['build_tokens_per_s']:.0f} tokens/s")  # fmt: skip
    print(
        f"{'  process CPU time':<28}{build['build_cpu_s']:>12.3f} s   {build['build_vs_forward_cpu_time']:.3f}x "
        f"forward ({build['forward_only_cpu_s']:.3f} s)"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
