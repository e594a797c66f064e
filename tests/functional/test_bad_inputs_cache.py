"""Bad inputs and faults against the teacher cache, as a user meets them.

- an edited manifest ``k``: refused as a k mismatch naming the manifest (reader and inspect_cache.py);
- a cache build resumed with another ``--k``: refused naming build.json, the value there and the
  requested one, before the teacher is loaded (the loader is replaced by one that fails the test);
- a full disk: refused before a shard is started (free space checked with ``shutil.disk_usage``)
  and an ENOSPC in the middle of a write, both naming the shard, the bytes needed and the bytes free,
  with nothing half-written (no shard, temp file or sidecar; the shard stays pending).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from cache_synthetic import make_identity, make_rows, write_synthetic_cache  # noqa: E402

from rgkd_megatron.cache import TeacherCacheReader  # noqa: E402
from rgkd_megatron.cache.manifest import shard_name  # noqa: E402
from rgkd_megatron.cache.writer import CacheWriter  # noqa: E402

VOCAB, SEQ, K = 250, 32, 4
TEACHER_YAML = """\
model:
  num_layers: 1
  hidden_size: 32
  ffn_hidden_size: 48
  num_attention_heads: 2
  max_position_embeddings: 32
  make_vocab_size_divisible_by: 64
  spec: local
  params_dtype: fp32
"""


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


def test_edited_manifest_k_is_reported_as_k(tmp_path):
    write_synthetic_cache(tmp_path, k=4)
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["k"] = 5
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError) as info:
        TeacherCacheReader(tmp_path)
    msg = str(info.value)
    assert str(path) in msg and "field 'k' is 5" in msg and "k = 4" in msg and "size" not in msg
    out = _run([str(REPO / "tools" / "inspect_cache.py"), str(tmp_path)])
    assert out.returncode == 1 and "field 'k' is 5" in out.stderr and str(path) in out.stderr
    assert "Traceback" not in out.stderr


def test_resume_with_another_k_is_refused_before_the_teacher_loads(tmp_path, monkeypatch, capsys):
    from rgkd_megatron.data.indexed_dataset import write_indexed_dataset

    rng = np.random.default_rng(0)
    write_indexed_dataset(str(tmp_path / "ds"), [(rng.integers(0, VOCAB, 20).tolist(), 2) for _ in range(6)],
                          "test-tokenizer", "test-source", VOCAB)  # fmt: skip
    (tmp_path / "teacher.yaml").write_text(TEACHER_YAML)
    out = tmp_path / "cache"
    common = ["--data-prefix", str(tmp_path / "ds"), "--model-config", str(tmp_path / "teacher.yaml"),
              "--random-init-seed", "1", "--output", str(out), "--seq-length", str(SEQ), "--rows-per-shard", "40",
              "--no-progress", "--log-level", "WARNING"]  # fmt: skip
    first = _run(
        [str(REPO / "tools" / "build_teacher_cache.py"), *common, "--kd-top-k", str(K), "--max-shards", "1"]
    )
    assert first.returncode == 0, first.stderr
    assert (out / "build.json").exists() and not (out / "manifest.json").exists()  # a build in progress
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    import rgkd_megatron.models.builders as builders
    from rgkd_megatron.cli import build_teacher_cache

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was built before the k mismatch was found")

    monkeypatch.setattr(builders, "build_teacher", no_teacher)
    code = build_teacher_cache.main([*common, "--kd-top-k", str(K + 1)])
    err = capsys.readouterr().err
    assert code == 2
    assert str(out / "build.json") in err and "field 'k' = 4" in err and "this build has 5" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched


@pytest.fixture
def writer(tmp_path):
    identity, offsets = make_identity()
    w = CacheWriter(str(tmp_path), identity, offsets)
    w.prepare()
    arrays, _ = make_rows(w.plan[0]["num_rows"], identity["k"], identity["dtype"], np.random.default_rng(1))
    return w, arrays


def _assert_nothing_half_written(directory: Path, w: CacheWriter) -> None:
    names = os.listdir(directory)
    assert shard_name(0) not in names and shard_name(0)[:-4] + ".json" not in names
    assert not any(".tmp." in n for n in names) and 0 in w.pending()


def test_full_disk_is_refused_before_the_shard_starts(tmp_path, writer, monkeypatch):
    w, arrays = writer
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10))
    with pytest.raises(OSError) as info:
        w.commit(0, arrays)
    needed = w.expected_size(0)
    msg = str(info.value)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / shard_name(0))
    assert f"needs {needed} bytes" in msg and "10 bytes free" in msg and shard_name(0) in msg
    _assert_nothing_half_written(tmp_path, w)


def test_enospc_during_the_write_names_the_shard(tmp_path, writer, monkeypatch):
    import rgkd_megatron.cache.format as fmt

    w, arrays = writer
    real_open = open

    class FillsUp:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += memoryview(data).nbytes
            if self.written > 256:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def opener(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FillsUp(f) if "w" in mode and ".tmp." in os.fspath(path) else f

    monkeypatch.setattr(fmt, "open", opener, raising=False)
    with pytest.raises(OSError) as info:
        w.commit(0, arrays)
    msg = str(info.value)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / shard_name(0))
    assert f"needs {w.expected_size(0)} bytes" in msg and "bytes free" in msg
    _assert_nothing_half_written(tmp_path, w)
    monkeypatch.setattr(fmt, "open", real_open, raising=False)
    w.commit(0, arrays)  # with space again, the same shard commits
    assert 0 not in w.pending()
