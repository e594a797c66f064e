"""SFT samples, padded and packed collation, and the deterministic, resumable micro-batch sampler.

Shape legend: ``b`` rows in a micro-batch, ``s`` = ``seq_length`` positions per row.

Sample: ``(tokens, prompt_len)`` with ``tokens = prompt + response + [eos]`` (``make_sft_sample``).
A sample of ``L`` tokens (after truncation to ``seq_length + 1``) gives ``L - 1`` positions:
``tokens[t] = sample[t]`` and ``labels[t] = sample[t + 1]`` (next-token targets, Megatron's
convention), ``loss_mask[t] = 1`` exactly when ``labels[t]`` is a response token or the final EOS
(``t + 1 >= prompt_len``), else 0. Padding positions hold ``pad_id`` in tokens and labels and 0 in
the loss mask (labels are never -100, so vocab-parallel cross entropy needs no special case).

Batch dict (all ``torch.int64`` except ``loss_mask``, ``torch.float32``):
``tokens [b, s]``, ``labels [b, s]``, ``loss_mask [b, s]``, ``position_ids [b, s]``, and
``sample_ids [b, s]`` (the caller's id of the sample each position belongs to, -1 on padding) when
``sample_ids`` is passed. ``position_ids[t]`` is the offset of ``tokens[t]`` inside its sample, so
``(sample_ids[t], position_ids[t] + 1)`` locates the label token inside the dataset (teacher cache).

Packing (``collate_packed``): whole samples go into rows first-fit in order (a sample longer than a
row is truncated, as in padded mode); position ids restart at 0 at each sample; labels never cross a
sample boundary. Attention still crosses boundaries inside a row (like Megatron's default
``reset_attention_mask=False``): later samples attend to earlier ones in the same row. This changes
their logits slightly relative to padded batches; exact per-sample attention needs THD/varlen
attention, out of scope here. A row holding a single sample is identical to the padded row.

Sampler (``MicroBatchSampler``): one global batch = ``micro_batch_size * dp_size`` indices; rank r
takes slice ``[r * mbs, (r + 1) * mbs)``. Epoch e visits ``numpy.random.default_rng(seed + e)
.permutation(num_samples)`` in order, dropping the tail that does not fill a global batch (no index
repeats inside a global batch). Position in the stream is ``consumed_samples`` (global, all ranks),
so a run restarted with the checkpointed count sees exactly the batches of an uninterrupted run.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "MicroBatchSampler",
    "check_samples_fit",
    "collate_packed",
    "collate_padded",
    "make_sft_sample",
    "trained_positions",
]

Sample = tuple[Sequence[int], int]


def make_sft_sample(
    prompt_ids: Sequence[int], response_ids: Sequence[int], eos_id: int, truncated: bool = False
) -> tuple[list[int], int]:
    """``(prompt + response + [eos_id], len(prompt))``: the loss covers the response and the EOS.

    A response that generation cut at its length limit (``truncated``) gets no EOS: the student must
    not learn to stop where the teacher was merely cut off.
    """
    if eos_id is None or int(eos_id) < 0:
        raise ValueError(f"eos_id must be a non-negative token id, got {eos_id!r}")
    prompt = [int(t) for t in prompt_ids]
    return prompt + [int(t) for t in response_ids] + ([] if truncated else [int(eos_id)]), len(prompt)


def _pairs(sample: Sample, seq_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, labels, loss_mask) of one sample truncated to ``seq_length + 1`` tokens."""
    tokens, prompt_len = sample
    toks = np.asarray(tokens, dtype=np.int64)[: seq_length + 1]
    if toks.ndim != 1:
        raise ValueError(f"sample tokens must be 1-D, got shape {toks.shape}")
    n = max(toks.size - 1, 0)
    mask = (np.arange(1, n + 1) >= int(prompt_len)).astype(np.float32)
    return toks[:n], toks[1 : n + 1], mask


def trained_positions(lengths: np.ndarray, prompt_lengths: np.ndarray, seq_length: int) -> np.ndarray:
    """Loss positions of each sample once truncated to ``seq_length`` positions (0: the prompt
    fills the row and the sample trains nothing), from its token and prompt lengths."""
    positions = np.minimum(np.asarray(lengths) - 1, seq_length)
    return np.maximum(positions - np.maximum(np.asarray(prompt_lengths), 1) + 1, 0)


