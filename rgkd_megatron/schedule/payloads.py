"""The payloads of the data artifacts that cross role windows: one small frozen dataclass per kind,
and the one place they are turned into what ``schedule/transport.py`` moves (a flat dict of tensors
and JSON-able values, no pickle) and back.

| payload | artifact (``schedule/artifacts.py``) | fields |
|---|---|---|
| :class:`RolloutBatch` | ``rollouts@j`` | sequences (prompt + response ids), prompt ids, prompt lengths |
| :class:`RewardBatch` | ``rewards@j`` | the bounded rewards [g * n] (a tensor) |
| :class:`HeldoutResponses` | ``heldout@t`` | the policy's greedy held-out responses (token ids) |

``to_wire`` gives the transport's dict, ``from_wire`` reads one (extra keys, e.g. those of a
producer's local rollout on shared ranks, are ignored).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import torch

P = TypeVar("P", bound="Payload")


@dataclass(frozen=True)
class Payload:
    """Base of the payload kinds: every field is a wire key."""

    def to_wire(self) -> dict[str, Any]:
        """The flat dict the transport moves (tensors raw, the rest as JSON)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_wire(cls: type[P], wire: Mapping[str, Any]) -> P:
        """The payload in ``wire`` (its own keys only)."""
        missing = [f.name for f in fields(cls) if f.name not in wire]
        if missing:
            raise KeyError(f"{cls.__name__}: the payload lacks {missing}")
        return cls(**{f.name: wire[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class RolloutBatch(Payload):
    """What of a policy step's rollout the reward role needs: it scores the sequences and keeps them
    (with their prompts) as the RM's freshest student samples."""

    sequences: list[list[int]]
    prompt_ids: list[int]
    prompt_lens: list[int]


@dataclass(frozen=True)
class RewardBatch(Payload):
    """The rewards of a policy step's rollouts (reward -> policy)."""

    rewards: torch.Tensor


@dataclass(frozen=True)
class HeldoutResponses(Payload):
    """The policy's greedy responses to the held-out prompts (policy -> reward, teacher)."""

    responses: list[list[int]]
