"""Manifest checks, resume selection and retention on synthetic checkpoint directories (no torch)."""

from __future__ import annotations

import json
import zlib

import pytest

from rgkd_megatron.checkpoint.discovery import (
    MARKER,
    choose_resume_checkpoint,
    iteration_dir,
    iterations_to_delete,
)
from rgkd_megatron.checkpoint.manifest import (
    MANIFEST,
    CheckpointError,
    manifest_problem,
    verify_checkpoint,
    write_manifest,
)


def _checkpoint(root, iteration, manifest=True):
    path = iteration_dir(root, iteration)
    (path / "rng").mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(bytes(range(256)) * 8)
    (path / "rng" / "rank_00000.pt").write_bytes(b"rng")
    (path / MARKER).write_text("{}")
    if manifest:
        write_manifest(path)
    return path


def test_manifest_lists_every_file_with_size_and_crc32(tmp_path):
    path = _checkpoint(tmp_path, 1)
    files = json.loads((path / MANIFEST).read_text())["files"]
    assert sorted(files) == ["__0_0.distcp", MARKER, "rng/rank_00000.pt"]
    data = (path / "__0_0.distcp").read_bytes()
    assert files["__0_0.distcp"] == {"bytes": len(data), "crc32": zlib.crc32(data)}
    assert manifest_problem(path) is None


def test_truncated_missing_and_flipped_files_are_named(tmp_path):
    path = _checkpoint(tmp_path, 1)
    shard = path / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[:100])
    assert manifest_problem(path) == f"__0_0.distcp size 100 != manifest {len(data)}"
    shard.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size, one bit flipped
    assert "__0_0.distcp checksum differs" in manifest_problem(path)
    (path / "rng" / "rank_00000.pt").unlink()
    with pytest.raises(CheckpointError, match="rng/rank_00000.pt is missing"):
        verify_checkpoint(path)


def test_checkpoint_without_manifest_loads_unverified(tmp_path):
    path = _checkpoint(tmp_path, 1, manifest=False)
    (path / "__0_0.distcp").write_bytes(b"")
    verify_checkpoint(path)  # no manifest: nothing to compare, only a note


def test_resume_skips_damaged_newer_checkpoints(tmp_path):
    _checkpoint(tmp_path, 2)
    good = _checkpoint(tmp_path, 4)
    bad = _checkpoint(tmp_path, 6)
    (bad / "__0_0.distcp").write_bytes(b"x")
    (tmp_path / "iter_0000008.tmp").mkdir()  # an interrupted save: never a candidate
    chosen, skipped = choose_resume_checkpoint(tmp_path)
    assert chosen == good
    assert skipped == ["iter_0000006: __0_0.distcp size 1 != manifest 2048"]


def test_resume_refuses_when_no_checkpoint_is_valid(tmp_path):
    bad = _checkpoint(tmp_path, 2)
    (bad / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match="no valid checkpoint.*iter_0000002: __0_0.distcp is missing"):
        choose_resume_checkpoint(tmp_path)
    assert choose_resume_checkpoint(tmp_path / "empty") == (None, [])


@pytest.mark.parametrize(
    "iterations, newest, keep_last, keep_every, protected, expected",
    [
        ([1, 2, 3, 4, 5], 5, 2, 0, set(), [1, 2, 3]),
        ([1, 2, 3, 4, 5], 5, 2, 2, set(), [1, 3]),
        ([1, 2, 3, 4, 5], 5, 2, 0, {1}, [2, 3]),  # the checkpoint resumed from stays
        ([2, 3, 9], 3, 1, 0, set(), [2]),  # 9: left by an abandoned run, replaced later, not counted
        ([1, 2, 3], 3, 0, 0, set(), []),  # keep_last=0: keep everything
        ([10, 20, 30], 30, 1, 0, set(), [10, 20]),
    ],
)
def test_retention_choice(iterations, newest, keep_last, keep_every, protected, expected):
    assert iterations_to_delete(iterations, newest, keep_last, keep_every, protected) == expected
