"""Generate a teacher's responses for a prompt set: ``{prompt, response, reference, truncated, sample}`` JSONL.

The output is what ``rgkd-distill`` reads as ``pbkd.prompts_path``. The teacher (``--teacher``) is a
megatron dist_checkpointing directory (any TP/PP it was saved at) or a Hugging Face folder; its
architecture comes from the checkpoint or from ``--model-config``, a YAML whose ``model`` section
describes it (``model_config.yaml`` written next to a converted checkpoint, or a run's
``config.yaml``), and dotted ``model.*`` overrides. Prompts go through the tokenizer's prompt template (the chat template for
SmolLM2-Instruct), responses are generated in batches with a KV cache (greedy by default), the EOS
is stripped, and the file is written atomically in prompt order. Each record says whether its
response was cut at ``--max-new-tokens`` without an EOS (``"truncated": true``; a consumer must not
append an EOS to it) and which sample of its prompt it is (``"sample"``, 0-based):
``--num-samples N`` (with ``--temperature > 0``) writes N consecutive records per prompt.

Rerunning is safe: finished batches are kept in ``OUT.partial/`` and a rerun after a kill continues
from them; when ``OUT`` is complete and ``OUT.meta.json`` shows the same prompts file, model,
tokenizer and settings, the rerun says so and exits 0 without loading the model; anything different
is an error unless ``--overwrite``.

Usage::

    python tools/generate_responses.py --prompts examples/data/prompts_en.jsonl \\
        --teacher ckpts/smollm2-135m --tokenizer ckpts/smollm2-135m/tokenizer --output runs/responses.jsonl
    torchrun --nproc-per-node 4 tools/generate_responses.py ... --tp 2    # TP=2 x DP=2
    python tools/generate_responses.py ... --dry-run                      # check inputs, print the plan

The launch flags and the init sequence are ``rgkd_megatron.cli.teacher_launch``'s, shared with
``build_teacher_cache``; each data-parallel replica generates a disjoint share of the batches and
rank 0 merges them. ``--temperature``/``--top-k``/``--top-p`` are the sampling settings
(``pbkd.temperature``/``top_k``/``top_p`` of a run), not the KD ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rgkd_megatron.cli.teacher_launch import (
    add_launch_flags,
    add_teacher_flags,
    launched_teacher,
    teacher_config,
)
from rgkd_megatron.config.generation import GenerationSettings
from rgkd_megatron.utils.cli_errors import cli_main
from rgkd_megatron.utils.cli_flags import add_common_flags

_DEFAULTS = GenerationSettings()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate_responses",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = p.add_argument_group("inputs and output")
    io.add_argument(
        "--prompts", required=True, help='JSONL of {"prompt": str[, "reference": str, ...]} records'
    )
    io.add_argument(
        "--output",
        required=True,
        help="JSONL to write: the input records in order (each --num-samples times), each with a 'response', 'truncated' (cut at --max-new-tokens without EOS) and 'sample' (atomic; OUT.meta.json and, while running, OUT.partial/ next to it)",
    )
    add_teacher_flags(io, old_teacher=("--load",))
    io.add_argument(
        "--tokenizer",
        required=True,
        help="tokenizer.json, sentencepiece .model, or a directory holding one (its tokenizer_config.json chat template / prompt_template is applied)",
    )
    io.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an output (and an interrupted run) made with other prompts, model or settings",
    )

    gen = p.add_argument_group("generation")
    gen.add_argument(
        "--batch-size",
        type=int,
        default=_DEFAULTS.batch_size,
        help="responses per generate call (prompt samples are batched by similar token length)",
    )
    gen.add_argument(
        "--num-samples",
        type=int,
        default=_DEFAULTS.num_samples,
        help="responses per prompt, written as consecutive records with 'sample' 0..N-1 (N > 1 needs --temperature > 0)",
    )
    gen.add_argument(
        "--max-new-tokens",
        type=int,
        default=_DEFAULTS.max_new_tokens,
        help="longest response in tokens (EOS included); longer responses are cut and marked 'truncated'",
    )
    gen.add_argument(
        "--temperature", type=float, default=_DEFAULTS.temperature, help="sampling temperature; 0 = greedy"
    )
    gen.add_argument(
        "--top-p",
        type=float,
        default=_DEFAULTS.top_p,
        help="nucleus sampling mass (1 = off; only with --temperature > 0)",
    )
    gen.add_argument(
        "--top-k",
        type=int,
        default=_DEFAULTS.top_k,
        help="sample among the k most likely ids (0 = off; only with --temperature > 0)",
    )
    gen.add_argument(
        "--seed",
        type=int,
        default=_DEFAULTS.seed,
        help="batch k is sampled with seed + k (same seed, same responses)",
    )

    add_launch_flags(
        p.add_argument_group("how the teacher runs"),
        timeout_minutes=60.0,
        dry_run="check the inputs, the model config and the output state, print the plan, load nothing",
        json_help="print the plan or the summary as one JSON object",
    )
    return add_common_flags(p)


def _settings(args: argparse.Namespace) -> GenerationSettings:
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, batch_size=args.batch_size, num_samples=args.num_samples,
    )  # fmt: skip
    try:
        settings.validate()
    except ValueError as exc:  # names the field: max_new_tokens is --max-new-tokens, and so on
        raise ValueError(f"generation flags: {exc}") from exc
    return settings


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything ``main`` does, raising on bad input; the summary (``"state"``: ``"dry_run"``,
    ``"done"`` for an output already complete, else the generator's)."""
    from rgkd_megatron.cache.manifest import teacher_fingerprint
    from rgkd_megatron.config import config_to_dict
    from rgkd_megatron.data.tokenizer import load_tokenizer
    from rgkd_megatron.generation.responses import (
        check_output_state,
        meta_path,
        plan_generation,
        read_prompt_records,
        response_identity,
    )
    from rgkd_megatron.models.builders import padded_vocab_size, resolve_params_dtype

    # every check below is read-only and runs on every rank before any collective: a bad input
    # fails the same way everywhere and nothing is written
    settings = _settings(args)
    records = read_prompt_records(args.prompts)
    tokenizer = load_tokenizer(args.tokenizer)
    cfg, load = teacher_config(args, seq_length=None)
    model_vocab = cfg.model.vocab_size or tokenizer.vocab_size
    if tokenizer.vocab_size > model_vocab:
        raise ValueError(
            f"--tokenizer: vocabulary of {tokenizer.vocab_size} ids exceeds the teacher's model.vocab_size {model_vocab}"
        )
    try:
        plan = plan_generation(records, tokenizer, settings, cfg.model.max_position_embeddings)
    except ValueError as exc:
        raise ValueError(f"--prompts {args.prompts}: {exc}") from exc
    params_dtype = str(resolve_params_dtype(cfg.model.params_dtype)).replace("torch.", "")
    model_dict = {**config_to_dict(cfg)["model"], "vocab_size": model_vocab, "load": None}
    padded = padded_vocab_size(model_vocab, cfg.model.make_vocab_size_divisible_by, 1)  # layout-free
    fingerprint = teacher_fingerprint(model_dict, padded, params_dtype, checkpoint=load)
    identity = response_identity(args.prompts, fingerprint, tokenizer, params_dtype, settings, len(records))
    state = check_output_state(args.output, identity, args.overwrite)
    if state == "done":
        meta = json.loads(meta_path(args.output).read_text(encoding="utf-8"))
        return {"state": "done", "output": args.output, "num_prompts": len(records),
                "num_samples": settings.num_samples, "num_records": plan.num_items,
                "num_truncated": meta.get("num_truncated")}  # fmt: skip
    if args.dry_run:
        return {"state": "dry_run", "output_state": state, "output": args.output, "num_prompts": len(records),
                "num_samples": settings.num_samples, "num_batches": len(plan.batches),
                "batch_size": settings.batch_size, "longest_prompt": max(len(ids) for ids in plan.prompt_ids),
                "max_new_tokens": settings.max_new_tokens, "max_positions": cfg.model.max_position_embeddings,
                "teacher_fingerprint": fingerprint}  # fmt: skip

    from rgkd_megatron.generation.responses import generate_responses

    with launched_teacher(args, cfg, load, model_vocab, args.seed) as (model, groups):
        summary = generate_responses(
            model, groups, plan, tokenizer, settings, args.output, identity, tokenizer.vocab_size,
            overwrite=args.overwrite, progress=not args.no_progress,
        )  # fmt: skip
    return summary


def _text(args: argparse.Namespace, s: dict[str, Any]) -> str:
    if s["state"] == "dry_run":
        return (f"plan: {s['num_prompts']} prompts x {s['num_samples']} samples in {s['num_batches']} batches "
                f"of <= {s['batch_size']}; longest prompt {s['longest_prompt']} tokens + {s['max_new_tokens']} "
                f"new <= {s['max_positions']}; output state: {s['output_state']}; "
                f"teacher {s['teacher_fingerprint'][:16]}...")  # fmt: skip
    if s["state"] == "done":
        return (f"{args.output} is up to date ({s['num_records']} responses, same prompts, model "
                "and settings): nothing to do")  # fmt: skip
    return (f"wrote {s['num_records']} responses ({s['num_prompts']} prompts x {s['num_samples']} samples) "
            f"to {args.output} ({s['generated_batches']} of {s['num_batches']} batches generated in this run, "
            f"{s['num_truncated']} responses cut at --max-new-tokens, marked truncated)")  # fmt: skip


@cli_main("generate_responses")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides before and after the flags
    summary = run(args)
    from rgkd_megatron.utils.logging import infer_rank

    if infer_rank() == 0:
        print(json.dumps(summary) if args.json else _text(args, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
