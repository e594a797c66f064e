"""Precompute the teacher's top-k log-probabilities over a tokenized dataset into a sharded cache.

Runs the teacher (megatron-core GPTModel, inference) under any TP x PP layout, data-parallel over the
remaining ranks, and stores per token its top-k log-probs (sorted; 8-bit codes against the row's
maximum by default, or fp16/bf16/fp32), their ids packed to the bits the vocabulary needs, the
log-sum-exp and the tail mass (``rgkd_megatron/cache``). An existing build in ``--output`` with other
settings is refused before the teacher is loaded. Rerunning the same command after a kill
resumes and produces byte-identical shards; on a complete cache it does nothing.

Usage::

    python tools/preprocess_data.py --input data.jsonl --tokenizer T --output runs/data/train
    python tools/build_teacher_cache.py --data-prefix runs/data/train --teacher ckpts/teacher \\
        --output runs/cache/train --kd-top-k 64 --kd-temperature 1.0
    torchrun --nproc-per-node 8 tools/build_teacher_cache.py ... --tp 4        # TP=4 x DP=2
    python tools/build_teacher_cache.py ... --random-init-seed 1                # tests: random weights

The teacher's architecture is the ``model`` section of ``--model-config`` (a model_config.yaml or an
rgkd recipe; dotted ``model.*`` overrides may follow); fields it does not set come from ``--teacher``
(a megatron checkpoint's ``model_config.yaml`` or a Hugging Face folder's ``config.json``). The
launch flags and the init sequence are ``rgkd_megatron.cli.teacher_launch``'s, shared with
``generate_responses``. ``--kd-top-k`` and ``--kd-temperature`` are ``pbkd.kd_topk`` and
``pbkd.kd_temperature`` of the run that reads the cache (formerly ``--k`` and ``--temperature``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from rgkd_megatron.cache.options import BuildOptions
from rgkd_megatron.cli.teacher_launch import (
    add_launch_flags,
    add_teacher_flags,
    launched_teacher,
    teacher_config,
)
from rgkd_megatron.utils.cli_errors import cli_main
from rgkd_megatron.utils.cli_flags import add_common_flags, deprecated_alias

_DEFAULTS = BuildOptions()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="build_teacher_cache",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = p.add_argument_group("inputs and output")
    io.add_argument(
        "--data-prefix",
        required=True,
        help="tokenized dataset prefix (PREFIX.bin/.idx/.json from tools/preprocess_data.py)",
    )
    weights = io.add_mutually_exclusive_group()  # neither: the model.load of --model-config
    add_teacher_flags(
        io, weights, old_teacher=("--teacher-checkpoint",), old_model_config=("--teacher-config",)
    )
    weights.add_argument(
        "--random-init-seed",
        type=int,
        help="random teacher weights from this seed instead (tests, smoke runs)",
    )
    io.add_argument(
        "--tokenizer",
        default=None,
        help="optional tokenizer file/dir: checked against the dataset's tokenizer fingerprint",
    )
    io.add_argument(
        "--output", required=True, help="cache directory (created; an interrupted build there is resumed)"
    )
    io.add_argument(
        "--overwrite",
        action="store_true",
        help="delete a different or complete cache in --output first (only cache files)",
    )

    what = p.add_argument_group("what is stored")
    what.add_argument(
        "--kd-top-k",
        type=int,
        default=_DEFAULTS.k,
        help="teacher ids stored per token, pbkd.kd_topk of the run (k = vocab size stores the full distribution)",
    )
    deprecated_alias(what, "--k", "--kd-top-k")
    what.add_argument(
        "--kd-temperature",
        type=float,
        default=_DEFAULTS.temperature,
        help="log-probs are of softmax(logits / T), pbkd.kd_temperature of the run",
    )
    deprecated_alias(what, "--temperature", "--kd-temperature")
    what.add_argument(
        "--dtype",
        choices=("q8", "fp16", "bf16", "fp32"),
        default=_DEFAULTS.dtype,
        help="storage of the log-probs: q8 = 8-bit codes against the row's maximum (~199 bytes/token at k=64)",
    )
    what.add_argument(
        "--seq-length",
        type=int,
        default=None,
        help="truncate samples to SEQ+1 tokens (default: model.max_position_embeddings)",
    )
    what.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="shared real vocabulary (default: the dataset's tokenizer size); the teacher's other logits are padding",
    )
    what.add_argument(
        "--rows-per-shard",
        type=int,
        default=_DEFAULTS.rows_per_shard,
        help="target tokens per shard file (whole samples per shard)",
    )
    what.add_argument(
        "--block-rows",
        type=int,
        default=_DEFAULTS.block_rows,
        help="rows per crc32 block (the reader's verification unit)",
    )

    run = p.add_argument_group("how the teacher runs")
    run.add_argument(
        "--micro-batch-size", type=int, default=_DEFAULTS.micro_batch_size, help="samples per teacher forward"
    )
    run.add_argument(
        "--num-microbatches",
        type=int,
        default=None,
        help="micro-batches per schedule call (default: 1, or 2*PP with pipelining)",
    )
    run.add_argument(
        "--pad-multiple",
        type=int,
        default=_DEFAULTS.pad_multiple,
        help="pad each call to its longest sample rounded up to this",
    )
    run.add_argument(
        "--max-shards",
        type=int,
        default=None,
        help="build at most N pending shards, then exit (resumable; for short allocations)",
    )
    add_launch_flags(
        run,
        timeout_minutes=120.0,
        dry_run="check everything and print the plan (shards, rows, bytes) without running the teacher",
        json_help="print the plan or the finished cache's summary as one JSON object",
    )
    return add_common_flags(p)


def _options(args, pp: int) -> BuildOptions:
    per_call = args.num_microbatches or (2 * pp if pp > 1 else 1)
    return BuildOptions(
        k=args.kd_top_k, temperature=args.kd_temperature, dtype=args.dtype, seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size, num_microbatches=per_call, pad_multiple=args.pad_multiple,
        rows_per_shard=args.rows_per_shard, block_rows=args.block_rows, max_shards=args.max_shards,
        progress=not args.no_progress,
    )  # fmt: skip


def _shared_vocab(args, dataset) -> int:
    if args.tokenizer:
        from rgkd_megatron.data.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        if tok.fingerprint != dataset.tokenizer_fingerprint:
            raise ValueError(
                f"--tokenizer: fingerprint {tok.fingerprint[:16]}... differs from the dataset's field "
                f"'tokenizer_fingerprint' {dataset.tokenizer_fingerprint[:16]}... (tokenized with another tokenizer)"
            )
    return args.vocab_size or dataset.vocab_size


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Build as ``args`` say (torch.distributed initialised here); the manifest on rank 0 when
    complete, the plan for a dry run (``"dry_run": True``), else None."""
    import torch

    from rgkd_megatron.cache.builder import build_identity, build_teacher_cache
    from rgkd_megatron.cache.manifest import layout_of, plan_shards, teacher_fingerprint
    from rgkd_megatron.cache.writer import check_existing
    from rgkd_megatron.config import config_to_dict
    from rgkd_megatron.data.indexed_dataset import IndexedDataset
    from rgkd_megatron.models.builders import padded_vocab_size, resolve_params_dtype
    from rgkd_megatron.parallel.groups import RoleLayout

    random_init = args.random_init_seed is not None
    cfg, load = teacher_config(args, args.seq_length, random_init=random_init)
    args.seq_length = cfg.data.seq_length
    dataset = IndexedDataset(args.data_prefix)
    shared_vocab = _shared_vocab(args, dataset)
    model_vocab = cfg.model.vocab_size or shared_vocab
    if shared_vocab > model_vocab:
        raise ValueError(f"--vocab-size {shared_vocab} exceeds the teacher's model.vocab_size {model_vocab}")
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    options = _options(args, pp)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    params_dtype = str(resolve_params_dtype(cfg.model.params_dtype)).replace("torch.", "")
    model_dict = {**config_to_dict(cfg)["model"], "vocab_size": model_vocab, "load": None}
    init = None
    if random_init:  # random weights depend on the seed, the layout and the device
        init = {"seed": args.random_init_seed, "tp": tp, "pp": pp, "device": device}
    teacher = {
        "fingerprint": teacher_fingerprint(model_dict, model_vocab, params_dtype, load, init),
        "source": "checkpoint" if load else "random_init",
        "checkpoint": os.path.abspath(load) if load else None,
        "random_init_seed": args.random_init_seed,
        "model": model_dict,
        "params_dtype": params_dtype,
    }
    # the identity needs nothing of the loaded teacher: check an existing build before loading it
    identity, offsets = build_identity(
        options, teacher, dataset, shared_vocab, RoleLayout(tp=tp, pp=pp), device
    )
    if not args.overwrite:
        check_existing(args.output, identity)
    if args.dry_run:
        plan = plan_shards(offsets[1:] - offsets[:-1], options.rows_per_shard)
        size = sum(layout_of(identity, s["num_rows"]).size for s in plan)
        return {"dry_run": True, "output": args.output, "shards": len(plan), "rows": identity["num_rows"],
                "bytes": size, "teacher_fingerprint": teacher["fingerprint"]}  # fmt: skip

    seed = args.random_init_seed if random_init else 0
    with launched_teacher(args, cfg, load, model_vocab, seed) as (model, groups):
        teacher["padded_vocab_size"] = padded_vocab_size(
            model_vocab, cfg.model.make_vocab_size_divisible_by, tp
        )
        identity, offsets = build_identity(options, teacher, dataset, shared_vocab, groups.layout, device)
        return build_teacher_cache(
            model, groups, dataset, args.output, options, identity, offsets, overwrite=args.overwrite
        )


def _summary(args: argparse.Namespace, m: dict[str, Any]) -> dict[str, Any]:
    size = sum(s["size"] for s in m["shards"])
    return {"output": args.output, "shards": len(m["shards"]), "rows": m["num_rows"], "k": m["k"],
            "temperature": m["temperature"], "dtype": m["dtype"], "bytes": size}  # fmt: skip


@cli_main("build_teacher_cache")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides before and after the flags
    result = run(args)
    if result is None:
        return 0
    out = result if result.get("dry_run") else _summary(args, result)
    per_token = out["bytes"] / max(1, out["rows"])
    if args.json:
        print(json.dumps({**out, "bytes_per_token": round(per_token, 3)}))
    elif result.get("dry_run"):
        print(f"plan: {out['shards']} shards, {out['rows']} rows (tokens), {out['bytes'] / 2**30:.3f} GiB, "
              f"{per_token:.1f} bytes/token; teacher {out['teacher_fingerprint'][:16]}...")  # fmt: skip
    else:
        print(f"teacher cache {args.output}: {out['shards']} shards, {out['rows']} tokens, k={out['k']}, "
              f"T={out['temperature']}, {out['dtype']}, {per_token:.1f} bytes/token")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
