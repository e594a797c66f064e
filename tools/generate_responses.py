"""Generate a teacher's responses for a prompt set: ``{prompt, response, reference, truncated, sample}`` JSONL.

The output is what ``rgkd-distill`` reads as ``pbkd.prompts_path``. The teacher is a megatron
dist_checkpointing directory (any TP/PP it was saved at) plus a YAML whose ``model`` section
describes it (``model_config.yaml`` written next to a converted checkpoint, or a run's
``config.yaml``). Prompts go through the tokenizer's prompt template (the chat template for
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
        --load ckpts/smollm2-135m --tokenizer ckpts/smollm2-135m/tokenizer --output runs/responses.jsonl
    torchrun --nproc-per-node 4 tools/generate_responses.py ... --tp 2    # TP=2 x DP=2
    python tools/generate_responses.py ... --dry-run                      # check inputs, print the plan

The launcher (torchrun / srun / mpirun / single process) is detected as for ``rgkd-train``; each
data-parallel replica generates a disjoint share of the batches and rank 0 merges them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rgkd_megatron.generation.responses import GenerationSettings
from rgkd_megatron.utils.cli_errors import add_debug_flag, cli_main

_DEFAULTS = GenerationSettings()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate_responses.py",
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
    io.add_argument(
        "--load",
        default=None,
        help="teacher weights: a megatron dist_checkpointing directory or a Hugging Face folder (config.json + safetensors); if omitted: the 'load' field of --model-config",
    )
    io.add_argument(
        "--model-config",
        default=None,
        help="YAML with a 'model' section describing the teacher (if omitted: the architecture of --load, from its config.json or model_config.yaml)",
    )
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

    run = p.add_argument_group("how the teacher runs")
    run.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    run.add_argument("--pp", type=int, default=1, help="pipeline-parallel size; DP = world size / (TP * PP)")
    run.add_argument(
        "--backend",
        choices=("auto", "nccl", "gloo"),
        default="auto",
        help="torch.distributed backend (auto: nccl with CUDA)",
    )
    run.add_argument(
        "--timeout-minutes",
        type=float,
        default=60.0,
        help="collective timeout (replicas wait for each other before the merge)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging level"
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="check the inputs, the model config and the output state, print the plan, load nothing",
    )
    return p  # fmt: skip


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


def model_config(args: argparse.Namespace) -> tuple[Any, str]:
    """(validated RGKDConfig holding the teacher's model section and the TP/PP layout, checkpoint dir)."""
    import yaml

    from rgkd_megatron.config import config_from_dict, validate_config
    from rgkd_megatron.config.architecture import resolve_architecture
    from rgkd_megatron.convert.detect import checkpoint_model_fields

    if args.model_config is None and args.load is None:
        raise ValueError("--model-config: required (or --load DIR: a Hugging Face folder or a megatron checkpoint)")
    section: dict = {}
    if args.model_config:
        path = Path(args.model_config)
        if not path.is_file():
            raise FileNotFoundError(f"--model-config {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ValueError(f"--model-config {path}: invalid YAML ({exc})") from exc
        section = raw.get("model", raw) if isinstance(raw, dict) else None
        if not isinstance(section, dict):
            raise ValueError(f"--model-config {path}: expected a mapping with a 'model' section")
    where = f"--model-config {args.model_config}" if args.model_config else f"--load {args.load}"
    try:
        cfg = config_from_dict({"model": section})
        load = args.load or cfg.model.load
        if not load:
            raise ValueError(f"--load: required ({args.model_config} names no model.load)")
        if not Path(load).is_dir():
            raise FileNotFoundError(f"--load {load}: checkpoint directory does not exist")
        if not args.model_config and checkpoint_model_fields(load, "--load") is None:
            raise ValueError("--model-config: required, the checkpoint has no model_config.yaml")
        cfg.model = resolve_architecture(cfg.model, load, "--load", explicit=set(section))
        cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = args.tp, args.pp
        cfg.data.seq_length = cfg.model.max_position_embeddings
        validate_config(cfg)
    except FileNotFoundError:
        raise
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    return cfg, load


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Everything ``main`` does, raising on bad input; the summary, or None for a dry run."""
    import torch.distributed as dist
    from megatron.core import parallel_state

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
    cfg, load = model_config(args)
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
        longest = max(len(ids) for ids in plan.prompt_ids)
        print(f"plan: {len(records)} prompts x {settings.num_samples} samples in {len(plan.batches)} "
              f"batches of <= {settings.batch_size}; "
              f"longest prompt {longest} tokens + {settings.max_new_tokens} new <= "
              f"{cfg.model.max_position_embeddings}; output state: {state}; teacher {fingerprint[:16]}...")  # fmt: skip
        return None

    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    from rgkd_megatron.convert.hf_load import load_weights
    from rgkd_megatron.generation.responses import generate_responses
    from rgkd_megatron.models.builders import build_teacher
    from rgkd_megatron.parallel.groups import layout_for_world
    from rgkd_megatron.parallel.launch import init_distributed
    from rgkd_megatron.training.setup import init_role, teardown_roles
    from rgkd_megatron.utils.logging import setup_logging

    created_pg = not dist.is_initialized()
    created_groups = not parallel_state.model_parallel_is_initialized()
    try:
        env = init_distributed(backend=args.backend, timeout_s=args.timeout_minutes * 60)
        setup_logging(args.log_level, rank=env.rank)
        layout = layout_for_world(args.tp, args.pp, dist.get_world_size())
        groups = init_role(layout, seed=args.seed)
        model = build_teacher(cfg.model, cfg.parallel, groups, model_vocab)
        try:
            load_weights(load, model, "--load")
        except (Exception, CheckpointException) as exc:  # several kinds on a shape/key mismatch
            reason = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
            raise ValueError(
                f"--load {load}: cannot load these weights into the model of --model-config: {reason[-1]}"
            ) from exc
        return generate_responses(
            model, groups, plan, tokenizer, settings, args.output, identity, tokenizer.vocab_size,
            overwrite=args.overwrite, progress=not args.no_progress,
        )  # fmt: skip
    finally:
        if created_groups and parallel_state.model_parallel_is_initialized():
            teardown_roles()
        if created_pg and dist.is_initialized():
            dist.destroy_process_group()


@cli_main("generate_responses")
def main(argv: list[str] | None = None) -> int:
    args = add_debug_flag(build_parser()).parse_args(argv)
    try:
        summary = run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"generate_responses: error: {exc}", file=sys.stderr)
        return 2
    if summary is None:
        return 0
    from rgkd_megatron.utils.logging import infer_rank

    if infer_rank() == 0:
        if summary["state"] == "done":
            print(f"{args.output} is up to date ({summary['num_records']} responses, same prompts, model "
                  "and settings): nothing to do")  # fmt: skip
        else:
            print(f"wrote {summary['num_records']} responses ({summary['num_prompts']} prompts x "
                  f"{summary['num_samples']} samples) to {args.output} ({summary['generated_batches']} of "
                  f"{summary['num_batches']} batches generated in this run, {summary['num_truncated']} "
                  f"responses cut at --max-new-tokens, marked truncated)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
