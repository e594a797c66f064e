"""Tokenize a prompt/response JSONL file into an indexed dataset (``{prefix}.bin/.idx/.json`` +
``{prefix}.prompt_lengths.npy``).

The ``.bin``/``.idx`` pair is megatron-core's own indexed dataset format (one document per sample:
prompt + response tokens), so Megatron-LM reads it with ``--data-path PREFIX``; the prompt/response
split is in ``PREFIX.prompt_lengths.npy`` and our metadata in ``PREFIX.json``
(``rgkd_megatron.data.indexed_dataset``).

Each non-blank line is a JSON object with a string prompt and a string response, or a chat record
``{"messages": [{"role": ..., "content": ...}, ...]}`` (as Hugging Face datasets export chats): its
last message, the assistant's, is the response and the conversation before it, rendered with the
tokenizer's chat template (``add_generation_prompt``), the prompt. A plain prompt is
wrapped by the tokenizer's prompt template (``Tokenizer.apply_prompt_template``; ``--no-template``
keeps it raw), prompt and response are tokenized separately with no special tokens, and the sample
is ``prompt_ids + response_ids + [eos]`` with the prompt length recorded, so the loss covers the
response and the EOS (``rgkd_megatron.data.batching``). The response text is tokenized as written:
the default template ends in ``"Assistant:"``, so a leading space in the response is kept as a token.

Design choices:
- Records are parsed and checked in the main process (errors name file, line and field) and
  tokenized in ``--workers`` processes with ordered ``imap``: the output is byte-identical for any
  worker count.
- The writer streams to temporary files renamed at the end; any error leaves no openable output.
- ``source_fingerprint`` hashes the input bytes and every setting that changes the tokens (keys,
  template); the details are stored under ``extra`` in ``{prefix}.json``.

Usage::

    python tools/preprocess_data.py --input examples/data/tiny_sft.jsonl \\
        --tokenizer examples/tokenizer --output runs/data/tiny_sft
"""

from __future__ import annotations

import argparse
import json
from typing import Optional

from rgkd_megatron.data.preprocess import preprocess_jsonl
from rgkd_megatron.utils.cli_errors import cli_main
from rgkd_megatron.utils.cli_flags import add_common_flags, deprecated_alias


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preprocess_data",
        description="Tokenize prompt/response (or chat) JSONL into a megatron-core indexed dataset "
        "(PREFIX.bin, .idx) + the prompt lengths (PREFIX.prompt_lengths.npy) + metadata (PREFIX.json).",
    )
    p.add_argument(
        "--input",
        required=True,
        help='JSONL file, one {prompt, response} or {"messages": [{role, content}, ...]} object per line',
    )
    p.add_argument(
        "--tokenizer",
        required=True,
        help="tokenizer.json, sentencepiece .model, or a directory holding one (+ optional tokenizer_config.json)",
    )
    p.add_argument(
        "--output",
        required=True,
        help="output path without extension; writes PREFIX.bin, PREFIX.idx (megatron-core format), "
        "PREFIX.prompt_lengths.npy and PREFIX.json (dirs are created)",
    )
    p.add_argument(
        "--prompt-key", default="prompt", help="JSON field holding the prompt text (default: prompt)"
    )
    p.add_argument(
        "--response-key", default="response", help="JSON field holding the response (default: response)"
    )
    p.add_argument(
        "--no-template",
        action="store_true",
        help="tokenize the prompt as is instead of wrapping it in the tokenizer's prompt template",
    )
    p.add_argument(
        "--prompt-template",
        default=None,
        help="override the tokenizer's prompt template: a str.format string containing {prompt}",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="tokenizer processes (default 1); the output is identical for any number",
    )
    deprecated_alias(p, "--output-prefix", "--output")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --output")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check and tokenize every record and print the totals, but write nothing",
    )
    p.add_argument(
        "--json", action="store_true", help="print the written metadata (or the dry-run totals) as JSON"
    )
    return add_common_flags(p)


def run(args: argparse.Namespace) -> dict:
    """Preprocess as ``args`` say; returns the written metadata (or the totals of a dry run)."""
    return preprocess_jsonl(
        args.input,
        args.tokenizer,
        args.output,
        prompt_key=args.prompt_key,
        response_key=args.response_key,
        no_template=args.no_template,
        prompt_template=args.prompt_template,
        workers=args.workers,
        overwrite=args.overwrite,
        dry_run=args.dry_run,
    )


@cli_main("preprocess_data")
def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry point; raises SystemExit with a message on any input or output error."""
    args = build_parser().parse_args(argv)
    try:
        meta = run(args)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from e
    if args.json:
        print(json.dumps(meta, default=str))
    elif args.dry_run:
        print(f"dry run: {meta['num_samples']} samples, {meta['num_tokens']} tokens (nothing written)")
    else:
        print(
            f"wrote {meta['num_samples']} samples, {meta['num_tokens']} tokens ({meta['dtype']}) to "
            f"{args.output}.{{bin,idx,prompt_lengths.npy,json}}; fingerprint {meta['fingerprint']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
