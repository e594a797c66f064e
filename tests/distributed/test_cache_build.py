"""Building the teacher top-k cache on megatron-core: layouts, an independent dense reference, kill + resume.

One 2-process gloo spawn saves random teacher weights once (TP=1) and builds, from that checkpoint,
the same cache at TP=1 x DP=2, TP=2 and PP=2 (1F1B), plus a k = V cache at TP=2 (bf16 storage).
Rank 0 also runs an independent plain-PyTorch Llama (``benchmarks/plain_llama.py``) with the same
weights over every sample and returns its dense fp64 log-softmax over the real vocabulary.

Then the CLI (``tools/build_teacher_cache.py``, TP=1 x DP=1, one process) builds the cache again
from the same checkpoint with a fault injected: it SIGKILLs itself half-way through writing its third
shard. The rerun resumes, and every file of the result must be byte-identical to the uninterrupted
DP=2 build (so the shards depend neither on the DP size nor on the interruption).

Reference comparisons are tie-robust: for each row the cached log-probs must equal the dense top-k
values, and the dense log-probs of the cached ids must equal the cached log-probs (two ids whose
logits are equal to float precision may legitimately swap between layouts).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_utils import run_distributed

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

VOCAB = 250  # real (tokenizer) vocabulary; the teacher's output layer is padded to 256
SEQ = 32
K = 8
MODEL_YAML = """\
model:
  num_layers: 2
  hidden_size: 64
  ffn_hidden_size: 96
  num_attention_heads: 4
  num_query_groups: 2
  max_position_embeddings: 32
  make_vocab_size_divisible_by: 64
  init_method_std: 0.1
  spec: local
  params_dtype: fp32
