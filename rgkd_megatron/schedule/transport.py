"""Moving data artifacts (rollouts, rewards, round pairs, held-out responses) between role windows.

Design:
- A payload is a flat ``dict[str, Tensor | JSON-able]`` (the typed payloads of ``payloads.py``
  give and read it: ``to_wire`` / ``from_wire``). ``pack`` turns it into a header (a JSON
  description: keys, dtypes, shapes, and the JSON-able values) plus a list of contiguous tensors;
  ``unpack`` is its inverse. No pickle is involved: a header is JSON bytes in a uint8 tensor.
- Every rank of a role holds the same data (generation and scoring end with a broadcast inside the
  role), so only the producer role's *leader* (its window's first rank) sends, to the consumer
  role's leader, which broadcasts inside its window. With colocated roles nothing moves.
- Sends are non-blocking (``isend``) and kept until ``flush``: a producer never waits for a
  consumer, so the plan's order (dependencies point backwards) cannot deadlock. Receives block.
  Messages carry a tag derived from the producing event, so a consumer may receive them in any order.
- Everything goes through a gloo group (CPU tensors), also when the training backend is NCCL: the
  payloads are token ids and per-sequence scalars, not activations.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

_DTYPES = {
    str(t): t
    for t in (
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.uint8,
        torch.bool,
    )
}
MESSAGES_PER_ARTIFACT = 64
"""Tags are ``tag * MESSAGES_PER_ARTIFACT + i`` for the i-th message of an artifact."""


def pack(payload: Mapping[str, Any]) -> tuple[dict, list[torch.Tensor]]:
    """(header, tensors) of a payload: tensors are sent raw, every other value as JSON."""
    header: dict[str, Any] = {"tensors": [], "values": {}}
    tensors = []
    for key, value in payload.items():
        if isinstance(value, torch.Tensor):
            if str(value.dtype) not in _DTYPES:
                raise TypeError(f"payload[{key!r}]: unsupported dtype {value.dtype}")
            header["tensors"].append([key, str(value.dtype), list(value.shape)])
            tensors.append(value.detach().cpu().contiguous())
        else:
            header["values"][key] = value
    if len(tensors) + 2 > MESSAGES_PER_ARTIFACT:
        raise ValueError(f"a payload holds at most {MESSAGES_PER_ARTIFACT - 2} tensors, got {len(tensors)}")
    return header, tensors


def unpack(header: Mapping[str, Any], tensors: list[torch.Tensor]) -> dict[str, Any]:
    out = dict(header["values"])
    for (key, _, _), tensor in zip(header["tensors"], tensors):
        out[key] = tensor
    return out


def _header_tensor(header: Mapping[str, Any]) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8)


def _empty_like_header(header: Mapping[str, Any]) -> list[torch.Tensor]:
    return [torch.empty(shape, dtype=_DTYPES[dtype]) for _, dtype, shape in header["tensors"]]


class RoleTransport:
    """Leader-to-leader point-to-point plus an in-window broadcast, over gloo.

    Construct collectively on every rank (it creates groups): ``windows`` maps each placed role
    to its ranks. ``send``/``recv`` are called by every rank of the producer/consumer role.
    """

    def __init__(self, windows: Mapping[str, range]):
        self.windows = {role: range(r.start, r.stop) for role, r in windows.items()}
        self.rank = dist.get_rank()
        self.group = dist.new_group(backend="gloo")  # world, CPU transport
        self.window_groups = {
            role: dist.new_group(list(ranks), backend="gloo") for role, ranks in self.windows.items()
        }
        self._pending: list[tuple[Any, torch.Tensor]] = []
        self.bytes_sent = 0

    def leader(self, role: str) -> int:
        return self.windows[role].start

    def same_ranks(self, a: str, b: str) -> bool:
        return self.windows[a] == self.windows[b]

    def send(self, payload: Mapping[str, Any], src_role: str, dst_role: str, tag: int) -> None:
        """Producer side (every rank of ``src_role`` calls it; only the leader sends)."""
        if self.same_ranks(src_role, dst_role) or self.rank != self.leader(src_role):
            return
        header, tensors = pack(payload)
        head = _header_tensor(header)
        dst = self.leader(dst_role)
        messages = [torch.tensor([head.numel()], dtype=torch.int64), head, *tensors]
        for i, tensor in enumerate(messages):
            work = dist.isend(tensor, dst, group=self.group, tag=tag * MESSAGES_PER_ARTIFACT + i)
            self._pending.append((work, tensor))
            self.bytes_sent += tensor.numel() * tensor.element_size()

    def recv(self, src_role: str, dst_role: str, tag: int) -> dict[str, Any]:
        """Consumer side (every rank of ``dst_role``): the payload, identical on every rank."""
        if self.same_ranks(src_role, dst_role):
            raise RuntimeError(f"{src_role} and {dst_role} share their ranks: nothing to receive")
        src, base = self.leader(src_role), tag * MESSAGES_PER_ARTIFACT
        group = self.window_groups[dst_role]
        leader = self.leader(dst_role)
        length = torch.zeros(1, dtype=torch.int64)
        if self.rank == leader:
            dist.recv(length, src, group=self.group, tag=base)
        dist.broadcast(length, leader, group=group)
        head = torch.empty(int(length.item()), dtype=torch.uint8)
        if self.rank == leader:
            dist.recv(head, src, group=self.group, tag=base + 1)
        dist.broadcast(head, leader, group=group)
        header = json.loads(bytes(head.tolist()).decode())
        tensors = _empty_like_header(header)
        for i, tensor in enumerate(tensors):
            if self.rank == leader:
                dist.recv(tensor, src, group=self.group, tag=base + 2 + i)
            dist.broadcast(tensor, leader, group=group)
        return unpack(header, tensors)

    def flush(self) -> None:
        """Wait for every send of this rank to complete."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()
