"""Which checkpoint a restart picks: only complete ones (marker written last, after the rename)."""

from __future__ import annotations

import pytest

from rgkd_megatron.checkpoint.dist_ckpt import MARKER, find_latest_checkpoint, iteration_dir


def _complete(root, iteration):
    path = iteration_dir(root, iteration)
    path.mkdir(parents=True)
    (path / MARKER).write_text("{}")
    return path


def test_latest_file_wins_when_complete(tmp_path):
    _complete(tmp_path, 2)
    newest = _complete(tmp_path, 4)
    (tmp_path / "latest").write_text(newest.name)
    assert find_latest_checkpoint(tmp_path) == newest


def test_interrupted_saves_are_never_picked(tmp_path):
    good = _complete(tmp_path, 2)
    partial = tmp_path / "iter_0000004.tmp"  # a save killed before its rename
    partial.mkdir()
    (partial / MARKER).write_text("{}")
    markerless = iteration_dir(tmp_path, 6)  # a directory that never got its completion marker
    markerless.mkdir()
    (markerless / "common.pt").write_bytes(b"junk")
    (tmp_path / "latest").write_text(markerless.name)  # a stale or corrupted pointer
    assert find_latest_checkpoint(tmp_path) == good


def test_no_checkpoint(tmp_path):
    assert find_latest_checkpoint(tmp_path / "missing") is None
    assert find_latest_checkpoint(tmp_path) is None


def test_loading_an_incomplete_checkpoint_names_the_marker(tmp_path):
    from rgkd_megatron.checkpoint.dist_ckpt import load_checkpoint

    path = iteration_dir(tmp_path, 3)
    path.mkdir()
    with pytest.raises(FileNotFoundError, match=MARKER):
        load_checkpoint(path, engine=None)
