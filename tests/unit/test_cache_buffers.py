"""Reader output buffers: ``get(out=)``, ``gather(out=)``, the prefetch ring, and their validation.

References are independent of the reader: ``_dense_decode`` (test_cache_v2.py) decodes the raw
sections of each shard from the format docstring (m - code * s in fp32, ids bit by bit), and the
version-1 cache is assembled byte by byte from its documented layout.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from test_cache_v2 import LENGTHS, SEQ, _dense_decode, _v1_cache, _write

from rgkd_megatron.cache import TeacherCacheReader, TopKRows

FIELDS = ("logprobs", "ids", "lse", "tail")


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(f"u{a.itemsize}")


def _reference(reader: TeacherCacheReader, offsets) -> callable:
    """(sample, position) -> the dense reference decode of that row (list of 4 arrays)."""
    bits = (reader.vocab_size - 1).bit_length()
    dense = [_dense_decode(reader.shard_sections(i), bits) for i in range(reader.num_shards)]
    firsts = [e["first_row"] for e in reader.manifest["shards"]]

    def ref(sample: int, pos: int) -> list[np.ndarray]:
        row = int(offsets[sample]) + pos
        shard = int(np.searchsorted(firsts, row, side="right")) - 1
        return [col[row - firsts[shard]] for col in dense[shard]]

    return ref


def _assert_batch(batch: dict, sid: np.ndarray, pos: np.ndarray, ref) -> None:
    assert np.array_equal(batch["valid"].numpy(), sid >= 0)
    for b in range(sid.shape[0]):
        for j in range(sid.shape[1]):
            got = [batch[name][b, j].numpy() for name in FIELDS]
            if sid[b, j] < 0:
                assert all(not g.any() for g in got), (b, j)
            else:
                want = ref(sid[b, j], pos[b, j])
                assert all(np.array_equal(_bits(g), _bits(w)) for g, w in zip(got, want)), (b, j)


@pytest.mark.parametrize("vocab", [32_000, 151_936])
def test_get_into_a_reused_buffer_matches_the_dense_reference(tmp_path, vocab):
    _, offsets, _ = _write(tmp_path, vocab, "q8")
    reader = TeacherCacheReader(tmp_path, vocab_size=vocab)
    ref = _reference(reader, offsets)
    buf = reader.empty_rows(SEQ)
    ptrs = [t.data_ptr() for t in buf]
    for sample in [2, 0, 4, 1, 4, 3, 5, 0]:  # one buffer for every sample, longest first and last
        n = reader.num_rows_of(sample)
        got = reader.get(sample, out=buf)
        assert all(len(t) == n for t in got) and (n == 0 or [t.data_ptr() for t in got] == ptrs)
        want = [
            np.array([ref(sample, p)[c] for p in range(n)]).reshape(n, *buf[c].shape[1:]) for c in range(4)
        ]
        for g, w in zip(got, want):
            assert np.array_equal(_bits(g.numpy()), _bits(w.astype(g.numpy().dtype)))
        mixed = buf._replace(lse=torch.empty(SEQ + 5))  # fields of different lengths: views of n rows each
        assert all(len(t) == n for t in reader.get(sample, out=mixed))
        part = reader.get(sample, 1, n, out=buf) if n > 1 else None  # a row range, into the same buffer
        if part is not None:
            assert np.array_equal(_bits(part.logprobs.numpy()), _bits(want[0][1:]))
            assert np.array_equal(part.ids.numpy(), want[1][1:])


def test_gather_into_reused_buffers_matches_the_dense_reference(tmp_path):
    _, offsets, _ = _write(tmp_path, 151_936, "q8")
    reader = TeacherCacheReader(tmp_path, vocab_size=151_936)
    ref = _reference(reader, offsets)
    out = reader.empty_batch(3, 8)
    for t in out.values():  # garbage in the buffers must not leak into padding positions
        t.view(torch.uint8).fill_(0xA5)
    sid1 = np.array([[0, 0, 1, 1, 1, -1, 4, 4], [5, 5, 5, 5, 3, 3, 3, -1], [-1] * 8])
    pos1 = np.array([[3, 4, 0, 1, 2, 0, 10, 11], [0, 1, 2, 3, 7, 8, 9, 0], [0] * 8])
    sid2 = np.array([[4] * 8, [1] * 8, [3, 3, 3, 3, 5, 5, 5, 5]])
    pos2 = np.array([list(range(8)), list(range(1, 9)), [0, 1, 2, 3, 4, 5, 6, 7]])
    for sid, pos in [(sid1, pos1), (sid2, pos2), (sid1, pos1)]:
        got = reader.gather(torch.from_numpy(sid), torch.from_numpy(pos), out=out)
        assert all(got[name] is out[name] for name in out)
        _assert_batch(got, sid, pos, ref)


def test_out_buffers_of_the_wrong_shape_or_dtype_are_refused(tmp_path):
    _write(tmp_path, 32_000, "q8")
    reader = TeacherCacheReader(tmp_path, vocab_size=32_000)
    n = reader.num_rows_of(4)
    good = reader.empty_rows(n)
    cases = [
        (good._replace(ids=torch.empty(n, reader.k, dtype=torch.int64)), "'ids'", "torch.int32"),
        (good._replace(logprobs=torch.empty(n, reader.k - 1)), "'logprobs'", f"[>= {n}, {reader.k}]"),
        (reader.empty_rows(n - 1), "'logprobs'", f"[>= {n}, {reader.k}]"),
        (good._replace(tail=torch.empty(2 * n)[::2]), "'tail'", "contiguous"),
        (good._replace(lse=torch.empty(n, dtype=torch.float16)), "'lse'", "torch.float32"),
    ]
    for out, field, expected in cases:
        with pytest.raises(ValueError, match=field) as err:
            reader.get(4, out=out)
        assert expected in str(err.value)
    with pytest.raises(ValueError, match="TopKRows"):
        reader.get(4, out=tuple(good))
    sid, pos = np.full((2, 4), 4), np.tile(np.arange(4), (2, 1))
    batch = reader.empty_batch(2, 4)
    bad = [
        ({**batch, "valid": torch.empty(2, 4, dtype=torch.uint8)}, "'valid'", "torch.bool"),
        ({**batch, "lse": torch.empty(2, 5)}, "'lse'", "[2, 4]"),
        ({k: v for k, v in batch.items() if k != "tail"}, "'tail'", "no field"),
        (reader.empty_batch(2, 5), "'logprobs'", "[2, 4, 64]"),
    ]
    for out, field, expected in bad:
        with pytest.raises(ValueError, match=field) as err:
            reader.gather(sid, pos, out=out)
        assert expected in str(err.value)
    assert len(reader.get(4, out=good).ids) == n  # still usable after the errors
    # a buffer accepted once is checked again when it no longer fits: fewer rows than asked for ...
    short = reader.empty_rows(n - 1)
    assert len(reader.get(4, 0, n - 1, out=short).ids) == n - 1
    with pytest.raises(ValueError, match="'logprobs'"):
        reader.get(4, out=short)
    # ... or one of its tensors changed in place after it was accepted (same storage, another dtype)
    assert len(reader.get(4, out=good).ids) == n
    good.lse.data = good.lse.data.view(torch.int32)
    with pytest.raises(ValueError, match="'lse'"):
        reader.get(4, out=good)


def _wait_for_producer(it) -> None:
    """Until the prefetch thread cannot run further ahead (its queue is full) or has finished."""
    while not it._queue.full() and it._thread.is_alive():
        time.sleep(0.001)


@pytest.mark.parametrize("keep", [1, 2])
def test_prefetch_ring_keeps_a_batch_intact_for_its_documented_window(tmp_path, keep):
    _, offsets, _ = _write(tmp_path, 32_000, "q8")
    reader = TeacherCacheReader(tmp_path, vocab_size=32_000)
    ref = _reference(reader, offsets)
    rng = np.random.default_rng(7)
    batches = []
    for n in range(12):
        sid = np.repeat(rng.integers(0, len(LENGTHS), (2, 1)), 4, axis=1)
        pos = np.zeros((2, 4), np.int64)
        for b in range(2):
            rows = reader.num_rows_of(int(sid[b, 0]))
            if rows < 4:
                sid[b] = -1
            else:
                pos[b] = np.arange(4) + rng.integers(0, rows - 3)
        batches.append({"n": n, "sample_ids": sid, "position_ids": pos})
    depth = 2
    it = reader.prefetch(batches, depth=depth, reuse_buffers=True, keep=keep)
    ring = depth + 1 + keep
    assert it.ring_size == ring
    held, ptrs = [], {}
    for batch, teacher in it:
        held.append((batch, teacher))
        ptrs[batch["n"]] = teacher["logprobs"].data_ptr()
        _wait_for_producer(it)  # the thread has written every batch it may write by now
        for b, t in held[-keep:]:  # the batches still inside their window: intact
            _assert_batch(t, b["sample_ids"], b["position_ids"], ref)
    assert [b["n"] for b, _ in held] == list(range(12))
    assert all(ptrs[n] == ptrs[n % ring] for n in ptrs)  # the ring is reused, slot n mod R
    assert len(set(ptrs.values())) == ring


def test_prefetch_without_reuse_gives_new_buffers(tmp_path):
    _, offsets, _ = _write(tmp_path, 32_000, "q8")
    reader = TeacherCacheReader(tmp_path, vocab_size=32_000)
    ref = _reference(reader, offsets)
    sid, pos = np.full((1, 3), 1), np.arange(3)[None]
    batches = [{"sample_ids": sid, "position_ids": pos + i} for i in range(6)]
    seen = list(reader.prefetch(batches, depth=2))
    assert len({t["ids"].data_ptr() for _, t in seen}) == 6
    for b, t in seen:  # all still intact at the end
        _assert_batch(t, b["sample_ids"], b["position_ids"], ref)
    with pytest.raises(ValueError, match="keep"):
        reader.prefetch(batches, reuse_buffers=True, keep=0)


def test_version_1_cache_reads_into_buffers(tmp_path):
    v1 = _v1_cache(tmp_path, 151_936, 5, np.random.default_rng(3))
    reader = TeacherCacheReader(tmp_path, verify="full")
    buf = reader.empty_rows(SEQ)
    assert buf.logprobs.dtype == torch.float16 and isinstance(buf, TopKRows)
    for s in range(len(LENGTHS)):
        lo, hi = v1["offsets"][s], v1["offsets"][s + 1]
        got = reader.get(s, out=buf)
        for g, col in zip(got, v1["cols"]):
            assert np.array_equal(_bits(g.numpy()), _bits(col[lo:hi]))
    out = reader.empty_batch(1, 3)
    got = reader.gather(np.array([[3, 3, -1]]), np.array([[0, 1, 0]]), out=out)
    lo = v1["offsets"][3]
    for name, col in zip(FIELDS, v1["cols"]):
        assert np.array_equal(_bits(got[name][0, :2].numpy()), _bits(col[lo : lo + 2]))
        assert not got[name][0, 2].numpy().any()


@pytest.mark.parametrize(("vocab", "dtype"), [(32_000, "q8"), (151_936, "q8"), (151_936, "fp16")])
def test_compact_rows_decode_to_the_dense_reference(tmp_path, vocab, dtype):
    """get_compact carries the stored bytes; its torch decode equals get (and, for q8, the dense
    reference) bit for bit."""
    _, offsets, _ = _write(tmp_path, vocab, dtype)
    reader = TeacherCacheReader(tmp_path, vocab_size=vocab)
    ref = _reference(reader, offsets) if dtype == "q8" else None
    row_bytes = sum(a.itemsize * int(np.prod(a.shape[1:])) for a in reader.shard_sections(0).values())
    assert row_bytes == {32_000: 199, 151_936: 215}[vocab] if dtype == "q8" else True
    for sample in range(len(LENGTHS)):
        n = reader.num_rows_of(sample)
        compact = reader.get_compact(sample)
        assert compact.nbytes == n * row_bytes
        plain = reader.get(sample)
        for got in (compact.to("cpu").decode(), compact.decode_torch("cpu")):  # numpy's and torch's decode
            for g, p in zip(got, plain):
                assert g.dtype == p.dtype and np.array_equal(_bits(g.numpy()), _bits(p.numpy()))
        if ref is not None:
            want = [
                np.array([ref(sample, p)[c] for p in range(n)]).reshape(n, *got[c].shape[1:])
                for c in range(4)
            ]
            for g, w in zip(got, want):
                assert np.array_equal(_bits(g.numpy()), _bits(w.astype(g.numpy().dtype)))


def test_compact_rows_of_a_version_1_cache(tmp_path):
    v1 = _v1_cache(tmp_path, 151_936, 5, np.random.default_rng(3))
    reader = TeacherCacheReader(tmp_path)
    lo, hi = v1["offsets"][4], v1["offsets"][5]
    for got in (reader.get_compact(4).decode("cpu"), reader.get_compact(4).decode_torch()):
        for g, col in zip(got, v1["cols"]):
            assert np.array_equal(_bits(g.numpy()), _bits(col[lo:hi]))


def test_reads_bypass_a_torch_function_mode_of_the_caller(tmp_path):
    """A mode active in the caller (as cpu_compat.CudaToCpuMode in CPU runs) sees none of the reader's
    torch calls, and the values are the same."""
    from torch.overrides import TorchFunctionMode

    class Counting(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Counting.calls += 1
            return func(*args, **(kwargs or {}))

    _write(tmp_path, 32_000, "q8")
    reader = TeacherCacheReader(tmp_path, vocab_size=32_000)
    plain, buf = reader.get(4), reader.empty_rows(SEQ)
    batch_plain = reader.gather(np.full((1, 4), 4), np.arange(4)[None])
    out = reader.empty_batch(1, 4)
    with Counting():
        got = reader.get(4, out=buf)
        batch = reader.gather(np.full((1, 4), 4), np.arange(4)[None], out=out)
        fresh = reader.get(4)
    assert Counting.calls == 0
    assert all(torch.equal(f, p) for f, p in zip(fresh, plain))
    for g, p in zip(got, plain):
        assert np.array_equal(_bits(g.numpy()), _bits(p.numpy()))
    for name in batch:
        assert torch.equal(batch[name], batch_plain[name])
