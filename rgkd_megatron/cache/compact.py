"""Cache rows as stored (compact payload), decoded later with torch on any device.

``TeacherCacheReader.get_compact`` copies the stored sections of a row range (q8 at k = 64: 199 bytes
per token instead of the 520 of a decoded row) and ``CompactRows.decode(device)`` decodes them with
torch where they are, e.g. on the GPU after the host-to-device copy, so the copy moves the stored
bytes. The decode is the one of ``codec.decode_into``, bit for bit:

- q8 log-probs: column 1 = m, column i >= 2 = m - c_i * s in fp32 (the product c_i * s of an 8-bit
  code and an fp16 step is exact in fp32, so one rounding, whatever the device);
- ids: the uint16 low parts, or-ed with the high ``id_bits - 16`` bits unpacked LSB first;
- lse / tail widened to fp32; version 1 and unquantised log-probs as stored (bf16: its bits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["CompactBatch", "CompactRows"]


@dataclass(frozen=True)
class CompactRows:
    """Stored sections of ``n`` consecutive cache rows (CPU copies, by section name, ``format.py``) and
    the format fields needed to decode them."""

    sections: dict[str, torch.Tensor]
    k: int
    dtype: str
    version: int
    id_bits: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sections.values())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CompactRows:
        """The same payload on ``device`` (uint16 sections travel as their int16 bits)."""
        moved = {n: _bits16(t).to(device, non_blocking=non_blocking) for n, t in self.sections.items()}
        return CompactRows(moved, self.k, self.dtype, self.version, self.id_bits)

    def decode(self, device: torch.device | str | None = None):
        """``TopKRows`` (logprobs [n, k], ids [n, k] int32, lse / tail [n] fp32) on ``device``
        (default: where the payload is), the values ``TeacherCacheReader.get`` gives: on the CPU
        with ``codec.decode_rows``, elsewhere with the torch ops below (the same formulas)."""
        from rgkd_megatron.cache.codec import decode_logprobs, decode_rows
        from rgkd_megatron.cache.reader import TopKRows

        where = self.device if device is None else torch.device(device)
        if where.type == "cpu":  # numpy's decode (``codec.decode_rows``): the same values, fewer passes
            lp, *rest = decode_rows(self.numpy_sections(), self)
            return TopKRows(decode_logprobs(lp, self.dtype), *map(torch.from_numpy, rest))
        return self.decode_torch(device)

    @property
    def device(self) -> torch.device:
        return next(iter(self.sections.values())).device

    def numpy_sections(self) -> dict[str, np.ndarray]:
        """numpy views of the (CPU) sections as the shard stores them (int16 sections, uint16 ones
        moved by ``to``, as uint16: the format has no int16 section)."""
        return {
            n: t.numpy().view(np.uint16) if t.dtype == torch.int16 else t.numpy()
            for n, t in self.sections.items()
        }

    def decode_into(self, out: tuple[np.ndarray, ...]) -> None:
        """The CPU decode (``codec.decode_into``) of the (CPU) payload into ``out`` = (logprobs [n, k]
        in the storage dtype, ids [n, k] int32, lse [n] fp32, tail [n] fp32), e.g. numpy views of a
        caller's buffers."""
        from rgkd_megatron.cache.codec import decode_into

        decode_into([self.numpy_sections()], self, out)

    def decode_torch(self, device: torch.device | str | None = None):
        """``decode`` with torch ops on ``device`` (what ``decode`` runs off the CPU)."""
        from rgkd_megatron.cache.reader import TopKRows

        sec = self.sections if device is None else self.to(device).sections
        sec = {n: _bits16(t) for n, t in sec.items()}
        codes = sec["logprobs"]
        n, dev = codes.shape[0], codes.device
        if self.version == 2 and self.dtype == "q8":
            q = sec["qparams"].view(torch.float16).float()
            lp = torch.empty((n, self.k), dtype=torch.float32, device=dev)
            lp[:, 0] = 0  # code 0: the row maximum, m - 0 * s = m
            lp[:, 1:].copy_(codes)
            lp.mul_(q[:, 1:2])
            torch.sub(q[:, 0:1], lp, out=lp)
        elif self.dtype == "bf16":
            lp = codes.view(torch.bfloat16)
        else:
            lp = codes.view(torch.float16) if self.dtype == "fp16" else codes
        if self.version == 1:
            ids = sec["ids"]
        else:
            ids = sec["ids"].to(torch.int32) & 0xFFFF
            if self.id_bits > 16:
                h = self.id_bits - 16
                hi = sec["ids_hi"].to(torch.int32)
                bits = (hi[:, :, None] >> torch.arange(8, device=dev, dtype=torch.int32)) & 1  # LSB first
                bits = bits.reshape(n, hi.shape[1] * 8)[:, : self.k * h].reshape(n, self.k, h)
                shifts = torch.arange(16, self.id_bits, device=dev, dtype=torch.int32)
                ids = ids | (bits << shifts).sum(-1, dtype=torch.int32)
        widen = [sec[name].view(torch.float16).float() if self.version == 2 and self.dtype == "q8" else sec[name]
                 for name in ("lse", "tail")]  # fmt: skip
        return TopKRows(lp, ids, *widen)


