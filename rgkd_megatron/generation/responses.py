"""Teacher responses for a prompt set: batched generation under TP/PP/DP, resumable, written atomically.

Input: JSONL records ``{"prompt": str[, "reference": str, ...]}``. Output: ``num_samples`` records
per input record, consecutive, in input order, each
``{"prompt", "response", "reference", "truncated", "sample", ...}`` (the format ``rgkd-distill``
reads as ``pbkd.prompts_path``): ``truncated`` is true when the response was cut at
``max_new_tokens`` without sampling the EOS, ``sample`` is the 0-based sample index of the prompt;
other input fields are kept, ``reference`` is null when absent. Run by
``tools/generate_responses.py``; this module holds the logic so that it can be tested and reused.

Design choices:
- Canonical batches. Prompts are wrapped in the tokenizer's prompt template and tokenized exactly as
  ``pbkd.prompts.load_prompt_set`` does (no truncation: a prompt that does not fit is an error), then
  expanded to ``num_samples`` items per prompt (item ``j`` = prompt ``j // num_samples``, sample
  ``j % num_samples``), sorted by token length (ties by item index) and cut into batches of
  ``batch_size``. Similar lengths
  keep ``generate``'s per-sample offsets cheap (a row longer than the batch's shortest prompt is
  consumed one token per forward). Batch ``k`` is sampled with seed ``seed + k``. Nothing depends on
  the DP size or the rank, so any layout, and any resume, yields the same batches. The samples of
  one prompt usually share a batch: its rows draw their own uniforms from the batch's generator, so
  they still differ (``num_samples > 1`` needs ``temperature > 0``; greedy copies would be equal).
- Work split: DP rank ``d`` takes the pending batches ``d, d + dp, ...``; the TP x PP ranks of one
  replica run ``generate`` together (it returns the same output on all of them) and the replica's
  first rank (TP rank 0, first stage) saves each finished batch.
- Resume: every finished batch is a small JSON file in the sidecar directory ``<out>.partial/``
  (written atomically), next to ``identity.json``. A rerun skips the batches present. When all are
  done rank 0 merges them in prompt order, writes ``<out>`` (temp file + fsync + rename), then
  ``<out>.meta.json``, then removes the sidecar. A crash at any point leaves no partial ``<out>``.
- Identity (``<out>.meta.json``): sha256 of the prompts file, the model fingerprint (resolved model
  config + checkpoint metadata, as the teacher cache's), the tokenizer and prompt template hashes,
  the resolved parameter dtype and the generation settings (batch size included: with sampling it
  decides which rows share a generator). The TP/PP/DP layout is not part of it: another layout gives
  the same tokens up to floating-point differences of the logits. A rerun whose identity matches a
  finished output does nothing; a mismatch (or a sidecar from other settings) is an error unless
  ``overwrite``.
- Responses are decoded from the generated ids without the EOS id (when sampled). Responses cut at
  ``max_new_tokens`` are kept, marked ``"truncated": true`` (a consumer must not append an EOS to
  them) and counted in the summary and the metadata.

Usage (collective: every rank of the world calls it; the model is built for the role's groups)::

    records = read_prompt_records("prompts.jsonl")
    plan = plan_generation(records, tokenizer, settings, max_positions=model_cfg.max_position_embeddings)
    check_output_state(out, identity, overwrite)       # before building anything: 'done' -> stop
    summary = generate_responses(model, groups, plan, tokenizer, settings, out, identity, vocab_size)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from rgkd_megatron.config.generation import GenerationSettings
from rgkd_megatron.data.tokenizer import Tokenizer, file_sha256
from rgkd_megatron.generation.generate import generate
from rgkd_megatron.parallel.groups import RoleGroups
from rgkd_megatron.utils.jsonl import iter_jsonl
from rgkd_megatron.utils.logging import get_logger
from rgkd_megatron.utils.progress import ProgressBar

__all__ = [
    "FORMAT_NAME",
    "GenerationPlan",
    "GenerationSettings",
    "PromptRecord",
    "check_output_state",
    "generate_responses",
    "meta_path",
    "partial_dir",
    "plan_generation",
    "read_prompt_records",
    "response_identity",
    "strip_eos",
]

logger = get_logger(__name__)
FORMAT_NAME = "rgkd-responses"
FORMAT_VERSION = 2
"""2: every record carries ``truncated`` and ``sample``; ``settings.num_samples``."""
OUTPUT_FIELDS = ("prompt", "response", "reference", "truncated", "sample")
"""Fields the tool writes itself (an input field of the same name is not copied)."""


# --------------------------------------------------------------------------------------------------
# inputs


@dataclass(frozen=True)
class PromptRecord:
    """One input line."""

    line: int
    """1-based line number in the prompts file."""
    prompt: str
    reference: str | None
    extra: dict[str, Any] = field(default_factory=dict)
    """Other fields of the record, copied to the output (``OUTPUT_FIELDS`` excluded)."""


def read_prompt_records(path: str | os.PathLike) -> list[PromptRecord]:
    """Read and check a prompts JSONL file; errors name the file and line.

    Raises:
        FileNotFoundError: no such file.
        ValueError: invalid JSON, a record that is not an object, a missing/empty/non-string
            ``prompt``, a non-string ``reference``, or no records at all.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file {path} does not exist")
    records: list[PromptRecord] = []
    for lineno, where, obj in iter_jsonl(path):
        if "prompt" not in obj:
            raise ValueError(f"{where}: missing field 'prompt'")
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise ValueError(f"{where}: field 'prompt' must be a non-empty string, got {obj['prompt']!r}")
        reference = obj.get("reference")
        if reference is not None and not isinstance(reference, str):
            raise ValueError(f"{where}: field 'reference' must be a string or null, got {reference!r}")
        extra = {k: v for k, v in obj.items() if k not in OUTPUT_FIELDS}
        records.append(PromptRecord(lineno, obj["prompt"], reference, extra))
    if not records:
        raise ValueError(f"{path}: no records")
    return records


