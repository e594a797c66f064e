"""Train a small byte-level BPE tokenizer with Hugging Face ``tokenizers``.

Design choices:
- Byte-level BPE (GPT-2 style pre-tokenizer and decoder, no prefix space): any text encodes, and
  ``decode(encode(text)) == text`` exactly.
- One special token, ``<|endoftext|>`` (id 0), serves as EOS and pad; there is no BOS.
- Inputs: plain text files (one training text per line) and/or JSONL files, from which the string
  fields named by ``--jsonl-keys`` are used. Input order is kept, so the output is reproducible.
- Writes ``tokenizer.json`` and a ``tokenizer_config.json`` naming eos/pad (readable by
  ``rgkd_megatron.data.load_tokenizer`` and by ``transformers.AutoTokenizer``).

The shipped tokenizer was made with::

    python tools/train_tokenizer.py --input examples/data/tiny_sft.jsonl --vocab-size 512 \\
        --output examples/tokenizer --overwrite
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Iterator, Sequence

from rgkd_megatron.utils.cli_errors import cli_main
from rgkd_megatron.utils.cli_flags import add_common_flags, add_run_flags, deprecated_alias
from rgkd_megatron.utils.jsonl import iter_jsonl

EOS_TOKEN = "<|endoftext|>"


def iter_texts(paths: Sequence[str], jsonl_keys: Sequence[str]) -> Iterator[str]:
    """Training texts: each non-empty line of a text file, each named string field of a JSONL record."""
    for path in paths:
        if not os.path.isfile(path):
            raise SystemExit(f"error: input file {path} not found")
        is_jsonl = path.endswith((".jsonl", ".json"))
        if is_jsonl:
            for _, _, record in iter_jsonl(path):
                yield from (record[k] for k in jsonl_keys if isinstance(record.get(k), str))
            continue
        with open(path, encoding="utf-8") as f:
            try:
                yield from (line.rstrip("\n") for line in f if line.strip())
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}: not valid UTF-8 ({exc.reason}); expected UTF-8 text") from None


def train_tokenizer(texts: Sequence[str], vocab_size: int = 512, min_frequency: int = 2):
    """A trained ``tokenizers.Tokenizer`` (byte-level BPE, ``<|endoftext|>`` as id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_tokenizer",
        description="Train a byte-level BPE tokenizer (HF tokenizers) and write tokenizer.json + "
        "tokenizer_config.json.",
    )
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="text files (one text per line) and/or .jsonl files (fields chosen by --jsonl-keys)",
    )
    parser.add_argument(
        "--jsonl-keys",
        default="prompt,response",
        help="comma-separated JSONL fields whose string values are training text (default: prompt,response)",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=512,
        help="target vocabulary size including the 256 byte tokens and <|endoftext|> (default 512)",
    )
    parser.add_argument(
        "--min-frequency",
        type=int,
        default=2,
        help="minimum pair count for a merge to be learned (default 2)",
    )
    parser.add_argument(
        "--output", required=True, help="directory to write tokenizer.json and tokenizer_config.json"
    )
    deprecated_alias(parser, "--output-dir", "--output")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing tokenizer.json in --output"
    )
    add_run_flags(parser, "read the texts and check the output, write nothing",
                  "print what was written (or would be) as one JSON object")  # fmt: skip
    return add_common_flags(parser)


@cli_main("train_tokenizer")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    if args.vocab_size < 257 + 1:
        raise SystemExit(
            f"error: --vocab-size must be at least 258 (256 bytes + EOS + 1 merge), got {args.vocab_size}"
        )
    out_json = os.path.join(args.output, "tokenizer.json")
    if os.path.exists(out_json) and not args.overwrite:
        raise SystemExit(f"error: {out_json} exists; pass --overwrite to replace it")
    keys = [k.strip() for k in args.jsonl_keys.split(",") if k.strip()]
    texts = list(iter_texts(args.input, keys))
    if not texts:
        raise SystemExit(f"error: no training text found in {args.input}")

    if args.dry_run:
        plan = {"dry_run": True, "output": out_json, "texts": len(texts), "vocab_size": args.vocab_size}
        print(json.dumps(plan) if args.json else
              f"dry run: would train a {args.vocab_size}-id tokenizer on {len(texts)} texts into {out_json}")  # fmt: skip
        return 0
    tok = train_tokenizer(texts, args.vocab_size, args.min_frequency)
    os.makedirs(args.output, exist_ok=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "bos_token": None,
        "add_bos_token": False,
        "model_max_length": 1 << 20,
    }
    for name, write in (
        ("tokenizer.json", lambda p: tok.save(p, pretty=True)),
        ("tokenizer_config.json", lambda p: _write_json(p, config)),
    ):
        final = os.path.join(args.output, name)
        tmp = f"{final}.tmp.{os.getpid()}"
        write(tmp)
        os.replace(tmp, final)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if args.json:
        print(json.dumps({"output": out_json, "texts": len(texts), "vocab_size": vocab}))
    else:
        print(f"wrote {out_json} (vocab {vocab}) from {len(texts)} texts")
    return 0


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    raise SystemExit(main())
