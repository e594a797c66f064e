"""Free-space checks for writers: refuse a write that cannot fit, and name a full disk as such."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator

__all__ = ["disk_full_error", "ensure_free_bytes", "free_bytes", "no_space_errors"]


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the filesystem that holds ``path`` (its nearest existing ancestor)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def disk_full_error(path: str | os.PathLike, needed: int | None, free: int, what: str) -> OSError:
    """An ENOSPC ``OSError`` naming ``path``, the bytes ``what`` needs (when known) and the free bytes."""
    need = f"needs {needed} bytes, " if needed is not None else ""
    return OSError(errno.ENOSPC, f"No space left for {what} ({need}{free} bytes free)", os.fspath(path))


def ensure_free_bytes(path: str | os.PathLike, needed: int, what: str) -> None:
    """Raise ``disk_full_error`` before writing ``needed`` bytes at ``path`` when they do not fit."""
    free = free_bytes(path)
    if needed > free:
        raise disk_full_error(path, needed, free, what)


@contextlib.contextmanager
def no_space_errors(path: str | os.PathLike, needed: int | None, what: str) -> Iterator[None]:
    """Turn an ENOSPC / EDQUOT ``OSError`` raised inside into ``disk_full_error`` for ``path``."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise disk_full_error(path, needed, free_bytes(path), what) from exc
