"""Initialise a student from a teacher by depth pruning and optional FFN-width reduction (HF -> HF).

    python tools/prune_teacher.py --src teacher_hf --dst student_hf --num-layers 6
    python tools/prune_teacher.py --src teacher_hf --dst student_hf --keep-layers 0,6,12,18,24,29 \\
        --ffn-hidden-size 768

Kept layers are renumbered in order; with --ffn-hidden-size each kept layer keeps the SwiGLU neurons
with the largest ||gate_j||*||up_j||*||down_:,j|| (data-free magnitude score). What was kept is in
DST/prune_metadata.json (and summarised in the safetensors metadata). Convert the student with
tools/convert_checkpoint.py --to mcore. Bad inputs exit with status 2 naming the flag or tensor.
"""

from __future__ import annotations

import argparse
import json
import sys


def _layer_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prune_teacher.py",
        description="Depth (+ optional FFN-width) pruning of an HF Llama-family teacher.",
    )
    p.add_argument("--src", required=True, help="teacher: Hugging Face checkpoint directory")
    p.add_argument("--dst", required=True, help="student output directory; must not exist or be empty")
    layers = p.add_mutually_exclusive_group(required=True)
    layers.add_argument(
        "--keep-layers", type=_layer_list, help="comma-separated teacher layer indices to keep, increasing"
    )
    layers.add_argument(
        "--num-layers", type=int, help="keep this many evenly spaced layers (first and last included)"
    )
    p.add_argument(
        "--ffn-hidden-size",
        type=int,
        help="reduce the SwiGLU width to this many neurons per layer (default: keep the teacher's width)",
    )
    p.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB (default 5GB)"
    )
    p.add_argument("--json", action="store_true", help="print the pruning metadata as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rgkd_megatron.convert.common import ConversionError
    from rgkd_megatron.utils.logging import setup_logging

    setup_logging("INFO")
    try:
        from rgkd_megatron.convert.prune import prune_checkpoint

        meta = prune_checkpoint(
            args.src,
            args.dst,
            keep_layers=args.keep_layers,
            num_layers=args.num_layers,
            ffn_hidden_size=args.ffn_hidden_size,
            max_shard_size=args.max_shard_size,
        )
    except (ConversionError, FileNotFoundError) as exc:
        print(f"prune_teacher: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(meta, indent=1))
    else:
        print(
            f"wrote {args.dst}: layers {meta['kept_layers']} of {meta['source_num_layers']}, "
            f"ffn {meta['source_ffn_hidden_size']} -> {meta['ffn_hidden_size']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
