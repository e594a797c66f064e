"""Measure which teacher layers a depth-pruned student should keep (HF transformers, CPU, fp32).

Candidate sets for keeping ``K`` of ``L`` layers (``n = L - K`` layers dropped):

- ``evenly_spaced``: ``prune.evenly_spaced_layers(L, K)`` (first and last kept).
- ``drop_deep_block``: drop the contiguous block ``[K-1, L-1)``: keep layers ``0..K-2`` and ``L-1``.
- ``angular_block`` (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"):
  drop the block ``[l*, l*+n)`` minimising the angular distance between its input and its output

      d(l, l+n) = mean_t arccos( <h_l[t], h_{l+n}[t]> / (|h_l[t]| |h_{l+n}[t]|) ) / pi,

  where ``h_l`` is the input hidden state of layer ``l`` (``h_L``: the last layer's output, before the
  final norm) and ``t`` runs over every token of the probe texts (padding excluded). Only blocks that
  keep layer 0 and layer ``L-1`` are considered: ``1 <= l <= L-1-n``; ties go to the smallest ``l``.
- ``block_influence`` (ShortGPT, Men et al. 2024): keep the ``K`` layers with the largest
  ``BI_l = 1 - mean_t cos(h_l[t], h_{l+1}[t])`` (input vs output of layer ``l``), in their order.

Hidden states come from one teacher forward with ``output_hidden_states=True`` (plus a hook on the
last layer for its pre-norm output) over the probe texts; the same forward gives the teacher's NLL.

Score of a candidate: teacher-forced NLL, in nats per token, of the teacher with only the candidate's
layers (``model.model.layers`` swapped for a ``ModuleList`` of the kept ones, attention ``layer_idx``
renumbered, ``use_cache=False``; nothing is copied), pooled over the scored tokens of all samples:

    NLL = - sum_{i, t in R_i} log softmax(z_i[t-1])[x_i[t]] / sum_i |R_i|,

where sample ``i`` is ``x_i = encode(prompt template(prompt)) + encode(response) + [EOS]`` (the
training convention of ``data.batching.make_sft_sample``) and ``R_i`` are the positions of the
response tokens and the EOS. Lower is better; ``best_layer_set`` picks the lowest.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Protocol, Sequence

import torch

from rgkd_megatron.convert.common import ConversionError
from rgkd_megatron.convert.prune import evenly_spaced_layers
from rgkd_megatron.utils.logging import get_logger
from rgkd_megatron.utils.progress import ProgressBar

logger = get_logger(__name__)

__all__ = [
    "LayerStats",
    "ProbeReport",
    "best_layer_set",
    "candidate_layer_sets",
    "encode_pairs",
    "layer_statistics",
    "probe_layer_sets",
    "pruned_view",
    "read_probe_pairs",
    "response_nll",
    "run_probe",
]

Sample = tuple[list[int], int]  # (token ids, number of prompt tokens)


class PromptTokenizer(Protocol):
    """What the probe needs of a tokenizer (``rgkd_megatron.data.tokenizer.Tokenizer`` has it)."""

    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def apply_prompt_template(self, prompt: str) -> str: ...


def read_probe_pairs(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, str]]:
    """The first ``limit`` records ``{"prompt": str, "response": str}`` of a JSONL file (blank lines skipped).

    Raises ``ConversionError`` naming the file and the line for unreadable JSON, a non-object record or
    a missing / non-string field, and naming the file when it is missing or holds no record.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConversionError(f"--probe {path}: no such file")
    pairs: list[dict[str, str]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(pairs) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ConversionError(f"{path}:{lineno}: not valid JSON: {exc}") from exc
            if not isinstance(record, dict):
                raise ConversionError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            for key in ("prompt", "response"):
                if not isinstance(record.get(key), str):
                    what = "missing" if key not in record else f"not a string ({type(record[key]).__name__})"
                    raise ConversionError(f"{path}:{lineno}: field '{key}' {what}")
            pairs.append({"prompt": record["prompt"], "response": record["response"]})
    if not pairs:
        raise ConversionError(f"--probe {path}: no records")
    return pairs


def encode_pairs(
    tokenizer: PromptTokenizer, pairs: Sequence[Mapping[str, str]], max_tokens: int = 512
) -> list[Sample]:
    """``(template(prompt) + response + [EOS], len(prompt ids))`` per pair, cut to ``max_tokens``.

    Pairs left with no scored token after the cut are skipped (a warning says how many).
    """
    samples: list[Sample] = []
    for pair in pairs:
        prompt = tokenizer.encode(tokenizer.apply_prompt_template(pair["prompt"]))
        ids = (prompt + tokenizer.encode(pair["response"]) + [int(tokenizer.eos_id)])[:max_tokens]
        if len(ids) > len(prompt) >= 1:
            samples.append((ids, len(prompt)))
    if len(samples) < len(pairs):
        logger.warning(
            "probe: %d of %d pairs skipped (prompt >= %d tokens)",
            len(pairs) - len(samples),
            len(pairs),
            max_tokens,
        )
    if not samples:
        raise ConversionError(f"probe: no sample has a response token within {max_tokens} tokens")
    return samples


def _batches(
    samples: Sequence[Sample], batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Right-padded ``(input_ids, attention_mask, score_mask)``, samples sorted by length.

    ``score_mask[b, t]`` is 1 where the logits at position ``t`` predict a scored token ``t + 1``.
    """
    order = sorted(samples, key=lambda s: len(s[0]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        attention = torch.zeros(len(chunk), width, dtype=torch.long)
        score = torch.zeros(len(chunk), width - 1, dtype=torch.float64)
        for b, (ids, prompt_len) in enumerate(chunk):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attention[b, : len(ids)] = 1
            score[b, prompt_len - 1 : len(ids) - 1] = 1.0
        yield input_ids, attention, score


def _nll_sum(logits: torch.Tensor, input_ids: torch.Tensor, score: torch.Tensor) -> float:
    """Sum of ``-log softmax(logits[:, t])[input_ids[:, t+1]]`` over the positions ``score`` selects."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1).double()
    return float(-(target * score).sum())


@contextlib.contextmanager
def pruned_view(model: torch.nn.Module, layers: Sequence[int]) -> Iterator[torch.nn.Module]:
    """``model`` with only ``layers`` (in order) in ``model.model.layers``; restored on exit.

    Also sets ``config.num_hidden_layers`` (and ``layer_types`` when present) and renumbers each kept
    attention's ``layer_idx`` as the pruned checkpoint would have it.
    """
    decoder, config = model.model, model.config
    full = decoder.layers
    total = len(full)
    layers = list(layers)
    if (
        not layers
        or any(not 0 <= i < total for i in layers)
        or any(b <= a for a, b in zip(layers, layers[1:]))
    ):
        raise ConversionError(f"probe: layers {layers} are not strictly increasing indices in [0, {total})")
    saved_idx = [getattr(layer.self_attn, "layer_idx", None) for layer in full]
    saved_n = config.num_hidden_layers
    saved_types = getattr(config, "layer_types", None)
    try:
        decoder.layers = torch.nn.ModuleList(full[i] for i in layers)
        config.num_hidden_layers = len(layers)
        if isinstance(saved_types, list) and len(saved_types) == total:
            config.layer_types = [saved_types[i] for i in layers]
        for new, layer in enumerate(decoder.layers):
            if hasattr(layer.self_attn, "layer_idx"):
                layer.self_attn.layer_idx = new
        yield model
    finally:
        decoder.layers = full
        config.num_hidden_layers = saved_n
        if isinstance(saved_types, list):
            config.layer_types = saved_types
        for layer, idx in zip(full, saved_idx):
            if idx is not None:
                layer.self_attn.layer_idx = idx


@torch.no_grad()
def response_nll(model: torch.nn.Module, samples: Sequence[Sample], batch_size: int = 4) -> float:
    """Teacher-forced NLL (nats/token) of ``model`` over the scored tokens of ``samples`` (see module doc)."""
    total, count = 0.0, 0.0
    for input_ids, attention, score in _batches(samples, batch_size):
        logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
        total += _nll_sum(logits, input_ids, score)
        count += float(score.sum())
    return total / count


@dataclass
class LayerStats:
    """Per-layer statistics of the teacher over the probe texts.

    ``angular[l] = d(l, l + block)`` for ``l = 0..L-block`` (module doc); ``block_influence[l] = BI_l``
    for ``l = 0..L-1``; ``teacher_nll``: NLL of the unpruned teacher; ``tokens``: tokens averaged over.
    """

    block: int
    angular: list[float]
    block_influence: list[float]
    teacher_nll: float
    tokens: int


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)).clamp(-1.0, 1.0)


