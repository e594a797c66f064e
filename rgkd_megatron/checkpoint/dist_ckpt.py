"""Save/load of a role's full training state with megatron-core ``dist_checkpointing``.

Layout on disk (``root`` = the run's checkpoint directory)::

    root/iter_0000010/          dist_checkpointing dir: model + optimizer shards, common state
    root/iter_0000010/rgkd.json  completion marker: iteration, layout, world size (written last)
    root/iter_0000010/rng/rank_00003.pt   per-rank RNG states
    root/iter_0000010/manifest.json  size and CRC-32 of every file above (written last)
    root/latest                  text file naming the newest complete iteration (atomic replace)

Atomicity: everything is written into ``iter_XXXXXXX.tmp`` and renamed once every rank has
finished; a crash mid-save leaves only a ``.tmp`` directory, which is never loaded and is cleared
by the next save. A directory counts as complete only with its marker; resume picks the newest
complete one that matches its manifest and applies retention (``checkpoint.discovery``). Writing,
free space and a full disk: ``checkpoint.writer``.

Resharding: model weights and the optimizer (``fully_reshardable`` format for the distributed
optimizer) reload at any TP/PP/DP; RNG states are restored only when the layout is unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from rgkd_megatron.checkpoint.discovery import (
    MARKER,
    Retention,
    apply_retention,
    find_latest_checkpoint,
    iteration_dir,
    verify_on_rank0,
)
from rgkd_megatron.checkpoint.manifest import CheckpointError, write_manifest
from rgkd_megatron.checkpoint.rng import capture_rng_state, restore_rng_state
from rgkd_megatron.checkpoint.writer import disk_errors, save_sharded
from rgkd_megatron.utils.logging import get_logger

__all__ = ["MARKER", "find_latest_checkpoint", "iteration_dir", "load_checkpoint", "save_checkpoint"]
logger = get_logger(__name__)
SAVE_FAULT_ENV = "RGKD_FAULT_IN_SAVE"
"""Testing hook: ``"<iteration>:<rank>"`` SIGKILLs that rank after it wrote its part of that
iteration's checkpoint, before the checkpoint is complete (crash-during-save tests)."""
_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,
    "singleton_local_shards": False,
}


def fault_in_save(iteration: int) -> None:
    spec = os.environ.get(SAVE_FAULT_ENV, "")
    if spec and spec.split(":") == [str(iteration), str(dist.get_rank())]:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def read_errors(path: str | os.PathLike) -> Iterator[None]:
    """A checkpoint megatron-core cannot read (e.g. a damaged one without a manifest) becomes a
    ``CheckpointError`` naming it instead of a deep torch traceback."""
    try:
        yield
    except (CheckpointError, MemoryError):
        raise
    except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
        raise CheckpointError(f"{path}: cannot read the checkpoint ({_root_cause(exc)})") from exc


def _root_cause(exc: BaseException) -> str:
    """``Type: first line`` of the error, unwrapping DCP's per-rank ``CheckpointException``."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        exc = next(iter(failures.values()))[0]
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def rank_file(tmp: Path, subdir: str) -> Path:
    """This rank's file in ``tmp/subdir`` (created on demand: the directory must be empty when
    megatron-core starts writing, or it reports an "old incomplete / corrupted checkpoint")."""
    (tmp / subdir).mkdir(exist_ok=True)
    return tmp / subdir / f"rank_{dist.get_rank():05d}.pt"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _layout_of(engine: Any) -> dict[str, int]:
    layout = engine.groups.layout
    return {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "world_size": dist.get_world_size()}


def _uses_distributed_optimizer(engine: Any) -> bool:
    return bool(engine.model[0].ddp_config.use_distributed_optimizer)


def model_sharded_state_dict(model: torch.nn.Module, prefix: str = "") -> dict:
    """The model's sharded state dict, with its own DP group (a role on a rank window has no
    parallel_state groups for megatron-core to fall back to)."""
    metadata = dict(_METADATA)
    groups = getattr(model, "pg_collection", None)
    if groups is not None and getattr(groups, "dp_cp", None) is not None:
        metadata["dp_cp_group"] = groups.dp_cp
    return model.sharded_state_dict(prefix=prefix, metadata=metadata)


def begin_save(root: str | os.PathLike, iteration: int) -> tuple[Path, Path]:
    """Collective: (final, tmp) directories of iteration's checkpoint; rank 0 creates an empty
    ``iter_N.tmp``, removing what a crashed save left there."""
    root = Path(root)
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    return final, tmp


def commit_save(final: Path, tmp: Path, marker: dict, retention: Retention | None = None) -> None:
    """Collective: once every rank wrote its part, rank 0 writes the completion marker and the
    manifest, renames ``tmp`` to ``final``, points ``latest`` at it (atomic replace) and deletes
    what ``retention`` does not keep."""
    dist.barrier()
    if dist.get_rank() == 0:
        with disk_errors(tmp):
            (tmp / MARKER).write_text(json.dumps(marker, indent=1))
            write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text_atomic(final.parent / "latest", final.name)
        if retention is not None:
            apply_retention(final, retention)
    dist.barrier()


def save_checkpoint(
    root: str | os.PathLike,
    iteration: int,
    engine: Any,
    extra: dict | None = None,
    retention: Retention | None = None,
) -> Path:
    """Collectively save model, optimizer, LR schedule, ``extra`` (e.g. data cursor) and RNG."""
    final, tmp = begin_save(root, iteration)
    model = engine.unwrapped()
    model_sd = model_sharded_state_dict(model)
    state = {
        "model": model_sd,
        "optimizer": engine.optimizer.sharded_state_dict(
            model_sd, is_loading=False, metadata=dict(_METADATA)
        ),
        "scheduler": engine.scheduler.state_dict(),
        "iteration": iteration,
        "extra": extra or {},
    }
    save_sharded(state, tmp)
    with disk_errors(tmp):
        torch.save(capture_rng_state(), rank_file(tmp, "rng"))
    fault_in_save(iteration)
    marker = {
        "iteration": iteration,
        "layout": _layout_of(engine),
        "distributed_optimizer": _uses_distributed_optimizer(engine),
    }
    commit_save(final, tmp, marker, retention)
    logger.info("saved checkpoint %s", final)
    return final


def load_checkpoint(path: str | os.PathLike, engine: Any, load_optimizer: bool = True) -> dict:
    """Load a checkpoint saved at any layout into ``engine``; returns {'iteration', 'extra'}."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{path}: not a complete rgkd checkpoint (missing {MARKER})")
    meta = json.loads(marker.read_text())
    saved_distopt = meta.get("distributed_optimizer")
    if load_optimizer and saved_distopt is not None and saved_distopt != _uses_distributed_optimizer(engine):
        raise ValueError(
            f"{path}: saved with parallel.use_distributed_optimizer={str(saved_distopt).lower()}, this run "
            f"has {str(not saved_distopt).lower()}; the optimizer states have different formats. Use the "
            "same setting to resume, or start a new run with model.load pointing at this checkpoint"
        )
    model = engine.unwrapped()
    model_sd = model_sharded_state_dict(model)
    state: dict[str, Any] = {"model": model_sd, "scheduler": None, "iteration": None, "extra": None}
    if load_optimizer:
        _init_optimizer_state(engine.optimizer)
        state["optimizer"] = engine.optimizer.sharded_state_dict(
            model_sharded_state_dict(model), is_loading=True, metadata=dict(_METADATA)
        )
    with read_errors(path):
        loaded = dist_checkpointing.load(state, str(path))
    model.load_state_dict(loaded["model"])
    if load_optimizer:
        engine.optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(engine.optimizer)
        engine.scheduler.load_state_dict(loaded["scheduler"])
    if meta["layout"] == _layout_of(engine):
        with read_errors(path):
            rng = torch.load(path / "rng" / f"rank_{dist.get_rank():05d}.pt", weights_only=True)
        restore_rng_state(rng)
    else:
        logger.warning(
            "checkpoint layout %s differs from the current %s: RNG states not restored",
            meta["layout"],
            _layout_of(engine),
        )
    return {"iteration": int(loaded["iteration"]), "extra": loaded["extra"]}