"""
COMMON = dict(k=K, dtype="fp32", seq_length=SEQ, micro_batch_size=3, num_microbatches=1, pad_multiple=8,
              rows_per_shard=100, block_rows=16, progress=False)  # fmt: skip


def _make_dataset(prefix: str) -> None:
    from rgkd_megatron.data.indexed_dataset import write_indexed_dataset

    rng = np.random.default_rng(0)
    lengths = [1, 2, 33, 40, 5] + rng.integers(1, 41, 15).tolist()  # 0-row, 1-row and truncated samples
    samples = [(rng.integers(0, VOCAB, n).tolist(), min(2, n)) for n in lengths]
    write_indexed_dataset(prefix, samples, "test-tokenizer", "test-source", VOCAB)


def _teacher_cfg(tmp: str):
    from rgkd_megatron.config import load_config

    return load_config(os.path.join(tmp, "teacher.yaml"), validate=False).model


def _build(tmp, name, tp, pp, ckpt, **overrides):
    import torch.distributed as dist

    from rgkd_megatron.cache.builder import BuildOptions, build_identity, build_teacher_cache
    from rgkd_megatron.checkpoint.dist_ckpt import load_model_weights
    from rgkd_megatron.config.schema import ParallelConfig
    from rgkd_megatron.data.indexed_dataset import IndexedDataset
    from rgkd_megatron.models.builders import build_teacher
    from rgkd_megatron.parallel.groups import layout_for_world
    from rgkd_megatron.training.setup import init_role, teardown_roles

    model_cfg = _teacher_cfg(tmp)
    groups = init_role(layout_for_world(tp, pp, dist.get_world_size()), seed=3)
    model = build_teacher(
        model_cfg,
        ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
        groups,
        VOCAB,
    )
    load_model_weights(ckpt, model)
    dataset = IndexedDataset(os.path.join(tmp, "ds"))
    options = BuildOptions(**{**COMMON, **overrides})
    teacher = {"fingerprint": "test-teacher", "source": "checkpoint", "checkpoint": ckpt}
    identity, offsets = build_identity(options, teacher, dataset, VOCAB, groups.layout, "cpu")
    build_teacher_cache(model, groups, dataset, os.path.join(tmp, name), options, identity, offsets)
    teardown_roles()
    return model


def _spawned(rank, world_size, tmp):
    from plain_llama import PlainConfig, PlainLlama, load_from_mcore

    from rgkd_megatron.checkpoint.dist_ckpt import save_model_weights
    from rgkd_megatron.config.schema import ParallelConfig
    from rgkd_megatron.data.indexed_dataset import IndexedDataset
    from rgkd_megatron.models.builders import build_teacher
    from rgkd_megatron.parallel.groups import layout_for_world
    from rgkd_megatron.training.setup import init_role, teardown_roles

    ckpt = os.path.join(tmp, "teacher_ckpt")
    groups = init_role(layout_for_world(1, 1, world_size), seed=3)
    save_model_weights(ckpt, build_teacher(_teacher_cfg(tmp), ParallelConfig(), groups, VOCAB))
    teardown_roles()

    model = _build(tmp, "dp2", 1, 1, ckpt)  # TP=1 x DP=2
    _build(tmp, "tp2", 2, 1, ckpt)
    _build(tmp, "pp2", 1, 2, ckpt, num_microbatches=3)
    _build(tmp, "tp2_full_bf16", 2, 1, ckpt, k=VOCAB, dtype="bf16", rows_per_shard=1000)
    if rank != 0:
        return None
    model_cfg = _teacher_cfg(tmp)
    plain = PlainLlama(
        PlainConfig.from_model_config(model_cfg, model.embedding.word_embeddings.weight.shape[0])
    )
    load_from_mcore(plain, model.state_dict())
    plain.double()
    dataset = IndexedDataset(os.path.join(tmp, "ds"))
    dense = {}
    with torch.no_grad():
        for i in range(len(dataset)):
            tokens = torch.from_numpy(dataset[i][0].astype(np.int64))
            n = min(len(tokens), SEQ + 1) - 1  # inputs: the first n tokens; row t predicts token t + 1
            if n > 0:
                logits = plain(tokens[None, :n])[0, :, :VOCAB]  # the real vocabulary: padding excluded
                dense[i] = (torch.log_softmax(logits, dim=-1), torch.logsumexp(logits, dim=-1))
    return dense


def _check_against_dense(reader, dense, tol, what):
    """Tie-robust comparison of every cached row with the dense reference; returns rows checked."""
    rows = 0
    for i, (ref_tv, ref_lse) in dense.items():
        got = reader.get(i)
        assert got.logprobs.shape == (ref_tv.shape[0], reader.k), (what, i)
        lp = got.logprobs.double()
        top_vals = ref_tv.topk(reader.k, dim=-1).values
        assert torch.allclose(lp, top_vals, atol=tol, rtol=0), (what, i, (lp - top_vals).abs().max())
        assert torch.allclose(ref_tv.gather(1, got.ids.long()), lp, atol=tol, rtol=0), (what, i, "ids")
        assert torch.all(got.ids[:, :-1] != got.ids[:, 1:]), (what, i, "repeated ids")
        tail = 1.0 - top_vals.exp().sum(-1)
        assert torch.allclose(got.tail.double(), tail, atol=max(tol, 1e-6), rtol=0), (what, i, "tail")
        assert torch.allclose(got.lse.double(), ref_lse, atol=tol, rtol=0), (what, i, "lse")
        rows += ref_tv.shape[0]
    return rows


def _cli(tmp, out, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("RANK", None)
    cmd = [
        sys.executable, str(ROOT / "tools" / "build_teacher_cache.py"),
        "--data-prefix", os.path.join(tmp, "ds"), "--model-config", os.path.join(tmp, "teacher.yaml"),
        "--teacher", os.path.join(tmp, "teacher_ckpt"), "--output", out, "--kd-top-k", str(K), "--dtype", "fp32",
        "--seq-length", str(SEQ), "--micro-batch-size", "3", "--num-microbatches", "1", "--pad-multiple", "8",
        "--rows-per-shard", "100", "--block-rows", "16", "--no-progress", "--log-level", "WARNING",
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())}


def test_cache_build_layouts_reference_and_resume(tmp_path):
    from rgkd_megatron.cache import TeacherCacheReader
    from rgkd_megatron.cache.writer import FAULT_ENV

    tmp = str(tmp_path)
    (tmp_path / "teacher.yaml").write_text(MODEL_YAML)
    _make_dataset(os.path.join(tmp, "ds"))
    dense = run_distributed(_spawned, 2, args=(tmp,), timeout=400)[0]

    # every layout against the independent dense reference
    expected_rows = sum(t.shape[0] for t, _ in dense.values())
    for name in ("dp2", "tp2", "pp2"):
        reader = TeacherCacheReader(
            tmp_path / name, verify="full", tokenizer_fingerprint="test-tokenizer", vocab_size=VOCAB
        )
        assert len(reader.manifest["shards"]) >= 4, "too few shards to exercise the DP split"
        assert _check_against_dense(reader, dense, 2e-5, name) == expected_rows == reader.num_rows
    full = TeacherCacheReader(tmp_path / "tp2_full_bf16", verify="full")
    assert full.dtype == torch.bfloat16 and full.k == VOCAB
    for i, (ref_tv, _) in dense.items():  # k = V: the whole distribution, sorted; the tail is exactly zero
        got = full.get(i)
        assert torch.equal(got.tail, torch.zeros_like(got.tail)), i
        assert torch.equal(got.ids.long().sort(-1).values, torch.arange(VOCAB).expand(ref_tv.shape[0], VOCAB))
        lp = got.logprobs.double()
        assert torch.allclose(lp, ref_tv.gather(1, got.ids.long()), atol=0.04, rtol=0.01), i
        assert torch.all(lp[:, :-1] >= lp[:, 1:]), i

    # kill half-way through the third shard, then resume: byte-identical to the DP=2 build
    resumed = str(tmp_path / "cli")
    killed = _cli(tmp, resumed, {FAULT_ENV: "2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    names = sorted(os.listdir(resumed))
    assert [n for n in names if n.endswith(".bin")] == ["shard_000000.bin", "shard_000001.bin"], names
    assert any(".tmp." in n for n in names) and "manifest.json" not in names, names
    with pytest.raises(FileNotFoundError, match="interrupted"):
        TeacherCacheReader(resumed)
    done = _cli(tmp, resumed)
    assert done.returncode == 0, done.stderr[-3000:]
    got, want = _files(resumed), _files(tmp_path / "dp2")
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for name in want:
        if name != "manifest.json":
            assert got[name] == want[name], name
    m_got, m_want = json.loads(got["manifest.json"]), json.loads(want["manifest.json"])
    assert m_got["shards"] == m_want["shards"] and m_got["row_index"] == m_want["row_index"]
