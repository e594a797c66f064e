"""Precompute the teacher's top-k log-probabilities over a tokenized dataset into a sharded cache.

Runs the teacher (megatron-core GPTModel, inference) under any TP x PP layout, data-parallel over the
remaining ranks, and stores per token its top-k log-probs (sorted; 8-bit codes against the row's
maximum by default, or fp16/bf16/fp32), their ids packed to the bits the vocabulary needs, the
log-sum-exp and the tail mass (``rgkd_megatron/cache``). An existing build in ``--output`` with other
settings is refused before the teacher is loaded. Rerunning the same command after a kill
resumes and produces byte-identical shards; on a complete cache it does nothing.

Usage::

    python tools/preprocess_data.py --input data.jsonl --tokenizer T --output-prefix runs/data/train
    python tools/build_teacher_cache.py --data-prefix runs/data/train --teacher-config teacher.yaml \\
        --teacher-checkpoint ckpts/teacher --output runs/cache/train --k 64 --temperature 1.0
    torchrun --nproc-per-node 8 tools/build_teacher_cache.py ... --tp 4        # TP=4 x DP=2
    python tools/build_teacher_cache.py ... --random-init-seed 1                # tests: random weights

The teacher's architecture is the ``model`` section of ``--teacher-config`` (an rgkd recipe YAML;
dotted ``model.*`` overrides may follow); fields it does not set come from ``--teacher-checkpoint``
(a megatron checkpoint's ``model_config.yaml`` or a Hugging Face folder's ``config.json``). The launcher (torchrun / srun / mpirun / single process) is
detected as for ``rgkd-train``.
"""

from __future__ import annotations

import argparse
import os
import sys

from rgkd_megatron.cache.builder import BuildOptions
from rgkd_megatron.utils.cli_errors import add_debug_flag, cli_main

_DEFAULTS = BuildOptions()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="build_teacher_cache.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = p.add_argument_group("inputs and output")
    io.add_argument(
        "--data-prefix",
        required=True,
        help="tokenized dataset prefix (PREFIX.bin/.idx/.json from tools/preprocess_data.py)",
    )
    io.add_argument(
        "--teacher-config",
        help="rgkd recipe YAML whose 'model' section describes the teacher (default: the architecture of "
        "--teacher-checkpoint, from its config.json or model_config.yaml)",
    )
    weights = io.add_mutually_exclusive_group(required=True)
    weights.add_argument(
        "--teacher-checkpoint",
        help="teacher weights: a megatron dist_checkpointing directory (any TP/PP) or a Hugging Face folder",
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
    io.add_argument(
        "overrides", nargs="*", help="dotted overrides of the teacher config, e.g. model.num_layers=32"
    )

    what = p.add_argument_group("what is stored")
    what.add_argument(
        "--k",
        type=int,
        default=_DEFAULTS.k,
        help="top-k ids per token (k = vocab size stores the full distribution)",
    )
    what.add_argument(
        "--temperature",
        type=float,
        default=_DEFAULTS.temperature,
        help="log-probs are of softmax(logits / T)",
    )
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
        "--tp", type=int, default=None, help="tensor-parallel size (default: the config's parallel section)"
    )
    run.add_argument(
        "--pp",
        type=int,
        default=None,
        help="pipeline-parallel size (default: the config's parallel section); DP = world / (TP*PP)",
    )
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
    run.add_argument(
        "--backend",
        choices=("auto", "nccl", "gloo"),
        default="auto",
        help="torch.distributed backend (auto: nccl with CUDA)",
    )
    run.add_argument(
        "--timeout-minutes",
        type=float,
        default=120.0,
        help="collective timeout (ranks wait for each other between shards)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging level"
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything and print the plan (shards, rows, bytes) without running the teacher",
    )
    return p


def _teacher_config(args):
    from rgkd_megatron.config import load_config, validate_config

    from_checkpoint = [f"model.load={args.teacher_checkpoint}"] if args.teacher_checkpoint else []
    cfg = load_config(args.teacher_config, [*args.overrides, *from_checkpoint], validate=False)
    if args.tp is not None:
        cfg.parallel.tensor_model_parallel_size = args.tp
    if args.pp is not None:
        cfg.parallel.pipeline_model_parallel_size = args.pp
    cfg.parallel.sequence_parallel = False
    if args.seq_length is None:
        args.seq_length = cfg.model.max_position_embeddings
    cfg.data.seq_length = args.seq_length
    validate_config(cfg)
    return cfg