def _bits16(t: torch.Tensor) -> torch.Tensor:
    """uint16 sections as int16 (same bits): torch moves and views int16 on every device."""
    return t.view(torch.int16) if t.dtype == torch.uint16 else t


@dataclass(frozen=True)
class CompactBatch:
    """The stored bytes of a [b, s] batch of cache rows (``TeacherCacheReader.gather_compact``):
    ``rows`` holds b * s rows in row-major order, zero bytes at padding positions (``gather.py``:
    they decode to zeros), and ``valid`` [b, s] bool marks the positions that are cache rows.

    ``decode`` gives ``gather``'s result bit for bit: on the CPU with the CPU decode (into ``out``
    when given), on any other device with ``CompactRows.decode_torch`` after ``to(device)``."""

    rows: CompactRows
    valid: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CompactBatch:
        """The same batch on ``device`` (asynchronous from pinned memory when ``non_blocking``)."""
        return CompactBatch(
            self.rows.to(device, non_blocking), self.valid.to(device, non_blocking=non_blocking)
        )

    def decode(
        self, out: dict[str, torch.Tensor] | None = None, *, torch_ops: bool | None = None
    ) -> dict[str, torch.Tensor]:
        """{'logprobs' [b, s, k], 'ids' [b, s, k] int32, 'lse' / 'tail' [b, s] fp32, 'valid' [b, s]
        bool} where the payload is; padding positions are zero. ``out``: CPU buffers to decode into
        (``buffers.empty_batch``, checked by the caller), only with the CPU decode. ``torch_ops``:
        decode with ``CompactRows.decode_torch`` (default: off the CPU; True on the CPU runs the
        device decode there, e.g. to check it)."""
        from rgkd_megatron.cache.buffers import BATCH_FIELDS, as_numpy, empty_batch
        from rgkd_megatron.cache.codec import TORCH_DTYPES

        b, s = self.valid.shape
        if torch_ops is None:
            torch_ops = self.rows.device.type != "cpu"
        if torch_ops:
            if out is not None:
                raise ValueError(
                    "CompactBatch.decode: out= is for the CPU decode (torch_ops=False, a CPU payload)"
                )
            got = self.rows.decode_torch()
            return {
                **{n: t.reshape(b, s, *t.shape[1:]) for n, t in zip(BATCH_FIELDS, got)},
                "valid": self.valid,
            }
        if out is None:
            out = empty_batch(b, s, self.rows.k, TORCH_DTYPES[self.rows.dtype])
        self.rows.decode_into(
            tuple(as_numpy(out[n]).reshape(b * s, *out[n].shape[2:]) for n in BATCH_FIELDS[:4])
        )
        out["valid"].copy_(self.valid)
        return out