def check_samples_fit(
    lengths: np.ndarray, prompt_lengths: np.ndarray, seq_length: int, source: str
) -> tuple[int, int]:
    """``(cut, untrained)``: samples longer than ``seq_length + 1`` tokens (truncated) and samples
    left without a loss position. ValueError naming ``source``, the longest and shortest prompt and
    the limit when no sample trains anything (the run would log a loss of 0 at every step)."""
    trained = trained_positions(lengths, prompt_lengths, seq_length)
    if len(trained) and not trained.any():
        raise ValueError(
            f"data.seq_length: no sample of {source} fits: prompts are {int(np.min(prompt_lengths))} to "
            f"{int(np.max(prompt_lengths))} tokens, data.seq_length is {seq_length}, so no response token "
            "is ever trained; raise data.seq_length or shorten the prompts"
        )
    return int((np.asarray(lengths) > seq_length + 1).sum()), int((trained == 0).sum())


def _check_args(seq_length: int, pad_id: int) -> None:
    if int(seq_length) <= 0:
        raise ValueError(f"seq_length must be positive, got {seq_length}")
    if pad_id is None or int(pad_id) < 0:
        raise ValueError(f"pad_id must be a non-negative token id, got {pad_id!r}")


def _empty_batch(rows: int, seq_length: int, pad_id: int) -> dict[str, np.ndarray]:
    return {
        "tokens": np.full((rows, seq_length), pad_id, dtype=np.int64),
        "labels": np.full((rows, seq_length), pad_id, dtype=np.int64),
        "loss_mask": np.zeros((rows, seq_length), dtype=np.float32),
        "position_ids": np.tile(np.arange(seq_length, dtype=np.int64), (rows, 1)),
        "sample_ids": np.full((rows, seq_length), -1, dtype=np.int64),
    }


def _to_torch(batch: dict[str, np.ndarray], with_ids: bool) -> dict[str, torch.Tensor]:
    if not with_ids:
        batch.pop("sample_ids")
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def collate_padded(
    samples: Sequence[Sample], seq_length: int, pad_id: int, sample_ids: Optional[Sequence[int]] = None
) -> dict[str, torch.Tensor]:
    """One sample per row, right-padded to ``seq_length`` (samples truncated to ``seq_length + 1`` tokens).

    Returns the batch dict of the module docstring with ``b = len(samples)``.
    """
    _check_args(seq_length, pad_id)
    if sample_ids is not None and len(sample_ids) != len(samples):
        raise ValueError(f"sample_ids has {len(sample_ids)} entries for {len(samples)} samples")
    batch = _empty_batch(len(samples), seq_length, pad_id)
    for row, sample in enumerate(samples):
        inputs, labels, mask = _pairs(sample, seq_length)
        n = inputs.size
        batch["tokens"][row, :n] = inputs
        batch["labels"][row, :n] = labels
        batch["loss_mask"][row, :n] = mask
        if sample_ids is not None:
            batch["sample_ids"][row, :n] = int(sample_ids[row])
    return _to_torch(batch, sample_ids is not None)


def collate_packed(
    samples: Sequence[Sample],
    seq_length: int,
    pad_id: int,
    sample_ids: Optional[Sequence[int]] = None,
    num_rows: Optional[int] = None,
) -> dict[str, torch.Tensor]:
    """Pack whole samples into rows of ``seq_length`` positions, first-fit in order.

    A sample of ``L`` tokens needs ``min(L, seq_length + 1) - 1`` positions; it goes into the first row
    with that much room left, else into a new row. Samples with fewer than 2 tokens have no target and
    are skipped. ``b`` is the number of rows used (at least 1), or exactly ``num_rows`` when given
    (extra rows are all padding; ValueError if the samples need more). Pipeline parallelism needs a
    fixed ``b``, so pass ``num_rows`` there.
    """
    _check_args(seq_length, pad_id)
    if sample_ids is not None and len(sample_ids) != len(samples):
        raise ValueError(f"sample_ids has {len(sample_ids)} entries for {len(samples)} samples")
    free: list[int] = []  # room left per row
    placed: list[list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]] = []
    for i, sample in enumerate(samples):
        inputs, labels, mask = _pairs(sample, seq_length)
        n = inputs.size
        if n == 0:
            continue
        row = next((r for r, room in enumerate(free) if room >= n), None)
        if row is None:
            free.append(seq_length)
            placed.append([])
            row = len(free) - 1
        free[row] -= n
        placed[row].append((i, inputs, labels, mask))
    rows = max(len(placed), 1)
    if num_rows is not None:
        if len(placed) > num_rows:
            raise ValueError(
                f"samples need {len(placed)} packed rows of {seq_length}, more than num_rows={num_rows}"
            )
        rows = num_rows
    batch = _empty_batch(rows, seq_length, pad_id)
    for row, segments in enumerate(placed):
        offset = 0
        for i, inputs, labels, mask in segments:
            n = inputs.size
            batch["tokens"][row, offset : offset + n] = inputs
            batch["labels"][row, offset : offset + n] = labels
            batch["loss_mask"][row, offset : offset + n] = mask
            batch["position_ids"][row, offset : offset + n] = np.arange(n)
            if sample_ids is not None:
                batch["sample_ids"][row, offset : offset + n] = int(sample_ids[i])
            offset += n
        # Padding continues the last sample's positions, so a one-sample row equals its padded row.
        last_n = segments[-1][1].size
        batch["position_ids"][row, offset:] = last_n + np.arange(seq_length - offset)
    return _to_torch(batch, sample_ids is not None)