@torch.no_grad()
def layer_statistics(
    model: torch.nn.Module, samples: Sequence[Sample], block: int, batch_size: int = 4
) -> LayerStats:
    """Angular distances for blocks of ``block`` layers, Block Influence and the teacher NLL: one pass."""
    total = len(model.model.layers)
    if not 1 <= block < total:
        raise ConversionError(f"probe: block size {block} must be in [1, {total - 1}]")
    last_out: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        last_out.append(output[0] if isinstance(output, tuple) else output)

    ang = torch.zeros(total - block + 1, dtype=torch.float64)
    cos = torch.zeros(total, dtype=torch.float64)
    nll, scored, tokens = 0.0, 0.0, 0
    handle = model.model.layers[-1].register_forward_hook(hook)
    try:
        for input_ids, attention, score in _batches(samples, batch_size):
            last_out.clear()
            out = model(
                input_ids=input_ids, attention_mask=attention, output_hidden_states=True, use_cache=False
            )
            # hidden_states[l] is the input of layer l for l < L (hidden_states[L] is after the final norm)
            states = list(out.hidden_states[:total]) + [last_out[-1]]
            real = attention.bool()
            flat = [s[real] for s in states]  # [tokens, hidden] each
            for i in range(total - block + 1):
                ang[i] += (torch.arccos(_cosine(flat[i], flat[i + block])) / math.pi).sum()
            for i in range(total):
                cos[i] += _cosine(flat[i], flat[i + 1]).sum()
            tokens += int(real.sum())
            nll += _nll_sum(out.logits, input_ids, score)
            scored += float(score.sum())
    finally:
        handle.remove()
    return LayerStats(
        block=block,
        angular=(ang / tokens).tolist(),
        block_influence=(1.0 - cos / tokens).tolist(),
        teacher_nll=nll / scored,
        tokens=tokens,
    )


