"""Pure sampling utilities on full-vocabulary logits: padded-vocab masking, temperature, top-k, top-p.

Shape legend (suffixes): ``b`` rows (samples), ``v`` the full (padded) vocabulary.

Design choices:
- Everything here is a pure function of tensors and a ``torch.Generator``; no process groups. The
  generation loop (``generate.py``) gathers the TP shards first (megatron's inference forward does it)
  and calls these on identical full-vocab logits, so any rank produces the same ids.
- Order of the transformations (the Hugging Face convention): padded-vocab columns ``>= vocab_size``
  are set to -inf (they can never be sampled), then logits are divided by the temperature, then
  top-k, then top-p (nucleus) filtering. ``temperature == 0`` means greedy (argmax; ties -> lowest id).
- top-k keeps every logit ``>=`` the k-th largest one (ties at the threshold are all kept).
  top-p keeps, in order of decreasing probability (stable sort), each token whose *exclusive*
  cumulative probability is ``< top_p``: the smallest prefix whose mass reaches ``top_p``, and always
  at least the most likely token. ``top_k = 0`` and ``top_p = 1`` disable the filters.
- Sampling is by inverse CDF with exactly one float64 uniform per row and per call, drawn from the
  caller's generator whatever the row's state (greedy, forced prompt token, finished). The RNG stream
  therefore depends only on the seed and the number of calls, never on the logits' values, and a tiny
  numerical difference between two layouts changes a sample only if its uniform falls within that
  difference of a CDF boundary.
- The log-probabilities returned with the samples are those of the *unfiltered* policy at
  temperature 1 (log_softmax over the real vocabulary): what a policy gradient differentiates.
"""

from __future__ import annotations

import torch

from rgkd_megatron.config.generation import check_sampling_args

__all__ = [
    "check_sampling_args",
    "filter_logits",
    "inverse_cdf_sample",
    "mask_padded_vocab",
    "sample_next_tokens",
    "top_k_filter",
    "top_p_filter",
]


def mask_padded_vocab(logits_bv: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """A copy of the logits with the padding columns ``>= vocab_size`` at -inf."""
    out = logits_bv.clone()
    if vocab_size is not None:
        if not 1 <= vocab_size <= out.shape[-1]:
            raise ValueError(f"vocab_size={vocab_size}: must be in [1, {out.shape[-1]}] (the logits' width)")
        out[..., vocab_size:] = float("-inf")
    return out


def top_k_filter(logits_bv: torch.Tensor, top_k: int) -> torch.Tensor:
    """Logits below the k-th largest of their row set to -inf (ties kept); ``top_k=0`` is a no-op."""
    if top_k <= 0 or top_k >= logits_bv.shape[-1]:
        return logits_bv
    kth_b1 = torch.topk(logits_bv, top_k, dim=-1).values[..., -1:]
    return logits_bv.masked_fill(logits_bv < kth_b1, float("-inf"))


def top_p_filter(logits_bv: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the most likely tokens until their mass reaches ``top_p``."""
    if top_p >= 1.0:
        return logits_bv
    sorted_bv, order_bv = torch.sort(logits_bv, dim=-1, descending=True, stable=True)
    probs_bv = torch.softmax(sorted_bv.double(), dim=-1)
    exclusive_cum_bv = torch.cumsum(probs_bv, dim=-1) - probs_bv
    drop_sorted_bv = exclusive_cum_bv >= top_p
    drop_bv = torch.zeros_like(drop_sorted_bv).scatter_(-1, order_bv, drop_sorted_bv)
    return logits_bv.masked_fill(drop_bv, float("-inf"))


def filter_logits(
    logits_bv: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """fp32 logits of the sampling distribution: padded vocab masked, / temperature, top-k, top-p.

    ``softmax`` of the result is the distribution the samples are drawn from. With ``temperature=0``
    (greedy) the logits are returned unscaled (only their argmax matters).
    """
    check_sampling_args(temperature, top_k, top_p)
    return _filter_masked(mask_padded_vocab(logits_bv.float(), vocab_size), temperature, top_k, top_p)


def _filter_masked(masked_bv: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """``filter_logits`` after the padded-vocab mask (``masked_bv`` itself when greedy, never changed)."""
    if temperature > 0:
        masked_bv = masked_bv / temperature
    return top_p_filter(top_k_filter(masked_bv, top_k), top_p)


def inverse_cdf_sample(logits_bv: torch.Tensor, uniforms_b: torch.Tensor) -> torch.Tensor:
    """Ids drawn from ``softmax(logits)`` by inverse CDF, one uniform in [0, 1) per row.

    Row r returns the smallest id i with ``cdf[i] > u_r * cdf[-1]`` (cdf in float64), so a token of
    zero probability (a -inf logit) is never returned.
    """
    probs_bv = torch.softmax(logits_bv.double(), dim=-1)
    cdf_bv = torch.cumsum(probs_bv, dim=-1)
    target_b1 = (uniforms_b.double() * cdf_bv[..., -1]).unsqueeze(-1)
    ids_b = torch.searchsorted(cdf_bv, target_b1, right=True).squeeze(-1)
    # u * total can round up to total: fall back to the last id of positive probability
    last_positive_b = (probs_bv > 0).cumsum(-1).argmax(-1)
    return torch.minimum(ids_b, last_positive_b)


def sample_next_tokens(
    logits_bv: torch.Tensor,
    generator: torch.Generator,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampling step on full-vocab logits [b, V_padded].

    Returns (ids_b int64, logprobs_b fp32): the sampled ids (greedy when ``temperature == 0``) and
    their log-probabilities under the unfiltered policy at temperature 1, over the real vocabulary.
    Consumes exactly ``b`` float64 uniforms from ``generator`` (greedy included).
    """
    check_sampling_args(temperature, top_k, top_p)
    uniforms_b = torch.rand(logits_bv.shape[0], generator=generator, dtype=torch.float64)
    logits_bv = logits_bv.float()
    # nothing below writes into ``masked_bv``: a masked copy only when there are padding columns
    masked_bv = logits_bv if vocab_size == logits_bv.shape[-1] else mask_padded_vocab(logits_bv, vocab_size)
    filtered_bv = _filter_masked(masked_bv, temperature, top_k, top_p)
    if temperature == 0:
        ids_b = filtered_bv.argmax(dim=-1)
    else:
        ids_b = inverse_cdf_sample(filtered_bv, uniforms_b)
    logprobs_bv = torch.log_softmax(masked_bv, dim=-1)
    return ids_b, logprobs_bv.gather(-1, ids_b.unsqueeze(-1)).squeeze(-1)
