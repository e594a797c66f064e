"""Tokenize a prompt/response JSONL file into an indexed dataset (the library side of
``tools/preprocess_data.py``, also used by the trainer to tokenize a JSONL once per run).

Records are parsed and checked in the main process (errors name file, line and field) and tokenized
in ``workers`` processes with ordered ``imap``: the output is byte-identical for any worker count.
``source_fingerprint`` hashes the input bytes and every setting that changes the tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
from typing import Iterator, Optional, Union

from tqdm import tqdm

from rgkd_megatron.data.batching import make_sft_sample
from rgkd_megatron.data.indexed_dataset import IndexedDataset, dataset_paths, write_indexed_dataset
from rgkd_megatron.data.tokenizer import Tokenizer, file_sha256, load_tokenizer
from rgkd_megatron.utils.jsonl import iter_jsonl
from rgkd_megatron.utils.logging import get_logger

logger = get_logger(__name__)


def truncated_flag(record: dict, where: str) -> bool:
    """The optional boolean ``truncated`` field of a {prompt, response} record (False when absent)."""
    truncated = record.get("truncated", False)
    if not isinstance(truncated, bool):
        raise ValueError(f"{where}: field 'truncated' must be true or false, got {truncated!r}")
    return truncated


Prompt = Union[str, list[dict[str, str]]]
"""A prompt text, or the messages of a chat record before its last (assistant) message."""


def chat_record(record: dict, where: str) -> tuple[list[dict[str, str]], str]:
    """``{"messages": [{"role", "content"}, ...]}`` (as Hugging Face datasets export chats) ->
    (the conversation before the last message, the last message's content: the response, which
    must be the assistant's); ValueError naming the file, line and field."""
    messages = record["messages"]
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError(f"{where}: field 'messages' must be a list of at least 2 messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: field 'messages[{i}]' must be an object with 'role' and 'content'")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ValueError(f"{where}: field 'messages[{i}].{key}' must be a string")
    if messages[-1]["role"] != "assistant":
        last = len(messages) - 1
        raise ValueError(f"{where}: field 'messages[{last}].role' must be 'assistant' (the response)")
    return [{"role": m["role"], "content": m["content"]} for m in messages[:-1]], messages[-1]["content"]


def iter_records(path: str, prompt_key: str, response_key: str) -> Iterator[tuple[int, Prompt, str, bool]]:
    """``(line_number, prompt, response, truncated)`` per non-blank line; ValueError naming file, line
    and field. ``truncated`` (optional boolean field, written by ``tools/generate_responses.py``) marks
    a response cut at the generation limit: it is tokenized without EOS. A chat record
    (``messages``, see ``chat_record``) gives its conversation as the prompt."""
    for lineno, where, record in iter_jsonl(path):
        if "messages" in record and prompt_key not in record:
            prompt, response = chat_record(record, where)
            yield lineno, prompt, response, truncated_flag(record, where)
            continue
        values = []
        for key in (prompt_key, response_key):
            if key not in record:
                raise ValueError(f"{where}: missing field '{key}'")
            if not isinstance(record[key], str):
                raise ValueError(f"{where}: field '{key}' must be a string, got {type(record[key]).__name__}")
            values.append(record[key])
        yield lineno, values[0], values[1], truncated_flag(record, where)


def encode_record(
    tokenizer: Tokenizer, prompt: Prompt, response: str, use_template: bool, truncated: bool = False
) -> tuple[list[int], int]:
    """One SFT sample ``(prompt_ids + response_ids [+ eos], len(prompt_ids))`` (no EOS if truncated).
    A conversation (chat record) is rendered with the tokenizer's chat template."""
    if isinstance(prompt, list):
        if not use_template:
            raise ValueError(
                "a chat record ('messages') is rendered with the chat template: drop --no-template"
            )
        text = tokenizer.render_conversation(prompt)
    else:
        text = tokenizer.apply_prompt_template(prompt) if use_template else prompt
    return make_sft_sample(tokenizer.encode(text), tokenizer.encode(response), tokenizer.eos_id, truncated)


# Worker-process state (set by _init_worker).
_WORKER: dict = {}


def _init_worker(tokenizer_path: str, prompt_template: Optional[str], use_template: bool) -> None:
    _WORKER["tokenizer"] = load_tokenizer(tokenizer_path, prompt_template=prompt_template)
    _WORKER["use_template"] = use_template


def _encode_in_worker(item: tuple[int, Prompt, str, bool]) -> tuple[list[int], int]:
    _, prompt, response, truncated = item
    return encode_record(_WORKER["tokenizer"], prompt, response, _WORKER["use_template"], truncated)


def _hash_and_count(path: str) -> tuple[str, int]:
    digest, lines = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for line in f:
            digest.update(line)
            lines += bool(line.strip())
    return digest.hexdigest(), lines


def preprocess_jsonl(
    input: str,
    tokenizer: str,
    output_prefix: str,
    *,
    prompt_key: str = "prompt",
    response_key: str = "response",
    no_template: bool = False,
    prompt_template: Optional[str] = None,
    workers: int = 1,
    overwrite: bool = False,
    dry_run: bool = False,
) -> dict:
    """Tokenize ``input`` into ``output_prefix``; returns the written metadata (or a dry run's totals)."""
    args = argparse.Namespace(
        input=input,
        tokenizer=tokenizer,
        output_prefix=output_prefix,
        prompt_key=prompt_key,
        response_key=response_key,
        no_template=no_template,
        prompt_template=prompt_template,
        workers=workers,
        overwrite=overwrite,
        dry_run=dry_run,
    )
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if not os.path.isfile(args.input):
        raise FileNotFoundError(f"input file {args.input} not found")
    existing = [p for p in dataset_paths(args.output_prefix).values() if os.path.exists(p)]
    if existing and not args.overwrite and not args.dry_run:
        raise ValueError(f"output exists: {', '.join(existing)}; pass --overwrite to replace it")

    tokenizer = load_tokenizer(args.tokenizer, prompt_template=args.prompt_template)
    use_template = not args.no_template
    input_sha, num_lines = _hash_and_count(args.input)
    if use_template and tokenizer.prompt_template is None:  # a Jinja chat template: record its hash
        template_id = "chat_template:" + hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()
    else:
        template_id = tokenizer.prompt_template if use_template else None
    settings = {
        "input_sha256": input_sha,
        "prompt_key": args.prompt_key,
        "response_key": args.response_key,
        "prompt_template": template_id,
    }
    source_fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    records = iter_records(args.input, args.prompt_key, args.response_key)
    pool = None
    if args.workers == 1:
        samples = (encode_record(tokenizer, p, r, use_template, t) for _, p, r, t in records)
    else:
        pool = multiprocessing.Pool(
            args.workers,
            initializer=_init_worker,
            initargs=(args.tokenizer, args.prompt_template, use_template),
        )
        samples = pool.imap(_encode_in_worker, records, chunksize=64)
    samples = tqdm(samples, total=num_lines, unit=" samples", desc="tokenizing", file=sys.stderr)
    try:
        if args.dry_run:
            n = t = 0
            for tokens, _ in samples:
                n, t = n + 1, t + len(tokens)
            if n == 0:
                raise ValueError(f"no records in {args.input}")
            return {"num_samples": n, "num_tokens": t, "source_fingerprint": source_fingerprint}
        extra = {
            **settings,
            "input": args.input,
            "tokenizer": args.tokenizer,
            "tokenizer_type": type(tokenizer).__name__,
        }
        try:
            return write_indexed_dataset(
                args.output_prefix,
                samples,
                tokenizer.fingerprint,
                source_fingerprint,
                tokenizer.vocab_size,
                extra_meta=extra,
            )
        except ValueError as e:
            if str(e).startswith("no samples"):
                raise ValueError(f"no records in {args.input}") from e
            raise
    finally:
        samples.close()
        if pool is not None:
            pool.terminate()
            pool.join()


def tokenized_copy_is_current(prefix: str, jsonl: str, tokenizer_path: str) -> bool:
    """Whether the indexed dataset at ``prefix`` was tokenized from the current bytes of ``jsonl``
    with the tokenizer at ``tokenizer_path`` (False when there is none)."""
    if not os.path.exists(dataset_paths(prefix)["json"]):
        return False
    dataset = IndexedDataset(prefix)
    same_tokenizer = dataset.tokenizer_fingerprint == load_tokenizer(tokenizer_path).fingerprint
    return same_tokenizer and dataset.meta.get("extra", {}).get("input_sha256") == file_sha256(jsonl)


def tokenize_once(jsonl: str, tokenizer_path: str, prefix: str) -> None:
    """Tokenize ``jsonl`` into ``prefix`` unless the copy there is current; a stale copy (the JSONL
    or the tokenizer changed since) is replaced, with a log line naming it."""
    if tokenized_copy_is_current(prefix, jsonl, tokenizer_path):
        logger.info("reusing tokenized %s", prefix)
        return
    if os.path.exists(dataset_paths(prefix)["json"]):
        logger.warning("%s is stale (%s or the tokenizer changed since): tokenizing again", prefix, jsonl)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    preprocess_jsonl(jsonl, tokenizer_path, prefix, overwrite=True)
