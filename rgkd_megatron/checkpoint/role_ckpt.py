"""Checkpoint of a whole multi-role loop: every role's model + optimizer + LR schedule, and each
rank's own state (RNG, the loop's cursor and buffers), in one directory.

Layout (``root`` = the run's ``checkpoints/``)::

    root/iter_0000004/                  dist_checkpointing: sharded tensors of every role, keys
                                        prefixed by the role ("policy.decoder...", "reward.decoder...")
    root/iter_0000004/common_policy.pt  a role's non-sharded state (optimizer param groups, LR
                                        schedule), written by the role's first rank
    root/iter_0000004/rank/rank_00003.pt  per rank: RNG states + the loop state it passed in
    root/iter_0000004/rgkd.json         completion marker
    root/iter_0000004/manifest.json     size and CRC-32 of every file (written last)
    root/latest                         newest complete iteration

Why not ``dist_ckpt.save_checkpoint`` per role: megatron-core's ``dist_checkpointing`` is
collective over the whole world and writes non-sharded ("common") state from global rank 0 only,
so a role whose window does not contain rank 0 would lose its optimizer param groups and schedule.
Here every rank takes part in one save with the sharded tensors of the roles it holds (none on an
idle rank), and each role's common part goes to its own file. Atomicity as in ``dist_ckpt``: all of
it lands in ``iter_N.tmp``, renamed after the marker is written; ``.tmp`` directories are never loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, extract_matching_values, merge
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

from rgkd_megatron.checkpoint.discovery import Retention
from rgkd_megatron.checkpoint.dist_ckpt import (
    _METADATA,
    MARKER,
    SAVE_FAULT_ENV,
    _init_optimizer_state,
    _unshare_adam_steps,
    begin_save,
    commit_save,
    fault_in_save,
    model_sharded_state_dict,
    rank_file,
    read_errors,
)
from rgkd_megatron.checkpoint.rng import capture_rng_state, restore_rng_state
from rgkd_megatron.checkpoint.writer import disk_errors, save_sharded
from rgkd_megatron.utils.logging import get_logger

__all__ = ["SAVE_FAULT_ENV", "load_roles_checkpoint", "save_roles_checkpoint"]
logger = get_logger(__name__)


def _is_sharded(x: Any) -> bool:
    return isinstance(x, ShardedBase)


def _fill_zero_step(optimizer_sd: Any) -> None:
    """megatron-core saves the shared Adam step as ``common_step`` only when it is truthy, so the
    state of a role that has not stepped yet (step 0) loads without any step; put it back."""
    if isinstance(optimizer_sd, dict):
        if "state" in optimizer_sd and "param_groups" in optimizer_sd:
            states = optimizer_sd["state"]
            if "common_step" not in states and any(
                "step" not in v for v in states.values() if isinstance(v, dict)
            ):
                states["common_step"] = torch.tensor(0.0)
            return
        for value in optimizer_sd.values():
            _fill_zero_step(value)


def _role_state(role: str, engine: Any, is_loading: bool) -> tuple[dict, dict, dict]:
    """(sharded, common, local) parts of one role's model + optimizer state dict; ``local`` holds
    the values megatron marks non-persistent (rebuilt from the live objects on load, never saved)."""
    model = engine.unwrapped()
    metadata = {**_METADATA, "dp_cp_group": engine.groups.pg_collection.dp_cp}
    model_sd = model_sharded_state_dict(model, prefix=f"{role}.")
    # a role that has not stepped yet (e.g. the RM behind an overlapped cut) has no Adam state, but
    # megatron-core's load template always has: create it (zeros, step 0, what the first step makes)
    _init_optimizer_state(engine.optimizer)
    optimizer_sd = engine.optimizer.sharded_state_dict(
        model_sharded_state_dict(model, prefix=f"{role}.") if is_loading else model_sd,
        is_loading=is_loading,
        metadata=metadata,
    )
    sharded, common = extract_matching_values({"model": model_sd, "optimizer": optimizer_sd}, _is_sharded)
    local, common = extract_matching_values(common, lambda x: isinstance(x, LocalNonpersistentObject))
    return sharded, common, dict_list_map_inplace(lambda x: x.unwrap(), local)


def _is_leader(engine: Any) -> bool:
    return dist.get_rank() == engine.groups.layout.rank_offset


def save_roles_checkpoint(
    root: str | os.PathLike,
    iteration: int,
    engines: Mapping[str, Any],
    rank_state: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
    retention: Retention | None = None,
) -> Path:
    """Collectively (every rank of the world) save the roles this rank holds (``engines``: role ->
    Engine, possibly empty) and ``rank_state`` (tensors and JSON-able values only)."""
    final, tmp = begin_save(root, iteration)
    sharded: dict[str, Any] = {}
    commons: dict[str, dict] = {}
    for role, engine in engines.items():
        sharded[role], common, _ = _role_state(role, engine, is_loading=False)
        if _is_leader(engine):
            commons[role] = {"common": common, "scheduler": engine.scheduler.state_dict()}
    save_sharded(sharded, tmp)  # into an empty directory: our own files follow
    with disk_errors(tmp):
        for role, common in commons.items():
            torch.save(common, tmp / f"common_{role}.pt")
        torch.save({"rng": capture_rng_state(), "state": dict(rank_state)}, rank_file(tmp, "rank"))
    fault_in_save(iteration)
    marker = {"iteration": iteration, "world_size": dist.get_world_size(), **dict(meta or {})}
    commit_save(final, tmp, marker, retention)
    logger.info("saved loop checkpoint %s", final)
    return final


def load_roles_checkpoint(path: str | os.PathLike, engines: Mapping[str, Any]) -> dict[str, Any]:
    """Collectively load what ``save_roles_checkpoint`` wrote into ``engines``; restores this rank's
    RNG and returns its ``rank_state``. The world size must match (exact resume, same layout)."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{path}: not a complete rgkd checkpoint (missing {MARKER})")
    meta = json.loads(marker.read_text())
    if meta.get("world_size") != dist.get_world_size():
        raise ValueError(
            f"{path}: saved by {meta.get('world_size')} ranks, this run has {dist.get_world_size()}; "
            "a loop checkpoint resumes at the same placement"
        )
    sharded, commons, local = {}, {}, {}
    for role, engine in engines.items():
        common_file = path / f"common_{role}.pt"
        if not common_file.is_file():
            raise FileNotFoundError(f"{common_file}: missing (the checkpoint has no {role} role)")
        with read_errors(path):
            commons[role] = torch.load(common_file, weights_only=True)
        sharded[role], _, local[role] = _role_state(role, engine, is_loading=True)
    with read_errors(path):
        loaded = dist_checkpointing.load(sharded, str(path))
    for role, engine in engines.items():
        state = merge(merge(commons[role]["common"], local[role]), loaded[role])
        prefix = f"{role}."
        engine.unwrapped().load_state_dict({k.removeprefix(prefix): v for k, v in state["model"].items()})
        _fill_zero_step(state["optimizer"])
        engine.optimizer.load_state_dict(state["optimizer"])
        _unshare_adam_steps(engine.optimizer)
        engine.scheduler.load_state_dict(commons[role]["scheduler"])
    with read_errors(path):
        own = torch.load(path / "rank" / f"rank_{dist.get_rank():05d}.pt", weights_only=True)
    restore_rng_state(own["rng"])
    return own["state"]