@dataclass(frozen=True)
class GenerationPlan:
    """Tokenized prompts and the canonical batches of items (prompt samples)."""

    records: list[PromptRecord]
    prompt_ids: list[list[int]]
    batches: list[list[int]]
    """Batch k = the item indices it holds (ascending token length); item ``j`` is sample
    ``j % num_samples`` of record ``j // num_samples``, and the output holds the items in order."""
    num_samples: int = 1

    @property
    def num_items(self) -> int:
        return len(self.records) * self.num_samples

    def item(self, j: int) -> tuple[int, int]:
        """(record index, sample index) of item ``j``."""
        return divmod(j, self.num_samples)


def plan_generation(
    records: list[PromptRecord], tokenizer: Tokenizer, settings: GenerationSettings, max_positions: int
) -> GenerationPlan:
    """Tokenize (prompt template applied) and cut canonical batches; a prompt that leaves no room for
    ``max_new_tokens`` within ``max_positions`` is an error naming its line."""
    settings.validate()
    prompt_ids = [tokenizer.encode(tokenizer.apply_prompt_template(r.prompt)) for r in records]
    room = max_positions - settings.max_new_tokens
    for record, ids in zip(records, prompt_ids):
        if len(ids) > room:
            raise ValueError(
                f"line {record.line}: the prompt is {len(ids)} tokens after the prompt template; with "
                f"--max-new-tokens {settings.max_new_tokens} that exceeds the model's "
                f"max_position_embeddings={max_positions} (shorten the prompt or lower --max-new-tokens)"
            )
    n = settings.num_samples
    order = sorted(range(len(records) * n), key=lambda j: (len(prompt_ids[j // n]), j))
    size = settings.batch_size
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    return GenerationPlan(records, prompt_ids, batches, n)


def response_identity(
    prompts_path: str | os.PathLike,
    model_fingerprint: str,
    tokenizer: Tokenizer,
    params_dtype: str,
    settings: GenerationSettings,
    num_prompts: int,
) -> dict[str, Any]:
    """What the output depends on (compared on reruns; recorded in ``<out>.meta.json``)."""
    template = tokenizer.chat_template if tokenizer.chat_template is not None else tokenizer.prompt_template
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "prompts_sha256": file_sha256(os.fspath(prompts_path)),
        "num_prompts": num_prompts,
        "model_fingerprint": model_fingerprint,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "prompt_template_sha256": hashlib.sha256((template or "").encode()).hexdigest(),
        "params_dtype": params_dtype,
        "settings": asdict(settings),
    }


# --------------------------------------------------------------------------------------------------
# files


def meta_path(out: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(out)}.meta.json")


def partial_dir(out: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(out)}.partial")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _differences(old: Any, new: dict[str, Any]) -> list[str]:
    """Human-readable names of the identity fields that differ."""
    if not isinstance(old, dict):
        return ["(unreadable metadata)"]
    names = []
    for key, value in new.items():
        if key == "settings" and isinstance(old.get(key), dict):
            names += [f"settings.{k}" for k, v in value.items() if old[key].get(k) != v]
        elif old.get(key) != value:
            names.append(key)
    return names


def check_output_state(out: str | os.PathLike, identity: dict[str, Any], overwrite: bool) -> str:
    """Read-only look at ``out`` and its sidecars; returns 'done', 'resume', 'fresh' or 'overwrite'.

    'done': the output exists and its metadata matches ``identity`` (and its sha256). 'resume': a
    sidecar of the same identity exists. 'overwrite': something different exists and ``overwrite``
    is set (``generate_responses`` clears it). Raises ValueError on a mismatch without ``overwrite``.
    """
    out = Path(out)
    meta, sidecar = meta_path(out), partial_dir(out)
    if out.is_dir():
        raise ValueError(f"--output {out} is a directory; expected a file path")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--output {out}: directory {out.parent} does not exist")
    partial_identity = _read_json(sidecar / "identity.json") if sidecar.is_dir() else None
    problems: list[str] = []
    if out.exists():
        saved = _read_json(meta) if meta.is_file() else None
        if saved is None:
            if partial_identity == identity:
                return "resume"  # interrupted between writing the output and its metadata
            problems.append(
                f"{out} exists but {meta.name} is missing or unreadable (not written by this tool?)"
            )
        else:
            diff = _differences(saved.get("identity"), identity)
            if not diff and saved.get("output_sha256") != file_sha256(str(out)):
                diff = ["output_sha256 (the output was modified after generation)"]
            if not diff:
                return "done"
            problems.append(f"{out} was generated with different {', '.join(diff)}")
    if sidecar.is_dir():
        if partial_identity == identity:
            return "resume" if not problems else ("overwrite" if overwrite else _raise(problems))
        diff = _differences(partial_identity, identity)
        problems.append(f"{sidecar} holds an interrupted run with different {', '.join(diff)}")
    if problems:
        return "overwrite" if overwrite else _raise(problems)
    return "fresh"


def _raise(problems: list[str]) -> str:
    raise ValueError("; ".join(problems) + "; pass --overwrite to replace it")


def strip_eos(ids: list[int], finished: bool) -> list[int]:
    """Response ids without the EOS id ``generate`` appends when a sample stops on it."""
    return ids[:-1] if finished and ids else ids


# --------------------------------------------------------------------------------------------------
# the collective run


def generate_responses(
    model: Any,
    groups: RoleGroups,
    plan: GenerationPlan,
    tokenizer: Tokenizer,
    settings: GenerationSettings,
    out: str | os.PathLike,
    identity: dict[str, Any],
    vocab_size: int,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate every pending batch (DP-split), then merge on rank 0. Collective over the world.

    Returns a summary (identical on every rank): {'state', 'num_prompts', 'num_samples',
    'num_records', 'num_batches', 'generated_batches', 'num_truncated', 'output'}; 'state' is 'done'
    when nothing was to do ('num_truncated' then comes from the metadata).
    """
    out = Path(out)
    sidecar = partial_dir(out)
    rank = dist.get_rank()
    decision: list[Any] = [None]
    if rank == 0:
        try:
            state = check_output_state(out, identity, overwrite)
            if state == "overwrite":  # a sidecar of this very identity is kept: it is valid progress
                for path in (out, meta_path(out)):
                    path.unlink(missing_ok=True)
                if _read_json(sidecar / "identity.json") != identity:
                    shutil.rmtree(sidecar, ignore_errors=True)
            if state != "done" and not sidecar.is_dir():  # created whole: never without its identity
                tmp = sidecar.with_name(f"{sidecar.name}.tmp{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                _write_atomic(tmp / "identity.json", json.dumps(identity, indent=1, sort_keys=True))
                os.replace(tmp, sidecar)
            finished = (
                sorted(int(p.stem.split("_")[1]) for p in sidecar.glob("batch_*.json"))
                if state != "done"
                else []
            )
            decision[0] = {"state": state, "finished": finished}
        except (ValueError, OSError) as exc:
            decision[0] = {"error": f"{type(exc).__name__}: {exc}"}
    dist.broadcast_object_list(decision, src=0)
    if "error" in decision[0]:
        raise ValueError(decision[0]["error"])
    state, finished = decision[0]["state"], set(decision[0]["finished"])
    summary = {"state": state, "num_prompts": len(plan.records), "num_samples": plan.num_samples,
               "num_records": plan.num_items, "num_batches": len(plan.batches),
               "generated_batches": 0, "output": str(out)}  # fmt: skip
    if state == "done":
        summary["num_truncated"] = _read_json(meta_path(out)).get("num_truncated")
        return summary

    dp, dp_rank = groups.layout.dp, groups.dp_rank
    pending = [k for k in range(len(plan.batches)) if k not in finished]
    mine = pending[dp_rank::dp]
    writer = groups.tp_rank == 0 and groups.is_first_stage
    if finished:
        logger.info(
            "resuming: %d of %d batches already done in %s", len(finished), len(plan.batches), sidecar
        )
    bar_desc = "generate" if dp == 1 else f"generate (dp 0/{dp})"
    with ProgressBar(total=sum(len(plan.batches[k]) for k in mine), desc=bar_desc, unit="response",
                     enabled=progress) as bar:  # fmt: skip
        for k in mine:
            indices = plan.batches[k]
            result = generate(
                model, groups, [plan.prompt_ids[plan.item(j)[0]] for j in indices],
                max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                top_p=settings.top_p, top_k=settings.top_k, eos_id=tokenizer.eos_id,
                pad_id=tokenizer.pad_id, seed=settings.seed + k, vocab_size=vocab_size,
            )  # fmt: skip
            ids = result.response_ids()
            done = result.finished.tolist()
            if writer:
                texts = [tokenizer.decode(strip_eos(r, f)) for r, f in zip(ids, done)]
                batch = {"batch": k, "indices": indices, "responses": texts, "finished": done,
                         "num_tokens": [len(r) for r in ids]}  # fmt: skip
                _write_atomic(sidecar / f"batch_{k:06d}.json", json.dumps(batch, ensure_ascii=False))
            bar.update(len(indices), tokens=int(result.response_lengths.sum()))
            summary["generated_batches"] += 1
    dist.barrier()
    merged: list[Any] = [None]
    if rank == 0:
        try:
            merged[0] = _merge(plan, out, identity, sidecar)
        except (ValueError, OSError) as exc:
            merged[0] = {"error": f"{type(exc).__name__}: {exc}"}
    dist.broadcast_object_list(merged, src=0)
    if "error" in merged[0]:
        raise ValueError(merged[0]["error"])
    summary["generated_batches"] = _sum_over_world(summary["generated_batches"], groups)
    summary["num_truncated"] = merged[0]["num_truncated"]
    return summary


def _sum_over_world(count: int, groups: RoleGroups) -> int:
    """Batches generated by all DP replicas (each replica counted once)."""
    counts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(counts, (groups.tp_rank == 0 and groups.is_first_stage, count))
    return sum(c for first, c in counts if first)


def _merge(plan: GenerationPlan, out: Path, identity: dict[str, Any], sidecar: Path) -> dict[str, Any]:
    """Rank 0: the sidecar's batches -> ``out`` in item order, then its metadata; sidecar removed."""
    responses: list[str | None] = [None] * plan.num_items
    finished: list[bool] = [False] * plan.num_items
    for k, indices in enumerate(plan.batches):
        batch = _read_json(sidecar / f"batch_{k:06d}.json")
        if batch is None or batch.get("indices") != indices:
            raise ValueError(
                f"{sidecar}: batch {k} is missing or does not match the plan; rerun to regenerate it"
            )
        for i, text, done in zip(indices, batch["responses"], batch["finished"]):
            responses[i], finished[i] = text, done
    lines = []
    for j, (response, done) in enumerate(zip(responses, finished)):
        i, sample = plan.item(j)
        record = plan.records[i]
        row = {"prompt": record.prompt, "response": response, "reference": record.reference,
               "truncated": not done, "sample": sample, **record.extra}  # fmt: skip
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    _write_atomic(out, "".join(lines))
    num_truncated = finished.count(False)
    meta = {"identity": identity, "output_sha256": file_sha256(str(out)), "num_records": len(lines),
            "num_prompts": len(plan.records), "num_samples": plan.num_samples,
            "num_truncated": num_truncated}  # fmt: skip
    _write_atomic(meta_path(out), json.dumps(meta, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(sidecar, ignore_errors=True)
    logger.info("wrote %d responses (%d prompts x %d samples) to %s; %d of them cut at max_new_tokens "
                "(marked truncated)", len(lines), len(plan.records), plan.num_samples, out,
                num_truncated)  # fmt: skip
    return {"num_truncated": num_truncated}
