"""Batched generation and teacher-forced scoring on megatron-core GPTModel, under TP and PP.

Shape legend (suffixes): ``b`` samples, ``s`` positions fed to one forward, ``l`` a full row
(prompt + response), ``r`` response positions, ``v`` vocabulary (padded), ``h`` hidden size.

Design choices:
- KV cache: megatron-core's ``StaticInferenceContext`` passed as ``inference_context`` to
  ``GPTModel.forward`` (it works on CPU: the cache buffers are plain tensors, allocated on the first
  forward, one pair per layer of the local stage). One prefill forward, then one token per forward.
  ``use_kv_cache=False`` recomputes the whole prefix every step (a reference and a benchmark).
  On one CPU rank with an fp32 model the cached forward is ``lean_decode.LeanDecoder`` instead (the
  same mathematics over the same parameters, with its own cache of rotated keys and far less
  framework work per step; ``decode_path="megatron"`` keeps megatron's path there too).
- Prompts of different lengths: per-sample offsets, as megatron's static engine does. Rows are
  right-padded into one [b, max_prompt + max_new_tokens] buffer; the prefill covers the shortest
  prompt; at each later position a row still inside its prompt is fed its own prompt token (the
  sampled one is discarded), the others their sampled token. Every row therefore sits at its true
  positions (RoPE angles = slot index = position) and no attention mask is needed, which keeps the
  path correct with any attention backend (local, Transformer Engine, flash-decode). Left padding
  would need a padding mask that TE's causal/no-mask kernels ignore. The price: rows longer than the
  shortest prompt are consumed one token per forward, so batch prompts of similar lengths when speed
  matters.
- Sampling happens on the last pipeline stage on the TP-gathered full-vocab logits (the inference
  forward gathers them), with a ``torch.Generator`` seeded by ``seed``. TP rank 0's ids and
  log-probs are broadcast over the last stage's TP group (so the TP ranks agree bit for bit), then
  from the last stage to every stage over the role's PP group. Every rank then applies the same
  update, so all stages agree on the tokens and on when every sample has finished; all ranks of the
  role return the same ``GenerationOutput``. Only the role's explicit groups are used
  (``groups.pg_collection.tp`` / ``.pp``), never megatron's parallel_state globals.
- PP: stage i receives the hidden states [s, b, h] from stage i-1 (``recv_from_prev_pipeline_rank_``
  of megatron-core's inference utilities, with the role's PP group) and sends its output to stage i+1.
- Stopping: a row stops after sampling ``eos_id`` (``finished=True``) or after ``max_new_tokens``;
  its later positions hold ``pad_id``. The loop ends when every row has stopped.
- During a call the model is in eval mode, under ``torch.no_grad``, with sequence parallelism
  switched off (as megatron's inference does; a decode step feeds one token); all three are
  restored afterwards (``inference_mode``). ``stage_forward`` and ``broadcast_from_last_stage``
  are the PP building blocks, public for other inference-only forwards (teacher top-k, rewards).
- Determinism: same seed, prompts and options -> the same tokens; the same on every TP/PP layout up
  to floating-point differences in the logits (see ``sampling.py``). Data-parallel replicas that get
  the same prompts should pass different seeds.

Usage::

    out = generate(model, groups, prompts, max_new_tokens=64, temperature=1.0, top_p=0.95, top_k=0,
                   eos_id=tok.eos_id, pad_id=tok.pad_id, seed=step, vocab_size=tok.vocab_size)
    out.responses, out.response_lengths, out.logprobs, out.finished
    logprobs_bl = score(teacher, teacher_groups, out.sequences(), vocab_size=tok.vocab_size)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from megatron.core.inference.communication_utils import (
    recv_from_prev_pipeline_rank_,
    send_to_next_pipeline_rank,
)
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.utils import unwrap_model

from rgkd_megatron.generation.lean_decode import LeanDecoder, lean_decode_unsupported
from rgkd_megatron.generation.sampling import check_sampling_args, sample_next_tokens
from rgkd_megatron.losses.topk_kd import vocab_parallel_topk_logits
from rgkd_megatron.parallel.cpu_compat import plain_torch
from rgkd_megatron.parallel.groups import RoleGroups

__all__ = [
    "GenerationOutput",
    "broadcast_from_last_stage",
    "generate",
    "inference_mode",
    "score",
    "stage_forward",
]


@dataclass
class GenerationOutput:
    """Responses of one ``generate`` call (identical on every rank of the role)."""

    prompts: list[list[int]]
    """The prompts, as given."""
    responses: torch.Tensor
    """[b, r] int64 generated ids (EOS included when sampled), ``pad_id`` after each response."""
    response_lengths: torch.Tensor
    """[b] int64 number of generated ids per sample."""
    logprobs: torch.Tensor
    """[b, r] fp32 log-prob of each generated id under the unfiltered policy at temperature 1; 0 after."""
    finished: torch.Tensor
    """[b] bool: True when the sample stopped on EOS, False when cut at ``max_new_tokens``."""
    steps: int
    """Model forwards run (prefill included)."""

    def response_ids(self) -> list[list[int]]:
        """Each response as a list of ids (without padding)."""
        return [row[:n].tolist() for row, n in zip(self.responses, self.response_lengths.tolist())]

    def sequences(self) -> list[list[int]]:
        """Prompt + response of each sample, as lists of ids."""
        return [p + r for p, r in zip(self.prompts, self.response_ids())]


def generate(
    model: torch.nn.Module,
    groups: RoleGroups,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_id: int | None,
    pad_id: int,
    seed: int,
    vocab_size: int,
    use_kv_cache: bool = True,
    decode_path: str = "auto",
) -> GenerationOutput:
    """Sample a response for every prompt (collective over the role's TP and PP groups).

    Args:
        model: this stage's GPTModel (or a DDP/Float16Module wrapper, or a one-chunk list).
        groups: the role's groups; every rank of the model-parallel group must call with the same args.
        prompts: b token-id lists, each non-empty, ids in [0, vocab_size).
        max_new_tokens: maximum generated ids per sample (EOS included).
        temperature: 0 = greedy; top_p in (0, 1], 1 = off; top_k >= 0, 0 = off.
        eos_id: the stop id (None: no stop id, every sample runs to ``max_new_tokens``).
        pad_id: the filler after a stop.
        seed: seeds the sampling generator (same seed -> same samples).
        vocab_size: real vocabulary; padded-vocab columns (ids >= vocab_size) are never sampled.
        use_kv_cache: False recomputes the whole prefix every step (reference / benchmark).
        decode_path: with the KV cache, "auto" runs ``lean_decode.LeanDecoder`` where it covers the
            model (CPU, one rank, fp32; the same mathematics with less framework work per step) and
            megatron's ``StaticInferenceContext`` forward elsewhere; "megatron" always the latter.
    """
    if decode_path not in ("auto", "megatron"):
        raise ValueError(f"generate: decode_path={decode_path!r}, expected 'auto' or 'megatron'")
    gpt = _unwrap(model)
    prompts = [list(map(int, p)) for p in prompts]
    _check_generate_args(
        gpt, groups, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, pad_id, vocab_size
    )
    b = len(prompts)
    prompt_len_b = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    total_len = int(prompt_len_b.max()) + max_new_tokens
    tokens_bl = torch.full((b, total_len), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens_bl[i, : len(p)] = torch.tensor(p, dtype=torch.long)

    responses_br = torch.full((b, max_new_tokens), pad_id, dtype=torch.long)
    logprobs_br = torch.zeros(b, max_new_tokens, dtype=torch.float32)
    response_len_b = torch.zeros(b, dtype=torch.long)
    finished_b = torch.zeros(b, dtype=torch.bool)
    stopped_b = torch.zeros(b, dtype=torch.bool)
    rows_b = torch.arange(b)
    generator = torch.Generator().manual_seed(seed)
    lean = None
    if use_kv_cache and decode_path == "auto":
        if lean_decode_unsupported(gpt, groups.layout.tp, groups.layout.pp) is None:
            lean = LeanDecoder(gpt, b, total_len)
    context = StaticInferenceContext(b, total_len) if use_kv_cache and lean is None else None

    pos, cached, steps = int(prompt_len_b.min()), 0, 0
    # a decode step on one rank asks for no device (the KV cache exists after the prefill), nor does
    # the lean decoder's prefill: the whole step, forward, sampling and bookkeeping, runs without the
    # device mode on CPU (cpu_compat.plain_torch; a no-op context on GPU)
    plain_decode = context is not None and groups.layout.tp == 1 and groups.layout.pp == 1
    with inference_mode(gpt):
        while True:
            with (
                plain_torch()
                if lean is not None or (plain_decode and steps > 0)
                else contextlib.nullcontext()
            ):
                # feed [cached, pos) with the cache (the whole prefix without); get the logits at pos
                start = cached if use_kv_cache else 0
                if lean is not None:
                    logits_bsv = lean.forward(tokens_bl[:, start:pos], start)
                else:
                    logits_bsv = stage_forward(
                        gpt, groups, tokens_bl[:, start:pos], start, context, gather=True
                    )
                steps += 1
                if context is not None:
                    context.increment_sequence_len_offset(pos - cached)
                    context.enable_decode_mode()
                cached = pos
                in_prompt_b = pos < prompt_len_b
                active_b = ~in_prompt_b & ~stopped_b
                step_bc = None
                if groups.is_last_stage:
                    ids_b, logp_b = sample_next_tokens(
                        logits_bsv[:, -1], generator, temperature=temperature, top_k=top_k, top_p=top_p,
                        vocab_size=vocab_size,
                    )  # fmt: skip
                    ids_b = torch.where(in_prompt_b, tokens_bl[:, pos], torch.where(active_b, ids_b, pad_id))
                    step_bc = torch.stack([ids_b.double(), logp_b.double()], dim=1)
                step_bc = _share_step_result(step_bc, b, groups)
                ids_b, logp_b = step_bc[:, 0].long(), step_bc[:, 1].float()

                tokens_bl[:, pos] = ids_b
                act = rows_b[active_b]
                responses_br[act, response_len_b[act]] = ids_b[act]
                logprobs_br[act, response_len_b[act]] = logp_b[act]
                response_len_b += active_b.long()
                if eos_id is not None:
                    finished_b |= active_b & (ids_b == eos_id)
                stopped_b |= finished_b | (response_len_b >= max_new_tokens)
                pos += 1
                if bool(stopped_b.all()):
                    break
                assert pos < total_len, "every row stops within max_prompt_len + max_new_tokens"

    longest = max(int(response_len_b.max()), 0)
    return GenerationOutput(
        prompts=prompts,
        responses=responses_br[:, :longest].clone(),
        response_lengths=response_len_b,
        logprobs=logprobs_br[:, :longest].clone(),
        finished=finished_b,
        steps=steps,
    )


def score(
    model: torch.nn.Module,
    groups: RoleGroups,
    sequences: Sequence[Sequence[int]],
    *,
    vocab_size: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Teacher-forced log-probs of given sequences, one forward pass (collective over TP and PP).

    Returns fp32 [b, L - 1] (L = the longest sequence) where entry (i, t) is
    ``log softmax(logits(seq_i[: t + 1]) / temperature)[seq_i[t + 1]]`` over the real vocabulary
    (TP vocab-parallel, via ``vocab_parallel_topk_logits``), 0 for t >= len(seq_i) - 1. Identical on
    every rank of the role. Rows are right-padded (causal attention: padding never affects real
    positions). No gradient.
    """
    gpt = _unwrap(model)
    sequences = [list(map(int, s)) for s in sequences]
    if not groups.is_member:
        raise ValueError("score: this rank is not part of the role's window")
    if not sequences or any(len(s) < 2 for s in sequences):
        raise ValueError("score: need at least one sequence, each with >= 2 tokens")
    _check_ids("sequences", sequences, vocab_size, gpt.vocab_size)
    if not temperature > 0:
        raise ValueError(f"score: temperature={temperature} must be > 0")
    b, length = len(sequences), max(len(s) for s in sequences)
    tokens_bl = torch.zeros(b, length, dtype=torch.long)
    valid_bl = torch.zeros(b, length, dtype=torch.bool)
    for i, s in enumerate(sequences):
        tokens_bl[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        valid_bl[i, : len(s)] = True
    logprobs_bt = None
    with inference_mode(gpt):
        logits_blv = stage_forward(gpt, groups, tokens_bl, 0, None, gather=False)
        if groups.is_last_stage:
            lse_bt, target_bt1 = vocab_parallel_topk_logits(
                logits_blv[:, :-1], tokens_bl[:, 1:, None], temperature=temperature,
                tp_group=groups.pg_collection.tp, vocab_size=vocab_size,
            )  # fmt: skip
            logprobs_bt = (target_bt1[..., 0] - lse_bt).float().masked_fill(~valid_bl[:, 1:], 0.0)
    return broadcast_from_last_stage(logprobs_bt, (b, length - 1), torch.float32, groups)


# --------------------------------------------------------------------------------------------------
# helpers


def _unwrap(model: torch.nn.Module | list) -> torch.nn.Module:
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError(f"generation supports one model chunk per stage, got {len(model)}")
        model = model[0]
    return unwrap_model(model)


def _check_ids(name: str, rows: list[list[int]], vocab_size: int, padded_vocab: int) -> None:
    if not 1 <= vocab_size <= padded_vocab:
        raise ValueError(
            f"vocab_size={vocab_size}: must be in [1, {padded_vocab}] (the model's padded vocab)"
        )
    for i, row in enumerate(rows):
        bad = [t for t in row if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{name}[{i}] holds ids outside [0, {vocab_size}): {bad[:5]}")


def _check_generate_args(
    gpt, groups, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, pad_id, vocab_size
):
    if not groups.is_member:
        raise ValueError("generate: this rank is not part of the role's window")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: need at least one prompt, and every prompt needs >= 1 token")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens!r} must be an int >= 1")
    check_sampling_args(temperature, top_k, top_p)
    _check_ids("prompts", prompts, vocab_size, gpt.vocab_size)
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if value is not None and not 0 <= value < vocab_size:
            raise ValueError(f"generate: {name}={value} outside [0, {vocab_size})")
    longest = max(len(p) for p in prompts) + max_new_tokens
    if longest > gpt.max_sequence_length:
        raise ValueError(
            f"generate: longest prompt + max_new_tokens = {longest} exceeds the model's "
            f"max_position_embeddings={gpt.max_sequence_length}"
        )


_SEQUENCE_PARALLEL_ATTRS = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")


@contextlib.contextmanager
def inference_mode(gpt: torch.nn.Module) -> Iterator[None]:
    """eval + ``torch.no_grad`` + sequence parallelism off, for an inference forward of ``gpt``.

    Sequence parallelism is switched off the way megatron's inference does it
    (``set_model_to_sequence_parallel``: the config flag and the per-module flags), and every
    flag, the training mode and the PP input tensor are restored exactly on exit.
    """
    was_training = gpt.training
    saved = [
        (module, attr, getattr(module, attr))
        for module in gpt.modules()
        for attr in _SEQUENCE_PARALLEL_ATTRS
        if hasattr(module, attr)
    ]
    config_sp = gpt.config.sequence_parallel
    gpt.eval()
    if config_sp:
        gpt.config.sequence_parallel = False
        for module, attr, _ in saved:
            setattr(module, attr, False)
    try:
        with torch.no_grad():
            yield
    finally:
        gpt.config.sequence_parallel = config_sp
        for module, attr, value in saved:
            setattr(module, attr, value)
        gpt.set_input_tensor(None)
        gpt.train(was_training)


def stage_forward(
    gpt: torch.nn.Module,
    groups: RoleGroups,
    tokens_bs: torch.Tensor,
    start: int,
    context: StaticInferenceContext | None,
    gather: bool,
) -> torch.Tensor | None:
    """Run this PP stage of ``gpt`` on positions [start, start + s) of ``tokens_bs`` [b, s].

    Collective over the role's PP group: a non-first stage receives the hidden states [s, b, h]
    from the previous stage, a non-last stage sends its output to the next one. Meant to run
    inside :func:`inference_mode` (sequence parallelism off: full-length hidden states).
    Returns, on the last stage, the model output: logits [b, 1, V_padded] with a ``context`` (last
    position only, TP-gathered), [b, s, V_padded] with ``gather`` and no context, else the
    vocab-parallel [b, s, V_padded / tp] (or whatever the output layer gives, e.g. [b, s, 1] for a
    reward model); on the other stages None.
    """
    pp_group = groups.pg_collection.pp
    b, s = tokens_bs.shape
    if not groups.is_first_stage:
        dtype = gpt.config.pipeline_dtype or gpt.config.params_dtype
        hidden_sbh = torch.empty(s, b, gpt.config.hidden_size, dtype=dtype)
        recv_from_prev_pipeline_rank_(hidden_sbh, pp_group)
        gpt.set_input_tensor(hidden_sbh)
    position_ids_bs = torch.arange(start, start + s).expand(b, s)
    extra: dict = {"runtime_gather_output": True} if (gather or context is not None) else {}
    if context is not None:
        extra["inference_context"] = context  # megatron asserts runtime_gather_output with it
    out = gpt(tokens_bs if groups.is_first_stage else None, position_ids_bs, None, **extra)
    if not groups.is_last_stage:
        send_to_next_pipeline_rank(out.contiguous(), pp_group)
        return None
    return out


def _share_step_result(step_bc: torch.Tensor | None, b: int, groups: RoleGroups) -> torch.Tensor:
    """Make the last stage's TP rank 0 step result (ids, log-probs) known to every rank of the role."""
    if groups.is_last_stage:
        tp_group = groups.pg_collection.tp
        if dist.get_world_size(tp_group) > 1:
            dist.broadcast(step_bc, group=tp_group, group_src=0)
    return broadcast_from_last_stage(step_bc, (b, 2), torch.float64, groups)


def broadcast_from_last_stage(
    tensor: torch.Tensor | None, shape: Sequence[int], dtype: torch.dtype, groups: RoleGroups
) -> torch.Tensor:
    """The last PP stage's ``tensor`` on every stage (collective over the role's PP group).

    ``shape`` and ``dtype`` describe the tensor; the other stages pass None.
    """
    pp_group = groups.pg_collection.pp
    size = dist.get_world_size(pp_group)
    if size == 1:
        return tensor
    if not groups.is_last_stage:
        tensor = torch.empty(shape, dtype=dtype)
    tensor = tensor.contiguous()
    dist.broadcast(tensor, group=pp_group, group_src=size - 1)
    return tensor
