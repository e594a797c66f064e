"""Which checkpoint a run resumes from, and which old ones it deletes (retention).

One code path for every command that resumes (``rgkd-train``, ``rgkd-distill``): the complete
checkpoints (``iter_N`` with its marker, never ``iter_N.tmp``) are tried newest first; one whose
files differ from its manifest is skipped with a warning naming the file, and the run resumes from
the newest that matches. Retention keeps the newest ``keep_last`` and every ``keep_every``-th,
deletes the rest only after the new checkpoint is complete and verified, and never deletes the one
the run resumed from, nor one newer than the checkpoint just saved (left from an abandoned run; it
is replaced when the run reaches that iteration).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from rgkd_megatron.checkpoint.manifest import CheckpointError, manifest_problem, verify_checkpoint
from rgkd_megatron.utils.logging import get_logger

logger = get_logger(__name__)
MARKER = "rgkd.json"
_PREFIX = "iter_"


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"{_PREFIX}{iteration:07d}"


def iteration_of(path: Path) -> int | None:
    """N of a complete-looking ``iter_N`` directory name (None for ``iter_N.tmp`` and others)."""
    digits = path.name.removeprefix(_PREFIX)
    return int(digits) if path.name.startswith(_PREFIX) and digits.isdigit() else None


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """``iter_N`` directories under ``root`` that have their completion marker, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if iteration_of(p) is not None and (p / MARKER).is_file()]
    return sorted(found, key=iteration_of)


def find_latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """Newest complete checkpoint under ``root`` (``latest`` file first, then a scan), or None."""
    root = Path(root)
    latest = root / "latest"
    if latest.is_file():
        candidate = root / latest.read_text().strip()
        if (candidate / MARKER).is_file():
            return candidate
    complete = complete_checkpoints(root)
    return complete[-1] if complete else None


def choose_resume_checkpoint(root: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """(newest complete checkpoint that matches its manifest, "name: why" of each newer one
    skipped). Raises ``CheckpointError`` when there are checkpoints but none is valid."""
    skipped: list[str] = []
    for path in reversed(complete_checkpoints(root)):
        problem = manifest_problem(path)
        if problem is None:
            return path, skipped
        skipped.append(f"{path.name}: {problem}")
    if skipped:
        raise CheckpointError(
            f"{root}: no valid checkpoint to resume from ({'; '.join(skipped)}); move the "
            "checkpoints directory away to start over"
        )
    return None, skipped


def select_resume_checkpoint(root: str | os.PathLike) -> Path | None:
    """Collective: rank 0 picks the checkpoint to resume from (``choose_resume_checkpoint``, with a
    warning for each one skipped) and every rank gets the same answer."""
    answer: list = [None]
    if dist.get_rank() == 0:
        try:
            path, skipped = choose_resume_checkpoint(root)
            answer[0] = (str(path) if path else None, None)
            if skipped:
                target = f"resuming from {path.name}"
                logger.warning("%s, skipped; %s", ", skipped; ".join(skipped), target)
        except CheckpointError as exc:
            answer[0] = (None, str(exc))
    dist.broadcast_object_list(answer, src=0)
    path, error = answer[0]
    if error is not None:
        raise CheckpointError(error)
    return Path(path) if path else None


@dataclass(frozen=True)
class Retention:
    """Which checkpoints to keep (``train.keep_last_checkpoints`` / ``keep_checkpoint_every``)."""

    keep_last: int = 2
    keep_every: int = 0
    protect: Path | None = None
    """Never deleted by this run (the checkpoint it resumed from)."""


def iterations_to_delete(
    iterations: list[int], newest: int, keep_last: int, keep_every: int, protected: set[int]
) -> list[int]:
    """The iterations (up to ``newest``, the one just saved) that retention deletes."""
    if keep_last <= 0:
        return []
    eligible = sorted(i for i in iterations if i <= newest)
    keep = set(eligible[-keep_last:]) | protected | {newest}
    if keep_every > 0:
        keep |= {i for i in eligible if i % keep_every == 0}
    return [i for i in eligible if i not in keep]


def apply_retention(saved: Path, retention: Retention) -> list[Path]:
    """Delete what ``retention`` does not keep, once ``saved`` (just committed) is verified; returns
    the deleted directories. Rank 0 only. Each is first renamed to ``iter_N.tmp`` (never loaded),
    so an interrupted deletion cannot leave a complete-looking, half-deleted checkpoint."""
    problem = manifest_problem(saved)
    if problem is not None:
        logger.error("%s: %s right after saving; no old checkpoint deleted", saved, problem)
        return []
    by_iter = {iteration_of(p): p for p in complete_checkpoints(saved.parent)}
    protected = {iteration_of(retention.protect)} if retention.protect is not None else set()
    newest = iteration_of(saved)
    doomed = iterations_to_delete(list(by_iter), newest, retention.keep_last, retention.keep_every, protected)
    deleted = []
    for iteration in doomed:
        path = by_iter[iteration]
        trash = path.with_name(path.name + ".tmp")
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(path, trash)
        shutil.rmtree(trash)
        deleted.append(path)
    if deleted:
        logger.info("retention: deleted %s", ", ".join(p.name for p in deleted))
    return deleted


def verify_on_rank0(path: str | os.PathLike) -> None:
    """Collective: rank 0 checks ``path`` against its manifest (``verify_checkpoint``); every rank
    raises the same ``CheckpointError`` when it does not match."""
    answer: list = [None]
    if dist.get_rank() == 0:
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            answer[0] = str(exc)
    dist.broadcast_object_list(answer, src=0)
    if answer[0] is not None:
        raise CheckpointError(answer[0])