def _init_optimizer_state(optimizer: Any) -> None:
    """Create empty optimizer state before building the *load* state dict (its structure must
    match the saved one). megatron's init_state_fn makes exp_avg/exp_avg_sq; torch's Adam (used
    when neither TE nor apex is installed) also keeps a per-param ``step`` tensor, which the
    distributed optimizer's state_dict() reads, so we add it."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if inner.init_state_fn is not None:
            inner.init_state_fn(inner.optimizer, inner.config)
        for group in inner.optimizer.param_groups:
            for param in group["params"]:
                state = inner.optimizer.state[param]
                if isinstance(inner.optimizer, torch.optim.Adam) and "step" not in state:
                    state["step"] = torch.tensor(0.0)


def _unshare_adam_steps(optimizer: Any) -> None:
    """torch's Optimizer.load_state_dict can leave ONE ``step`` tensor shared by every param; torch
    Adam increments it in place once per param, so the resumed run's bias correction silently
    drifts. Give each param its own copy."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in inner.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def save_model_weights(path: str | os.PathLike, model: torch.nn.Module | None) -> None:
    """Weights only (e.g. an initialisation shared by several layouts, or a converted checkpoint),
    with a manifest. Collective: a rank without the model passes None. Written into ``path.tmp``
    and renamed over ``path`` when complete."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if dist.get_rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    save_sharded({"model": model_sharded_state_dict(model) if model is not None else {}}, tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        with disk_errors(tmp):
            write_manifest(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    dist.barrier()


def load_model_weights(path: str | os.PathLike, model: torch.nn.Module | None) -> None:
    """Collective over the world: a rank that holds no such model passes None and takes part."""
    verify_on_rank0(path)
    with read_errors(path):
        loaded = dist_checkpointing.load(
            {"model": model_sharded_state_dict(model) if model else {}}, str(path)
        )
    if model is not None:
        model.load_state_dict(loaded["model"])


def load_backbone_weights(
    path: str | os.PathLike, model: torch.nn.Module | None, skip_prefix: str = "output_layer."
) -> None:
    """Load every weight except the head (e.g. a reward model initialised from a policy checkpoint,
    whose output layer is a [vocab, hidden] projection, not the RM's scalar head). Collective: a
    rank without the model passes None."""
    sd = model_sharded_state_dict(model) if model is not None else {}
    sharded = {k: v for k, v in sd.items() if not k.startswith(skip_prefix)}
    verify_on_rank0(path)
    with read_errors(path):
        loaded = dist_checkpointing.load({"model": sharded}, str(path))
    if model is None:
        return
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    bad_missing = [k for k in missing if not k.startswith(skip_prefix) and not k.endswith("_extra_state")]
    if bad_missing or unexpected:
        raise ValueError(f"{path}: backbone load mismatch: missing {bad_missing}, unexpected {unexpected}")