class MicroBatchSampler:
    """Deterministic, resumable micro-batches of sample indices for one data-parallel rank.

    Iterating yields ``list[int]`` of length ``micro_batch_size`` forever (epoch after epoch); the
    trainer decides when to stop. ``consumed_samples`` counts global samples (all DP ranks) handed
    out so far and advances by ``micro_batch_size * dp_size`` per yielded micro-batch.

    Resuming: checkpoint the number of samples the *trainer* has consumed (a prefetching DataLoader
    runs ahead of the model, so this object's own counter may be ahead too) and pass it as
    ``consumed_samples``, or ``load_state_dict`` a state whose ``consumed_samples`` was set that way.
    """

    def __init__(
        self,
        num_samples: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        consumed_samples: int = 0,
    ):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        self.num_samples = int(num_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.seed = int(seed)
        self.global_batch = self.micro_batch_size * self.dp_size
        if self.num_samples < self.global_batch:
            raise ValueError(
                f"num_samples={num_samples} is smaller than one global micro-batch "
                f"(micro_batch_size={micro_batch_size} x dp_size={dp_size})"
            )
        self.batches_per_epoch = self.num_samples // self.global_batch
        self.samples_per_epoch = self.batches_per_epoch * self.global_batch
        self.consumed_samples = self._check_consumed(consumed_samples)

    def _check_consumed(self, consumed_samples: int) -> int:
        consumed_samples = int(consumed_samples)
        if consumed_samples < 0 or consumed_samples % self.global_batch:
            raise ValueError(
                f"consumed_samples={consumed_samples} must be a non-negative multiple of "
                f"micro_batch_size x dp_size = {self.global_batch}"
            )
        return consumed_samples

    @property
    def epoch(self) -> int:
        """Epoch of the next micro-batch."""
        return self.consumed_samples // self.samples_per_epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(self.seed + epoch).permutation(self.num_samples)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, perm = -1, None
        while True:
            e, within = divmod(self.consumed_samples, self.samples_per_epoch)
            if e != epoch:
                epoch, perm = e, self._permutation(e)
            start = within + self.dp_rank * self.micro_batch_size
            batch = [int(i) for i in perm[start : start + self.micro_batch_size]]
            self.consumed_samples += self.global_batch
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "consumed_samples": self.consumed_samples,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; refuses a state from a different dataset size, seed or global batch."""
        for field, mine in (("num_samples", self.num_samples), ("seed", self.seed)):
            if field in state and int(state[field]) != mine:
                raise ValueError(f"sampler state field '{field}' is {state[field]}, this sampler has {mine}")
        if "micro_batch_size" in state and "dp_size" in state:
            theirs = int(state["micro_batch_size"]) * int(state["dp_size"])
            if theirs != self.global_batch:
                raise ValueError(
                    f"sampler state has micro_batch_size x dp_size = {theirs}, this sampler {self.global_batch}: "
                    "epoch boundaries would differ, so the batches could not be reproduced"
                )
        if "consumed_samples" not in state:
            raise ValueError("sampler state lacks field 'consumed_samples'")
        self.consumed_samples = self._check_consumed(state["consumed_samples"])