def candidate_layer_sets(stats: LayerStats, total: int, keep: int) -> list[tuple[str, list[int], str]]:
    """``(name, kept layers, how it was chosen)`` for the four criteria of the module doc, in order."""
    n = total - keep
    if not 2 <= keep < total or stats.block != n:
        raise ConversionError(
            f"probe: --num-layers must be in [2, {total - 1}] (got {keep}, block {stats.block})"
        )
    evenly = evenly_spaced_layers(total, keep)
    deep = list(range(keep - 1)) + [total - 1]
    starts = range(1, total - n)  # blocks [l, l+n) with l >= 1 and l + n <= L - 1
    best = min(starts, key=lambda i: (stats.angular[i], i))
    angular = [i for i in range(total) if not best <= i < best + n]
    ranked = sorted(range(total), key=lambda i: (-stats.block_influence[i], i))
    shortgpt = sorted(ranked[:keep])
    return [
        ("evenly_spaced", evenly, "round(i * (L-1) / (K-1))"),
        ("drop_deep_block", deep, f"drop [{keep - 1}, {total - 1})"),
        ("angular_block", angular, f"drop [{best}, {best + n}): d = {stats.angular[best]:.4f}"),
        ("block_influence", shortgpt, "top-K BI = 1 - cos(h_in, h_out)"),
    ]


@dataclass
class ProbeReport:
    """All a probe measured; ``candidates`` sorted best (lowest NLL) first."""

    candidates: list[dict[str, Any]]
    stats: LayerStats
    samples: int
    scored_tokens: int
    seconds: float

    @property
    def best(self) -> dict[str, Any]:
        return best_layer_set(self.candidates)


def best_layer_set(candidates: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The candidate with the lowest ``nll`` (ties: the first in the given order)."""
    if not candidates:
        raise ConversionError("probe: no candidates")
    return dict(min(candidates, key=lambda c: c["nll"]))


def run_probe(
    model: torch.nn.Module,
    tokenizer: PromptTokenizer,
    pairs: Sequence[Mapping[str, str]],
    keep: int,
    max_tokens: int = 512,
    batch_size: int = 4,
    progress: bool = True,
) -> ProbeReport:
    """Score every candidate set for keeping ``keep`` layers; see the module doc for the definitions."""
    start = time.perf_counter()
    model.eval()
    total = len(model.model.layers)
    if isinstance(keep, bool) or not isinstance(keep, int) or not 2 <= keep < total:
        raise ConversionError(f"probe: --num-layers must be an integer in [2, {total - 1}], got {keep!r}")
    samples = encode_pairs(tokenizer, pairs, max_tokens)
    vocab = model.get_input_embeddings().weight.shape[0]
    if (top := max(max(ids) for ids, _ in samples)) >= vocab:
        raise ConversionError(
            f"probe: token id {top} >= the model's vocabulary size {vocab}: wrong tokenizer?"
        )
    scored = sum(len(ids) - p for ids, p in samples)
    logger.info(
        "probe: %d samples, %d tokens (%d scored); teacher pass with hidden states",
        len(samples),
        sum(len(i) for i, _ in samples),
        scored,
    )
    stats = layer_statistics(model, samples, total - keep, batch_size)
    logger.info(
        "probe: teacher (%d layers) NLL %.4f (%.1f s)", total, stats.teacher_nll, time.perf_counter() - start
    )
    results: list[dict[str, Any]] = []
    cache: dict[tuple[int, ...], float] = {}
    sets = candidate_layer_sets(stats, total, keep)
    with ProgressBar(total=len(sets), desc="probe", unit="set", enabled=progress) as bar:
        for name, layers, how in sets:
            t0 = time.perf_counter()
            if tuple(layers) not in cache:
                with pruned_view(model, layers):
                    cache[tuple(layers)] = response_nll(model, samples, batch_size)
            nll = cache[tuple(layers)]
            results.append({"name": name, "layers": layers, "nll": nll, "how": how})
            logger.info("probe: %-16s %s NLL %.4f (%.1f s)", name, layers, nll, time.perf_counter() - t0)
            bar.update(1)
    ranked = sorted(results, key=lambda c: c["nll"])  # stable: ties keep the candidate order
    return ProbeReport(ranked, stats, len(samples), scored, time.perf_counter() - start)


def probe_layer_sets(
    model: torch.nn.Module,
    tokenizer: PromptTokenizer,
    pairs: Sequence[Mapping[str, str]],
    keep: int,
    max_tokens: int = 512,
    batch_size: int = 4,
) -> list[dict[str, Any]]:
    """``[{name, layers, nll, how}]`` for every candidate set, best (lowest NLL) first."""
    return run_probe(model, tokenizer, pairs, keep, max_tokens, batch_size, progress=False).candidates
