"""What a teacher cache build stores and how it batches the teacher (no torch: the CLI's defaults)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["BuildOptions"]


@dataclass
class BuildOptions:
    """What to store and how to batch the teacher (all but ``max_shards``/``progress`` are identity)."""

    k: int = 64
    """Top-k ids kept per token."""
    temperature: float = 1.0
    """Log-probs are of softmax(logits / temperature)."""
    dtype: str = "q8"
    """Storage of the log-probs: q8 (8-bit codes against the row's maximum, ~199 bytes/token at k=64;
    ``cache/format.py``), fp16, bf16 or fp32."""
    seq_length: int = 2048
    """Samples are truncated to seq_length + 1 tokens (seq_length rows at most)."""
    micro_batch_size: int = 4
    """Samples per teacher forward."""
    num_microbatches: int = 1
    """Micro-batches per schedule call (> 1 fills the pipeline with PP)."""
    pad_multiple: int = 64
    """Each call is padded to its longest sample rounded up to this."""
    rows_per_shard: int = 1 << 20
    """Target rows (tokens) per shard file."""
    block_rows: int = 1024
    """Rows per crc32 block."""
    max_shards: int | None = None
    """Build at most this many pending shards in this run (the build stays resumable)."""
    progress: bool = True
    """tqdm bar with tokens/s on rank 0."""

    def validate(self) -> None:
        for name in ("k", "seq_length", "micro_batch_size", "num_microbatches", "pad_multiple",
                     "rows_per_shard", "block_rows"):  # fmt: skip
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        if (
            not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature))
            or self.temperature <= 0
        ):
            raise ValueError(f"temperature: expected a finite value > 0, got {self.temperature!r}")
        if self.dtype not in ("q8", "fp16", "bf16", "fp32"):
            raise ValueError(f"dtype: expected q8, fp16, bf16 or fp32, got {self.dtype!r}")
        if self.max_shards is not None and self.max_shards < 1:
            raise ValueError(f"max_shards: expected a positive int or None, got {self.max_shards!r}")
