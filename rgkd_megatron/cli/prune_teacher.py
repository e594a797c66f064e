"""Initialise a student from a teacher by depth pruning and optional FFN-width reduction (HF -> HF).

    python tools/prune_teacher.py --teacher teacher_hf --output student_hf --num-layers 6
    python tools/prune_teacher.py --teacher teacher_hf --output student_hf --keep-layers 0,6,12,18,24,29 \\
        --ffn-hidden-size 768

Kept layers are renumbered in order; with --ffn-hidden-size each kept layer keeps the SwiGLU neurons
with the largest ||gate_j||*||up_j||*||down_:,j|| (data-free magnitude score). What was kept is in
OUTPUT/prune_metadata.json (and summarised in the safetensors metadata). Convert the student with
tools/convert_checkpoint.py --to mcore. Bad inputs exit with status 2 naming the flag or tensor.

With --probe PAIRS.jsonl ({"prompt", "response"} records) and --num-layers K, the layers to keep are
measured instead of assumed: candidate sets (evenly spaced, drop the deep block, the Gromov et al.
angular-distance block, ShortGPT block influence) are scored by the teacher-forced response NLL of
the pruned teacher on the first --probe-samples records, the lowest wins, and the table is recorded
in prune_metadata.json under "probe". --probe-only prints the table and writes nothing
(rgkd_megatron/convert/layer_probe.py has the definitions).

    python tools/prune_teacher.py --teacher teacher_hf --output student_hf --num-layers 12 --probe pairs.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from rgkd_megatron.utils.cli_errors import cli_main
from rgkd_megatron.utils.cli_flags import add_common_flags, add_run_flags, deprecated_alias


def _layer_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prune_teacher",
        description="Depth (+ optional FFN-width) pruning of an HF Llama-family teacher.",
    )
    p.add_argument("--teacher", required=True, help="teacher: Hugging Face checkpoint directory")
    p.add_argument("--output", required=True, help="student output directory; must not exist or be empty")
    deprecated_alias(p, "--src", "--teacher")
    deprecated_alias(p, "--dst", "--output")
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
    add_run_flags(p, "check the teacher, the layers and the output, print what would be kept, write nothing",
                  "print the pruning metadata as JSON")  # fmt: skip
    p.add_argument(
        "--probe",
        metavar="PAIRS.jsonl",
        help="choose the --num-layers layers by measurement: JSONL of {prompt, response} records; "
        "candidate layer sets are scored by the pruned teacher's response NLL, the lowest is kept",
    )
    p.add_argument(
        "--probe-samples", type=int, default=24, help="use the first N records of --probe (default 24)"
    )
    p.add_argument(
        "--probe-max-tokens", type=int, default=512, help="cut each probe sample to N tokens (default 512)"
    )
    p.add_argument(
        "--probe-only", action="store_true", help="with --probe: print the table and exit without writing"
    )
    return add_common_flags(p)


def _print_table(report, total: int) -> None:
    """Candidates best first, the unpruned teacher as a reference row."""
    teacher = report.stats.teacher_nll
    print(f"{'candidate':<18}{'NLL':>9}{'vs teacher':>12}  layers")
    print(f"{'teacher (all)':<18}{teacher:>9.4f}{'':>12}  0..{total - 1}")
    for c in report.candidates:
        print(
            f"{c['name']:<18}{c['nll']:>9.4f}{c['nll'] - teacher:>+12.4f}  {','.join(map(str, c['layers']))}"
        )
    print(
        f"chosen: {report.best['name']} {report.best['layers']} "
        f"({report.samples} samples, {report.scored_tokens} scored tokens, {report.seconds:.1f} s)"
    )


def _run_probe(args):
    """Read the probe file, load the teacher with transformers, score the candidates: (report, record)."""
    import torch
    import transformers

    from rgkd_megatron.convert.common import ConversionError
    from rgkd_megatron.convert.layer_probe import read_probe_pairs, run_probe
    from rgkd_megatron.data.tokenizer import file_sha256, load_tokenizer

    pairs = read_probe_pairs(args.probe, args.probe_samples)
    if not os.path.isfile(os.path.join(args.teacher, "config.json")):
        raise ConversionError(f"--teacher {args.teacher}: no config.json")
    try:
        tokenizer = load_tokenizer(args.teacher)
    except (ValueError, FileNotFoundError) as exc:
        raise ConversionError(f"--teacher {args.teacher}: tokenizer: {exc}") from exc
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).eval()
    print(f"prune_teacher: loaded {args.teacher} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    report = run_probe(model, tokenizer, pairs, args.num_layers, max_tokens=args.probe_max_tokens)
    record = {
        "file": os.path.abspath(args.probe),
        "sha256": file_sha256(args.probe),
        "samples": report.samples,
        "scored_tokens": report.scored_tokens,
        "max_tokens": args.probe_max_tokens,
        "criterion": "lowest teacher-forced NLL (nats/token) of response + EOS tokens",
        "teacher_nll": report.stats.teacher_nll,
        "candidates": [{k: c[k] for k in ("name", "layers", "nll")} for c in report.candidates],
        "chosen": report.best["name"],
        "chosen_layers": report.best["layers"],
        "seconds": round(report.seconds, 2),
    }
    return report, record


def _add_probe_metadata(dst: str, meta: dict, record: dict) -> dict:
    """Rewrite OUTPUT/prune_metadata.json with the probe record (atomically: temp file + rename)."""
    from rgkd_megatron.convert.prune import _dumps

    meta = {**meta, "probe": record}
    path = os.path.join(dst, "prune_metadata.json")
    with open(path + ".tmp", "w") as f:
        f.write(_dumps(meta))
    os.replace(path + ".tmp", path)
    return meta


@cli_main("prune_teacher")
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.probe is None and args.probe_only:
        parser.error("--probe-only needs --probe")
    if args.probe is not None and args.num_layers is None:
        parser.error("--probe needs --num-layers (it chooses which layers to keep)")
    if args.probe_samples < 1 or args.probe_max_tokens < 2:
        parser.error("--probe-samples must be >= 1 and --probe-max-tokens >= 2")
    from rgkd_megatron.convert.common import ConversionError, check_destination
    from rgkd_megatron.utils.logging import setup_logging

    setup_logging("INFO")
    try:
        from rgkd_megatron.convert.prune import prune_checkpoint

        record = None
        if args.probe is not None:
            if not args.probe_only:
                check_destination(args.output)  # fail before the (long) probe
            report, record = _run_probe(args)
            _print_table(report, report.stats.block + args.num_layers)
            if args.probe_only:
                return 0
        meta = prune_checkpoint(
            args.teacher,
            args.output,
            keep_layers=record["chosen_layers"] if record else args.keep_layers,
            num_layers=None if record else args.num_layers,
            ffn_hidden_size=args.ffn_hidden_size,
            max_shard_size=args.max_shard_size,
            dry_run=args.dry_run,
        )
        if record is not None and not args.dry_run:
            meta = _add_probe_metadata(args.output, meta, record)
    except (ConversionError, FileNotFoundError) as exc:  # the converters call the source --input
        print(f"prune_teacher: error: {str(exc).replace('--input ', '--teacher ', 1)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(meta, indent=1))
    else:
        verb = "dry run, nothing written: would write" if args.dry_run else "wrote"
        print(
            f"{verb} {args.output}: layers {meta['kept_layers']} of {meta['source_num_layers']}, "
            f"ffn {meta['source_ffn_hidden_size']} -> {meta['ffn_hidden_size']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
