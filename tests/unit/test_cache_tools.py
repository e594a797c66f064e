"""inspect_cache and build_teacher_cache (rgkd_megatron.cli) as a user runs them (in-process ``main``).

The teacher build itself runs in tests/distributed/test_cache_build.py; here: inspect's numbers against
values computed from the rows the test wrote, its verdict on a corrupted cache, ``--help`` covering
every flag, and the build tool's checks that run before any process group exists.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from cache_synthetic import VOCAB, write_synthetic_cache

ROOT = Path(__file__).resolve().parents[2]


def _tool(name):
    return importlib.import_module(f"rgkd_megatron.cli.{name}")


def test_inspect_reports_size_and_topk_mass_and_rejects_corruption(tmp_path, capsys):
    inspect_cache = _tool("inspect_cache")
    _, offsets, expected = write_synthetic_cache(tmp_path, k=6, dtype="bf16")
    assert inspect_cache.main([str(tmp_path), "--json", "--bins", "5"]) == 0
    out = capsys.readouterr().out
    stats = json.loads(out.strip().splitlines()[-1])
    mass = np.concatenate([np.exp(lp.astype(np.float64)).sum(-1) for lp, *_ in expected.values()])
    counts, _ = np.histogram(np.clip(mass, 0.0, 1.0), bins=5, range=(0.0, 1.0))  # bf16 rounding may exceed 1
    files = [f for f in os.listdir(tmp_path) if f.endswith(".bin") or f == "rows.npy"]
    size = sum(os.path.getsize(tmp_path / f) for f in files)
    assert stats["verified"] and stats["rows"] == offsets[-1] == mass.size
    assert stats["histogram"]["counts"] == counts.tolist()
    assert stats["bytes_per_token"] == pytest.approx(size / offsets[-1])
    assert stats["dense_fp16_bytes_per_token"] == 2 * VOCAB
    assert stats["topk_mass_mean"] == pytest.approx(mass.mean(), rel=1e-5)
    assert "checksums    OK" in out and "bytes/token" in out

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    shard = tmp_path / manifest["shards"][-1]["name"]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # the last block's crc32 itself
    shard.write_bytes(bytes(data))
    assert inspect_cache.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and manifest["shards"][-1]["name"] in err and "sha256" in err
    assert inspect_cache.main([str(tmp_path), "--no-verify"]) == 0  # sizes and headers still fine


@pytest.mark.parametrize("name", ["build_teacher_cache", "inspect_cache"])
def test_every_flag_has_help(name, capsys):
    tool = _tool(name)
    parser = tool.build_parser()
    for action in parser._actions:
        assert action.help and action.help.strip(), (name, action.dest)
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--help"])
    assert exit_info.value.code == 0 and "--" in capsys.readouterr().out


def test_build_tool_checks_inputs_and_dry_run(tmp_path, capsys):
    from rgkd_megatron.data.indexed_dataset import write_indexed_dataset

    build = _tool("build_teacher_cache")
    rng = np.random.default_rng(0)
    write_indexed_dataset(
        str(tmp_path / "ds"),
        [(rng.integers(0, VOCAB, n).tolist(), 1) for n in (5, 30, 12)],
        "tok-x",
        "src",
        VOCAB,
    )
    (tmp_path / "t.yaml").write_text("model:\n  num_layers: 2\n  hidden_size: 64\n  ffn_hidden_size: 96\n"
                                     "  num_attention_heads: 4\n  max_position_embeddings: 16\n")  # fmt: skip
    base = ["--data-prefix", str(tmp_path / "ds"), "--model-config", str(tmp_path / "t.yaml"),
            "--random-init-seed", "1", "--output", str(tmp_path / "cache")]  # fmt: skip
    assert build.main([*base, "--dry-run", "--kd-top-k", "16", "--rows-per-shard", "10"]) == 0
    out = capsys.readouterr().out
    assert "plan: 3 shards, 31 rows" in out  # 4 + 16 (30 tokens truncated to 16 + 1) + 11, one shard each
    assert not (tmp_path / "cache").exists()
    tokenizer = str(ROOT / "examples" / "tokenizer" / "tokenizer.json")
    assert build.main([*base, "--dry-run", "--tokenizer", tokenizer]) == 2
    assert "tokenizer_fingerprint" in capsys.readouterr().err
    assert build.main([*base, "--dry-run", "--kd-top-k", str(VOCAB + 1)]) == 2
    assert "k" in capsys.readouterr().err
    assert build.main([*base, "--dry-run", "--tp", "3"]) == 2  # 4 heads are not divisible by TP=3
    assert "tensor_model_parallel_size" in capsys.readouterr().err