def _options(args, pp: int) -> BuildOptions:
    per_call = args.num_microbatches or (2 * pp if pp > 1 else 1)
    return BuildOptions(
        k=args.k, temperature=args.temperature, dtype=args.dtype, seq_length=args.seq_length,
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


def run(args: argparse.Namespace) -> dict | None:
    """Build as ``args`` say (torch.distributed initialised here); the manifest on rank 0 when complete."""
    import torch
    import torch.distributed as dist

    from rgkd_megatron.cache.builder import build_identity, build_teacher_cache
    from rgkd_megatron.cache.manifest import layout_of, plan_shards, teacher_fingerprint
    from rgkd_megatron.cache.writer import check_existing
    from rgkd_megatron.config import config_to_dict
    from rgkd_megatron.data.indexed_dataset import IndexedDataset
    from rgkd_megatron.models.builders import padded_vocab_size, resolve_params_dtype
    from rgkd_megatron.parallel.groups import RoleLayout, layout_for_world

    cfg = _teacher_config(args)
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
    random_init = None
    if args.random_init_seed is not None:  # random weights depend on the seed, the layout and the device
        random_init = {"seed": args.random_init_seed, "tp": tp, "pp": pp, "device": device}
    teacher = {
        "fingerprint": teacher_fingerprint(
            model_dict, model_vocab, params_dtype, args.teacher_checkpoint, random_init
        ),
        "source": "checkpoint" if args.teacher_checkpoint else "random_init",
        "checkpoint": os.path.abspath(args.teacher_checkpoint) if args.teacher_checkpoint else None,
        "random_init_seed": args.random_init_seed,
        "model": model_dict,
        "params_dtype": params_dtype,
    }
    # the identity needs nothing of the loaded teacher: check an existing build before loading it
    identity, offsets = build_identity(options, teacher, dataset, shared_vocab, RoleLayout(tp=tp, pp=pp), device)
    if not args.overwrite:
        check_existing(args.output, identity)
    if args.dry_run:
        plan = plan_shards(offsets[1:] - offsets[:-1], options.rows_per_shard)
        size = sum(layout_of(identity, s["num_rows"]).size for s in plan)
        print(f"plan: {len(plan)} shards, {identity['num_rows']} rows (tokens), {size / 2**30:.3f} GiB, "
              f"{size / max(1, identity['num_rows']):.1f} bytes/token; teacher {teacher['fingerprint'][:16]}...")  # fmt: skip
        return None

    from rgkd_megatron.convert.hf_load import load_weights
    from rgkd_megatron.models.builders import build_teacher
    from rgkd_megatron.parallel.launch import init_distributed
    from rgkd_megatron.training.setup import init_role

    env = init_distributed(backend=args.backend, timeout_s=args.timeout_minutes * 60)
    from rgkd_megatron.utils.logging import setup_logging

    setup_logging(args.log_level, rank=env.rank)
    layout = layout_for_world(tp, pp, dist.get_world_size())
    groups = init_role(layout, seed=args.random_init_seed if args.random_init_seed is not None else 0)
    model = build_teacher(cfg.model, cfg.parallel, groups, model_vocab)
    if args.teacher_checkpoint:
        load_weights(args.teacher_checkpoint, model, "--teacher-checkpoint")
    teacher["padded_vocab_size"] = padded_vocab_size(model_vocab, cfg.model.make_vocab_size_divisible_by, tp)
    identity, offsets = build_identity(options, teacher, dataset, shared_vocab, layout, device)
    return build_teacher_cache(
        model, groups, dataset, args.output, options, identity, offsets, overwrite=args.overwrite
    )


@cli_main("build_teacher_cache")
def main(argv: list[str] | None = None) -> int:
    args = add_debug_flag(build_parser()).parse_args(argv)
    try:
        manifest = run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"build_teacher_cache: error: {exc}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if manifest is not None:
        m = manifest
        size = sum(s["size"] for s in m["shards"])
        print(
            f"teacher cache {args.output}: {len(m['shards'])} shards, {m['num_rows']} tokens, k={m['k']}, "
            f"T={m['temperature']}, {m['dtype']}, {size / max(1, m['num_rows']):.1f} bytes/token"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
