"""Per-checkpoint manifest: the size and CRC-32 of every file, written last, checked before a load.

``manifest.json`` lists each file of a checkpoint directory (relative path -> bytes, crc32). A load,
a resume or a conversion first compares the directory with it, so a truncated, damaged or deleted
shard is named (``iter_0000040/__0_0.distcp: 1234 bytes, manifest says 5678``) instead of surfacing
as an ``EOFError`` deep inside torch. CRC-32 (``zlib``) rather than SHA-256: it detects the damage
that happens to checkpoints (truncation, a torn copy, bit rot) at several GB/s, and the manifest is
not a security boundary (checkpoints are read with ``weights_only=True`` and never execute code).
Directories written before manifests existed have none; they load as before, with a one-line note.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

from rgkd_megatron.utils.logging import get_logger

logger = get_logger(__name__)
MANIFEST = "manifest.json"
_CHUNK = 1 << 22


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded: damaged, incomplete or unreadable."""


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _listed_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def build_manifest(root: Path) -> dict:
    """{"version", "files": {relative path: {"bytes", "crc32"}}} of every file under ``root``."""
    files = {
        p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, "crc32": file_crc32(p)}
        for p in _listed_files(root)
    }
    return {"version": 1, "checksum": "crc32", "files": files}


def write_manifest(root: str | os.PathLike) -> Path:
    """Write ``root/manifest.json`` (temp file + rename) describing the files now in ``root``."""
    root = Path(root)
    manifest = build_manifest(root)
    target = root / MANIFEST
    tmp = target.with_name(f"{MANIFEST}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, target)
    return target


def manifest_problem(root: str | os.PathLike, checksums: bool = True) -> str | None:
    """The first way ``root`` differs from its manifest (None when it matches, or when there is no
    manifest: see ``has_manifest``). Sizes are checked for every file before any checksum."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is unreadable ({exc})"
    for name, entry in files.items():
        target = root / name
        if not target.is_file():
            return f"{name} is missing (listed in {MANIFEST})"
        size = target.stat().st_size
        if size != entry["bytes"]:
            return f"{name} size {size} != manifest {entry['bytes']}"
    if checksums:
        for name, entry in files.items():
            if file_crc32(root / name) != entry["crc32"]:
                return f"{name} checksum differs from {MANIFEST} (damaged)"
    return None


def has_manifest(root: str | os.PathLike) -> bool:
    return (Path(root) / MANIFEST).is_file()


def verify_checkpoint(root: str | os.PathLike) -> None:
    """Raise ``CheckpointError`` naming the damaged or missing file; note a checkpoint without a
    manifest (saved before manifests existed), which is loaded unverified."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint directory not found")
    if not has_manifest(root):
        logger.info("%s: no %s (saved by an older version): loading it unverified", root, MANIFEST)
        return
    problem = manifest_problem(root)
    if problem is not None:
        raise CheckpointError(f"{root}: {problem}")
