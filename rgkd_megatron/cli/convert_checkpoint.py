"""Convert Hugging Face Llama-family checkpoints to megatron-core distributed checkpoints and back.

    python tools/convert_checkpoint.py --to mcore --input HF_DIR --output MCORE_DIR --tp 2 --pp 2 [--dry-run]
    python tools/convert_checkpoint.py --to hf --input MCORE_DIR --output HF_DIR [--hf-config config.json]

--to mcore: HF safetensors + config.json (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM) ->
a megatron-core ``torch_dist`` checkpoint that our policy/teacher/reward builders load at any TP/PP
(``--tp`` sets the vocabulary padding to a multiple of ``--make-vocab-size-divisible-by * tp``). The
destination also gets ``model_config.yaml`` (the ``model:`` section for rgkd-train, ``load`` set),
``hf_config.json``, ``rgkd_convert.json`` and the tokenizer files.
--to hf: a converted or trained (``runs/X/checkpoints/iter_*``) checkpoint -> HF safetensors shards +
config.json, padding rows removed. HF -> mcore -> HF reproduces every tensor bit for bit.

Tensors stream one at a time (read memory-mapped, written chunk by chunk); ``--dry-run`` prints the
tensor mapping and the size per rank and writes nothing. Bad inputs (unsupported architecture,
missing/extra/mis-shaped tensor, TP not dividing heads or query groups, unknown dtype, destination
not empty) exit with status 2 and a message naming the tensor or field; the destination is only
created, by a rename, once complete.
"""

from __future__ import annotations

import argparse
import json
import sys

from rgkd_megatron.utils.cli_errors import cli_main
from rgkd_megatron.utils.cli_flags import add_common_flags, deprecated_alias


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_checkpoint",
        description="Hugging Face Llama/Mistral/Qwen2 <-> megatron-core checkpoint conversion at any TP/PP.",
    )
    p.add_argument("--to", required=True, choices=["mcore", "hf"], help="target format")
    p.add_argument(
        "--input", required=True, help="source directory (HF checkpoint for --to mcore, megatron for --to hf)"
    )
    p.add_argument("--output", required=True, help="destination directory; must not exist or be empty")
    deprecated_alias(p, "--src", "--input")
    deprecated_alias(p, "--dst", "--output")
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="--to mcore: tensor-parallel size the vocabulary is padded for and that must divide heads, "
        "query groups and the FFN width (the checkpoint still loads at any TP); also the layout of the "
        "--dry-run per-rank sizes. Default 1",
    )
    p.add_argument(
        "--pp",
        type=int,
        default=1,
        help="pipeline-parallel size that must divide the layers; layout of the --dry-run per-rank sizes. Default 1",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto|fp32|bf16|fp16: dtype of the written tensors; auto keeps the source dtype (default auto)",
    )
    p.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="--to mcore: pad the vocabulary to a multiple of this times --tp (megatron's rule; default 128)",
    )
    p.add_argument(
        "--ignore-sliding-window",
        action="store_true",
        help="convert a Mistral/Qwen2 config with sliding_window set as full attention (identical for "
        "sequences no longer than the window)",
    )
    p.add_argument(
        "--hf-config",
        help="--to hf: config.json (or a directory holding one) to write, e.g. the original model's; "
        "default: INPUT/hf_config.json, else one built from --model-config",
    )
    p.add_argument(
        "--model-config",
        help="--to hf: YAML with a `model:` section (model_config.yaml or a run's config.yaml) when INPUT has no "
        "hf_config.json; default: INPUT/model_config.yaml, then INPUT/../../config.yaml (a training run)",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        help="--to hf: real vocabulary size (rows kept from the padded embedding) when the config does not say",
    )
    p.add_argument(
        "--tokenizer",
        help="--to hf: directory whose tokenizer / generation-config files are copied (default: INPUT, else "
        "the data.tokenizer of the training run INPUT belongs to: INPUT/../../config.yaml)",
    )
    p.add_argument(
        "--role",
        help="--to hf: the model to convert from a multi-role loop checkpoint (rgkd-distill's "
        "RUN/checkpoints/iter_*: keys policy.*, reward.*), e.g. policy; one role at a time",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="--to hf: largest safetensors shard, e.g. 5GB or 500MB (default 5GB); bounds the memory used",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate, print the tensor mapping and the size per rank, write nothing",
    )
    p.add_argument("--json", action="store_true", help="print the plan / result as JSON instead of a table")
    return add_common_flags(p)


_HF_ONLY = ("hf_config", "model_config", "vocab_size", "tokenizer", "role")


@cli_main("convert_checkpoint")
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from rgkd_megatron.convert.common import ConversionError
    from rgkd_megatron.utils.logging import setup_logging

    setup_logging("INFO")
    try:
        if args.to == "mcore":
            given = [f"--{k.replace('_', '-')}" for k in _HF_ONLY if getattr(args, k) is not None]
            if given:
                raise ConversionError(f"{', '.join(given)}: only used with --to hf")
            from rgkd_megatron.convert.hf_to_mcore import convert_hf_to_mcore

            result = convert_hf_to_mcore(
                args.input,
                args.output,
                tp=args.tp,
                pp=args.pp,
                dtype=args.dtype,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                dry_run=args.dry_run,
                ignore_sliding_window=args.ignore_sliding_window,
            )
        else:
            from rgkd_megatron.convert.mcore_to_hf import convert_mcore_to_hf

            result = convert_mcore_to_hf(
                args.input,
                args.output,
                hf_config=args.hf_config,
                model_config=args.model_config,
                vocab_size=args.vocab_size,
                tokenizer=args.tokenizer,
                role=args.role,
                dtype=args.dtype,
                max_shard_size=args.max_shard_size,
                dry_run=args.dry_run,
                ignore_sliding_window=args.ignore_sliding_window,
                tp=args.tp,
                pp=args.pp,
            )
    except (ConversionError, FileNotFoundError) as exc:
        print(f"convert_checkpoint: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    elif args.dry_run:
        from rgkd_megatron.convert.plan import format_plan

        direction = "hf -> mcore" if args.to == "mcore" else "mcore -> hf"
        print(format_plan(result, f"dry run ({direction}): {args.input} -> {args.output}; nothing written"))
    else:
        print(f"wrote {result['dst']} in {result['seconds']:.1f} s")
        if args.to == "mcore":
            print(
                f"train from it: rgkd-train --config RECIPE.yaml model.load={result['dst']} "
                f"(model fields: {result['dst']}/model_config.yaml)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
