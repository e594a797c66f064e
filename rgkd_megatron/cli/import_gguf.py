"""Import a GGUF file (Llama architecture, any ggml quantization) into a Hugging Face checkpoint.

    bash scripts/fetch_smollm2.sh     # once: .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    python tools/import_gguf.py --input .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --output teacher_hf

Tensors are dequantized with the ``gguf`` package one at a time, llama.cpp's q/k row permutation is
undone, and they are written as safetensors with a ``config.json`` built from the GGUF metadata; the
tokenizer (with its chat template) is converted by ``transformers``. The result loads with
``transformers`` and converts with ``tools/convert_checkpoint.py --to mcore``. Needs the ``gguf`` and
``transformers`` packages. Bad inputs exit with status 2 naming the field or tensor; the destination
appears only when complete.
"""

from __future__ import annotations

import argparse
import json
import sys

from rgkd_megatron.utils.cli_errors import cli_main
from rgkd_megatron.utils.cli_flags import add_common_flags, add_run_flags, deprecated_alias


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="import_gguf", description="GGUF (Llama architecture) -> Hugging Face checkpoint directory."
    )
    p.add_argument("--input", required=True, help="the .gguf file")
    p.add_argument("--output", required=True, help="output directory; must not exist or be empty")
    deprecated_alias(p, "--src", "--input")
    deprecated_alias(p, "--dst", "--output")
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="dtype of the written tensors (default fp32: dequantized values are exact in fp32)",
    )
    p.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB (default 5GB)"
    )
    p.add_argument(
        "--no-tokenizer", action="store_true", help="do not convert the tokenizer (no transformers needed)"
    )
    add_run_flags(p, "read the GGUF metadata and check every tensor name and the output, write nothing",
                  "print the import report as JSON")  # fmt: skip
    return add_common_flags(p)


@cli_main("import_gguf")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rgkd_megatron.convert.common import ConversionError
    from rgkd_megatron.utils.logging import setup_logging

    setup_logging("INFO")
    try:
        from rgkd_megatron.convert.gguf_import import import_gguf

        report = import_gguf(
            args.input,
            args.output,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            tokenizer=not args.no_tokenizer,
            dry_run=args.dry_run,
        )
    except (ConversionError, FileNotFoundError) as exc:
        print(f"import_gguf: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"import_gguf: error: {exc} (pip install gguf transformers)", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    elif args.dry_run:
        print(f"dry run: {args.input} -> {report['dst']}: {report['tensors']} tensors "
              f"({report['tensor_types']}) would be written as {report['dtype']}; nothing written")  # fmt: skip
    else:
        print(f"wrote {report['dst']} in {report['seconds']:.1f} s ({report['tensor_types']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
