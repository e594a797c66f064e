"""The cache directory during a build: start or resume, commit shards atomically, finalise the manifest.

Crash safety and resume (files named in ``manifest.py``):
- ``prepare`` (rank 0) writes ``build.json`` (the identity of the build: everything of the manifest
  but the shard checksums) and ``rows.npy``. If a ``build.json`` already exists, the requested build
  must have the same identity (``manifest.IDENTITY_FIELDS``), else ``CacheMismatchError`` naming the
  field; then every shard already on disk is kept and only the missing ones are pending.
- ``commit`` writes ``shard_XXXXXX.bin`` to a temp file, fsyncs it, writes its sidecar
  ``shard_XXXXXX.json`` ({size, sha256}) atomically, then renames the shard: the shard's existence
  is the commit point, and its sidecar always exists by then. A kill at any moment leaves committed
  shards (reused as they are) and temp files (deleted by the next ``prepare``).
- ``finalize`` (rank 0, once no shard is missing) writes ``manifest.json`` atomically, then deletes the
  sidecars and ``build.json``. A cache is complete exactly when ``manifest.json`` exists.
- Each shard's bytes depend only on the shard plan and the teacher arithmetic, so a resumed build
  (any DP size) writes exactly the bytes an uninterrupted one would.
- ``--overwrite`` deletes only files of this format (manifest, build state, row index, shards,
  sidecars, temp files), never anything else in the directory.

Fault injection (tests): with ``RGKD_CACHE_FAULT_AFTER_SHARDS=N`` in the environment, the process that
commits its (N+1)-th shard truncates that shard's temp file to half and SIGKILLs itself before the
rename, like a node dying mid-write.
"""

from __future__ import annotations

import json
import os
import re
import signal

import numpy as np

from rgkd_megatron.cache.format import ShardArrays, ShardHeader, write_shard
from rgkd_megatron.cache.manifest import (
    BUILD_STATE,
    MANIFEST,
    ROW_INDEX,
    CacheMismatchError,
    get_field,
    id_bits_of,
    layout_of,
    load_manifest,
    plan_shards,
    resume_mismatch,
    row_index_bytes,
    shard_name,
    write_json_atomic,
)
from rgkd_megatron.utils.logging import get_logger

__all__ = ["FAULT_ENV", "CacheWriter", "check_existing"]

logger = get_logger(__name__)
FAULT_ENV = "RGKD_CACHE_FAULT_AFTER_SHARDS"
_OURS = re.compile(r"^(shard_\d{6}\.(bin|json)|manifest\.json|build\.json|rows\.npy)(\.tmp\.\d+)?$")


def check_existing(directory: str, identity: dict) -> str | None:
    """What ``directory`` holds for a build of ``identity``: "complete" (a finished cache of this
    identity), "resume" (a build in progress of it) or None (nothing of ours). Raises
    CacheMismatchError naming the file, the first differing field, the value there and the requested
    one. Read-only: the build tool calls it before loading the teacher."""
    for name, what, state in ((MANIFEST, "a complete cache", "complete"), (BUILD_STATE, "a build in progress", "resume")):  # fmt: skip
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            continue
        if name == MANIFEST:
            existing = load_manifest(directory)
        else:
            try:
                with open(path, encoding="utf-8") as f:
                    existing = json.load(f)
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot parse {path}: {e} (delete it or pass --overwrite)") from e
        field = resume_mismatch(existing, identity)
        if field is not None:
            raise CacheMismatchError(
                f"{path}: {what} with field '{field}' = {get_field(existing, field)!r}, but this build has "
                f"{get_field(identity, field)!r}: rerun with the original settings to resume/reuse it, pass "
                "--overwrite to replace it, or choose another --output"
            )
        return state
    return None


