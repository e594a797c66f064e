"""The trainer's cache path: ``gather_compact`` stages a [b, s] batch's stored bytes, ``decode`` (CPU
decode, or the torch decode after a move) gives ``gather``'s values, and both equal a dense numpy
decode of the raw sections (``test_cache_v2._dense_decode``), padding positions zero; the runs of a
batch against a loop over positions; ``CachedTeacher.buckets`` on a real written cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_cache_buffers import FIELDS, _assert_batch, _bits, _reference
from test_cache_v2 import SEQ, _v1_cache, _write

from rgkd_megatron.cache import TeacherCacheReader
from rgkd_megatron.cache.gather import batch_runs, locate_runs
from rgkd_megatron.pbkd.teacher_source import CachedTeacher

# runs that break on a new sample, on a position jump, on padding in the middle, at row starts
SID = np.array(
    [[0, 0, 1, 1, 1, -1, 4, 4], [5, 5, 5, 5, 3, 3, 3, -1], [-1] * 8, [4] * 8, [3, -1, 3, 3, 0, 0, -1, -1]]
)
POS = np.array(
    [[3, 4, 0, 1, 2, 0, 10, 11], [0, 1, 2, 3, 7, 8, 9, 0], [0] * 8, list(range(8)), [0, 0, 1, 2, 5, 7, 0, 0]]
)


def _runs_by_loop(sid: np.ndarray, pos: np.ndarray) -> list[tuple[int, int]]:
    """Reference runs: walk the flat positions one by one."""
    runs, b, s = [], *sid.shape
    for r in range(b):
        for j in range(s):
            f = r * s + j
            if sid[r, j] < 0:
                continue
            if (
                j > 0
                and runs
                and runs[-1][1] == f
                and sid[r, j] == sid[r, j - 1]
                and pos[r, j] == pos[r, j - 1] + 1
            ):
                runs[-1] = (runs[-1][0], f + 1)
            else:
                runs.append((f, f + 1))
    return runs


def test_batch_runs_match_a_loop_over_positions():
    rng = np.random.default_rng(0)
    cases = [(SID, POS), (np.zeros((0, 4), np.int64), np.zeros((0, 4), np.int64))]
    for _ in range(50):
        sid = rng.integers(-1, 3, (3, 7))
        pos = np.cumsum(rng.integers(0, 3, (3, 7)), axis=1)
        cases.append((sid, pos))
    for sid, pos in cases:
        lo, hi = batch_runs(sid, pos)
        assert list(zip(lo.tolist(), hi.tolist())) == _runs_by_loop(sid, pos)


@pytest.mark.parametrize(("vocab", "dtype"), [(32_000, "q8"), (151_936, "q8"), (151_936, "fp16")])
def test_gather_compact_decodes_to_gather_and_the_dense_reference(tmp_path, vocab, dtype):
    _, offsets, _ = _write(tmp_path, vocab, dtype)
    reader = TeacherCacheReader(tmp_path, vocab_size=vocab)
    ref = _reference(reader, offsets) if dtype == "q8" else None
    row_bytes = sum(a.itemsize * int(np.prod(a.shape[1:])) for a in reader.shard_sections(0).values())
    for sid, pos in [(SID, POS), (SID[3:4], POS[3:4])]:
        compact = reader.gather_compact(torch.from_numpy(sid), torch.from_numpy(pos))
        assert compact.nbytes == sid.size * row_bytes  # the stored bytes, padding positions included
        plain = reader.gather(sid, pos)
        for got in (compact.decode(), compact.to("cpu").decode(), compact.decode(torch_ops=True)):
            assert got["valid"].dtype == torch.bool and np.array_equal(got["valid"].numpy(), sid >= 0)
            for name in FIELDS:
                assert got[name].dtype == plain[name].dtype and got[name].shape == plain[name].shape
                assert np.array_equal(_bits(got[name].numpy()), _bits(plain[name].numpy())), name
            if ref is not None:
                _assert_batch(got, sid, pos, ref)


def test_gather_compact_of_a_version_1_cache(tmp_path):
    v1 = _v1_cache(tmp_path, 151_936, 5, np.random.default_rng(3))
    reader = TeacherCacheReader(tmp_path)
    sid, pos = np.array([[3, 3, -1], [4, 4, 4]]), np.array([[0, 1, 0], [2, 3, 4]])
    for got in (
        reader.gather_compact(sid, pos).decode(),
        reader.gather_compact(sid, pos).decode(torch_ops=True),
    ):
        for name, col in zip(FIELDS, v1["cols"]):
            for b in range(2):
                for j in range(3):
                    want = (
                        col[v1["offsets"][sid[b, j]] + pos[b, j]] if sid[b, j] >= 0 else np.zeros_like(col[0])
                    )
                    assert np.array_equal(_bits(got[name][b, j].numpy()), _bits(want)), (name, b, j)


def test_gather_compact_refuses_rows_beyond_a_sample(tmp_path):
    _write(tmp_path, 32_000, "q8")
    reader = TeacherCacheReader(tmp_path, vocab_size=32_000)
    n = reader.num_rows_of(2)
    with pytest.raises(IndexError, match="sample 2"):
        reader.gather_compact(np.array([[2, 2]]), np.array([[n - 1, n]]))


def test_locate_runs_matches_the_per_run_lookup_and_refuses_out_of_range(tmp_path):
    """locate_runs (vectorised over a batch's runs) against the reader's per-sample lookup (shard by
    bisection, row from the row index) on random valid batches over several shards; None for a run
    that starts before row 0 or ends past its sample, or names a sample the cache lacks, and gather
    then raises for exactly that sample."""
    _write(tmp_path, 32_000, "q8")
    reader = TeacherCacheReader(tmp_path, vocab_size=32_000)
    assert reader.num_shards > 1
    rng = np.random.default_rng(0)
    rows_of = [reader.num_rows_of(i) for i in range(reader.num_samples)]
    for _ in range(30):
        sid = rng.integers(-1, reader.num_samples, (3, 6))
        pos = np.zeros_like(sid)
        for (r, j), i in np.ndenumerate(sid):
            if i >= 0 and rows_of[i] == 0:  # a one-token sample has no rows
                sid[r, j] = -1
            pos[r, j] = rng.integers(0, rows_of[i]) if sid[r, j] >= 0 else 0
        starts, ends = batch_runs(sid, pos)
        shards, los, counts = locate_runs(sid, pos, starts, ends, reader.row_offsets, *reader._shard_firsts)
        for a, z, shard, lo, n in zip(starts.tolist(), ends.tolist(), shards, los, counts):
            i, first = int(sid.reshape(-1)[a]), int(pos.reshape(-1)[a])
            want_shard, want_lo, want_hi = reader._shard_rows(i, first, first + z - a)
            assert (reader._shards[shard], lo, lo + n) == (want_shard, want_lo, want_hi)
    last = reader.num_samples - 1
    for sid, pos, named in [
        ([[1, 1]], [[-1, 0]], "sample 1"),
        ([[2, 2]], [[rows_of[2] - 1, rows_of[2]]], "sample 2"),
        ([[last + 1, 0]], [[0, 0]], f"sample id {last + 1}"),
    ]:
        sid, pos = np.array(sid), np.array(pos)
        starts, ends = batch_runs(sid, pos)
        assert locate_runs(sid, pos, starts, ends, reader.row_offsets, *reader._shard_firsts) is None
        with pytest.raises(IndexError, match=named):
            reader.gather(sid, pos)


def test_cached_teacher_buckets_equal_gather_on_a_written_cache(tmp_path):
    """buckets (the compact payload decoded where the loss runs, here the CPU) against the dense
    reference: ids / log-probs / tail of each prompt's rows, zeros after each row's cached tokens."""
    _, offsets, _ = _write(tmp_path, 151_936, "q8")
    reader = TeacherCacheReader(tmp_path, vocab_size=151_936)
    ref = _reference(reader, offsets)
    lengths = [reader.num_rows_of(i) + 1 for i in range(reader.num_samples)]
    rng = np.random.default_rng(5)
    dataset = {i: rng.integers(0, 1000, n) for i, n in enumerate(lengths)}
    teacher = CachedTeacher.__new__(CachedTeacher)  # a cache and a dataset without a tokenizer run
    teacher.reader, teacher.k = reader, reader.k
    teacher.dataset = _Dataset(dataset)
    prompts, s = [4, 0, 2, 1], SEQ
    tokens = torch.zeros((len(prompts), s), dtype=torch.long)
    for row, p in enumerate(prompts):
        n = min(lengths[p], s)
        tokens[row, :n] = torch.from_numpy(dataset[p][:n])
    ids, lp, tail = teacher.buckets(prompts, {"tokens": tokens}, device="cpu")
    assert ids.dtype == torch.int64 and lp.dtype == torch.float32 and tail.dtype == torch.float32
    for row, p in enumerate(prompts):
        n = min(lengths[p], s) - 1
        for j in range(s):
            got = [ids[row, j].numpy(), lp[row, j].numpy(), tail[row, j].numpy()]
            if j < n:
                want_lp, want_ids, _, want_tail = ref(p, j)
                want = [want_ids.astype(np.int64), want_lp, want_tail]
            else:
                want = [np.zeros(reader.k, np.int64), np.zeros(reader.k, np.float32), np.float32(0)]
            assert all(np.array_equal(_bits(g), _bits(w)) for g, w in zip(got, want)), (row, j)
    with pytest.raises(ValueError, match="differs from the tokenized prompt set"):
        teacher.buckets([0, 0, 2, 1], {"tokens": tokens}, device="cpu")


class _Dataset:
    prefix = "synthetic"

    def __init__(self, rows: dict[int, np.ndarray]):
        self.rows = rows

    def __getitem__(self, i: int):
        return self.rows[i], None


def test_a_batch_of_more_than_a_thousand_rows_matches_the_dense_reference(tmp_path):
    """A batch past ``codec._TORCH_WIDEN_ROWS`` (q8's fp16 sections widened by one torch conversion
    instead of numpy's casting copies): gather, gather_compact and get against the dense reference."""
    from rgkd_megatron.cache.codec import _TORCH_WIDEN_ROWS

    _, offsets, _ = _write(tmp_path, 151_936, "q8")
    reader = TeacherCacheReader(tmp_path, vocab_size=151_936)
    ref = _reference(reader, offsets)
    rng = np.random.default_rng(7)
    samples = [s for s in range(reader.num_samples) if reader.num_rows_of(s) > 0]
    rows = -(-_TORCH_WIDEN_ROWS // SEQ) + 3
    sid = np.full((rows, SEQ), -1)
    pos = np.zeros((rows, SEQ), dtype=np.int64)
    for r in range(rows):
        s = int(rng.choice(samples))
        n = int(rng.integers(1, reader.num_rows_of(s) + 1))  # a prefix of the sample, then padding
        sid[r, :n], pos[r, :n] = s, np.arange(n)
    assert sid.size >= _TORCH_WIDEN_ROWS and (sid < 0).any()
    for got in (reader.gather(sid, pos), reader.gather_compact(sid, pos).decode()):
        _assert_batch(got, sid, pos, ref)
