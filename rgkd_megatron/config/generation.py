"""How teacher responses are sampled (``generate_responses``), checked without torch: the CLI's defaults."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GenerationSettings", "check_sampling_args"]


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    """Raise ValueError for an out-of-range sampling option."""
    if not temperature >= 0.0:
        raise ValueError(f"temperature={temperature}: must be >= 0 (0 = greedy)")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k={top_k!r}: must be an int >= 0 (0 = disabled)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}: must be in (0, 1] (1 = disabled)")


@dataclass(frozen=True)
class GenerationSettings:
    """How responses are generated (all fields are part of the output's identity)."""

    max_new_tokens: int = 256
    """Longest response in tokens (EOS included)."""
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1 = off."""
    top_k: int = 0
    """Keep the k most likely ids; 0 = off."""
    seed: int = 0
    """Batch k is sampled with seed + k (irrelevant when greedy)."""
    batch_size: int = 8
    """Responses (prompt samples) per ``generate`` call."""
    num_samples: int = 1
    """Responses per prompt (> 1 needs temperature > 0)."""

    def validate(self) -> None:
        for name in ("max_new_tokens", "batch_size", "num_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {self.seed!r}")
        check_sampling_args(self.temperature, self.top_k, self.top_p)
        if self.num_samples > 1 and self.temperature == 0:
            raise ValueError(
                f"num_samples: {self.num_samples} samples per prompt need temperature > 0 "
                "(greedy decoding would give identical samples)"
            )