class CacheWriter:
    """One build's view of the cache directory.

    Args:
        directory: the cache directory (created if missing).
        identity: the manifest without ``shards`` (see ``manifest.py``), including ``num_rows``,
            ``row_index`` and ``rows_per_shard``.
        row_offsets: int64 [N + 1] first global row of each sample (``rows.npy``).
    """

    def __init__(self, directory: str, identity: dict, row_offsets: np.ndarray):
        self.directory = os.fspath(directory)
        self.identity = identity
        self.row_offsets = np.asarray(row_offsets, dtype=np.int64)
        self.plan = plan_shards(np.diff(self.row_offsets), identity["rows_per_shard"])
        self._committed = 0

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def header(self, index: int) -> ShardHeader:
        s, ident = self.plan[index], self.identity
        return ShardHeader(
            ident["k"], ident["dtype"], ident["block_rows"], s["num_rows"], s["first_row"], s["first_sample"],
            s["num_samples"], ident["version"], id_bits_of(ident),
        )  # fmt: skip

    def expected_size(self, index: int) -> int:
        return layout_of(self.identity, self.plan[index]["num_rows"]).size

    # ------------------------------------------------------------------------------------- rank 0
    def prepare(self, overwrite: bool = False) -> list[int] | None:
        """Start or resume (rank 0 only). Returns the pending shard indices, or None when the cache is
        already complete with this identity. Raises CacheMismatchError for another build's directory."""
        os.makedirs(self.directory, exist_ok=True)
        if overwrite:
            self._remove_ours(keep_complete=False)
        if check_existing(self.directory, self.identity) == "complete":
            self._remove_ours(keep_complete=True)
            return None
        state_path = self.path(BUILD_STATE)
        self._remove_temp_files()
        index = row_index_bytes(self.row_offsets)
        with open(self.path(ROW_INDEX) + f".tmp.{os.getpid()}", "wb") as f:
            f.write(index)
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.path(ROW_INDEX) + f".tmp.{os.getpid()}", self.path(ROW_INDEX))
        write_json_atomic(state_path, self.identity)
        return self.pending()

    def pending(self) -> list[int]:
        """Shards not committed yet (a shard counts once its file exists with the planned size)."""
        out = []
        for i in range(len(self.plan)):
            path = self.path(shard_name(i))
            sidecar = self.path(shard_name(i)[:-4] + ".json")
            ok = (
                os.path.exists(path)
                and os.path.exists(sidecar)
                and os.path.getsize(path) == self.expected_size(i)
            )
            if not ok:
                out.append(i)
        return out

    def finalize(self) -> dict:
        """Write manifest.json from the sidecars (rank 0, every shard committed); returns the manifest."""
        missing = self.pending()
        if missing:
            raise RuntimeError(f"cannot finalise {self.directory}: shards {missing[:8]} are not committed")
        shards = []
        for i, entry in enumerate(self.plan):
            with open(self.path(shard_name(i)[:-4] + ".json"), encoding="utf-8") as f:
                sidecar = json.load(f)
            shards.append(
                {"name": shard_name(i), **entry, "size": sidecar["size"], "sha256": sidecar["sha256"]}
            )
        manifest = {**self.identity, "shards": shards}
        write_json_atomic(self.path(MANIFEST), manifest)
        self._remove_ours(keep_complete=True)
        return manifest

    def _remove_temp_files(self) -> None:
        for name in os.listdir(self.directory):
            if ".tmp." in name and _OURS.match(name):
                os.remove(self.path(name))

    def _remove_ours(self, keep_complete: bool) -> None:
        keep = {MANIFEST, ROW_INDEX} | {shard_name(i) for i in range(len(self.plan))}
        for name in os.listdir(self.directory):
            if _OURS.match(name) and not (keep_complete and name in keep):
                os.remove(self.path(name))

    # ------------------------------------------------------------------------------- writer ranks
    def commit(self, index: int, arrays: ShardArrays) -> dict:
        """Write shard ``index`` atomically with its sidecar; returns {'size', 'sha256'}."""
        sidecar = self.path(shard_name(index)[:-4] + ".json")
        fault_after = os.environ.get(FAULT_ENV)

        def before_rename(tmp: str, info: dict) -> None:
            if fault_after is not None and self._committed >= int(fault_after):
                with open(tmp, "r+b") as f:
                    f.truncate(info["size"] // 2)
                logger.warning("%s=%s: killing this process mid-write of %s", FAULT_ENV, fault_after, tmp)
                os.kill(os.getpid(), signal.SIGKILL)
            write_json_atomic(sidecar, info)

        info = write_shard(self.path(shard_name(index)), self.header(index), arrays, before_rename)
        self._committed += 1
        return info
