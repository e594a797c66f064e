"""Tokenized dataset: megatron-core's indexed dataset (``{prefix}.bin`` + ``{prefix}.idx``) plus the
prompt/response split (``{prefix}.prompt_lengths.npy``) and our metadata (``{prefix}.json``).

Format (version 2, written):
- ``{prefix}.bin`` / ``{prefix}.idx``: exactly what ``megatron.core.datasets.indexed_dataset.
  IndexedDatasetBuilder`` writes: one document of one sequence per sample (prompt + response tokens,
  EOS included), ``uint16`` tokens when the vocabulary has fewer than 65500 ids, else ``int32``
  (megatron's ``DType.optimal_dtype``). ``IndexedDataset(prefix)`` of megatron-core, and so
  Megatron-LM's ``GPTDataset`` (``--data-path PREFIX``), read them as a corpus of whole samples.
- ``{prefix}.prompt_lengths.npy``: an int64 ``.npy`` array, one entry per sample: its first
  ``prompt_len`` tokens are the prompt (no loss), the rest the response (loss). Megatron-LM ignores it.
- ``{prefix}.json``: metadata: ``format``, ``version``, ``dtype``, ``num_samples``, ``num_tokens``,
  ``vocab_size``, ``tokenizer_fingerprint``, ``source_fingerprint``, ``fingerprint`` (sha256 over the
  bin, idx and prompt-lengths bytes: the dataset identity that keys the teacher cache) and ``files``
  (name, size and sha256 of each), plus any ``extra`` the writer was given.

Version 1 (an ``.npy`` ``.idx`` of ``(start, end, prompt_len)`` rows, ``uint16``/``uint32`` tokens; no
prompt-lengths file) is still read, so existing datasets and the teacher caches keyed by their
fingerprints stay valid; ``tools/preprocess_data.py`` writes version 2.

Crash safety: each file is written to a temporary name, fsynced and renamed with ``os.replace``; an
existing ``{prefix}.json`` is removed first and the new one is renamed last. A dataset opens only
through its json, so an interrupted write never leaves something that opens as valid.

Opening checks the json fields, the idx shape and offsets, and the bin size against ``num_tokens``
(truncation) always; sha256 of both files only with ``verify=True`` (it reads every byte).

Usage::

    write_indexed_dataset("out/train", samples, tok.fingerprint, src_sha, tok.vocab_size)
    ds = IndexedDataset("out/train")
    tokens, prompt_len = ds[0]
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from rgkd_megatron.data.tokenizer import file_sha256

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "IndexedDataset", "dataset_paths", "write_indexed_dataset"]

FORMAT_NAME = "rgkd_indexed_dataset"
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4"), "int32": np.dtype("<i4")}
_REQUIRED_FIELDS = (
    "version",
    "dtype",
    "num_samples",
    "num_tokens",
    "vocab_size",
    "tokenizer_fingerprint",
    "source_fingerprint",
    "fingerprint",
    "files",
)


def dataset_paths(prefix: str) -> dict[str, str]:
    """The file paths of a dataset prefix: keys ``bin``, ``idx``, ``prompt`` (version 2), ``json``."""
    prefix = os.fspath(prefix)
    return {
        "bin": prefix + ".bin",
        "idx": prefix + ".idx",
        "prompt": prefix + ".prompt_lengths.npy",
        "json": prefix + ".json",
    }


def _dtype_for_vocab(vocab_size: int) -> str:
    from megatron.core.datasets.indexed_dataset import DType

    return np.dtype(DType.optimal_dtype(vocab_size)).name


def write_indexed_dataset(
    out_prefix: str,
    samples: Iterable[tuple[Sequence[int], int]],
    tokenizer_fingerprint: str,
    source_fingerprint: str,
    vocab_size: int,
    extra_meta: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Write samples ``(token_ids, prompt_len)`` as an indexed dataset; return the metadata dict.

    ``samples`` is consumed once, streaming (the bin is never held in memory). Every token id must be in
    ``[0, vocab_size)``, every sample non-empty and ``0 <= prompt_len <= len(token_ids)``; an exception
    (from these checks or from the iterable itself) removes the temporary files and leaves any previous
    dataset at ``out_prefix`` unopenable rather than mixed.
    """
    if not isinstance(vocab_size, int) or vocab_size <= 0 or vocab_size > 2**31:
        raise ValueError(f"vocab_size must be a positive int <= 2**31, got {vocab_size!r}")
    paths = dataset_paths(out_prefix)
    out_dir = os.path.dirname(os.path.abspath(paths["bin"]))
    os.makedirs(out_dir, exist_ok=True)
    dtype_name = _dtype_for_vocab(vocab_size)
    dtype = _DTYPES[dtype_name]
    tmp = {k: f"{p}.tmp.{os.getpid()}" for k, p in paths.items()}

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prompt_lens: list[int] = []
    num_tokens = 0
    builder = None
    try:
        builder = IndexedDatasetBuilder(tmp["bin"], dtype=dtype.type)
        for i, (token_ids, prompt_len) in enumerate(samples):
            arr = np.asarray(token_ids, dtype=np.int64)
            if arr.ndim != 1 or arr.size == 0:
                raise ValueError(
                    f"sample {i}: token ids must be a non-empty 1-D sequence, got shape {arr.shape}"
                )
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= vocab_size:
                raise ValueError(f"sample {i}: token id {lo if lo < 0 else hi} outside [0, {vocab_size})")
            prompt_len = int(prompt_len)
            if not 0 <= prompt_len <= arr.size:
                raise ValueError(f"sample {i}: prompt_len {prompt_len} outside [0, {arr.size}]")
            builder.add_document(arr, [arr.size])
            prompt_lens.append(prompt_len)
            num_tokens += arr.size
        builder.finalize(tmp["idx"])
        if not prompt_lens:
            raise ValueError(f"no samples to write to {out_prefix}")
        with open(tmp["prompt"], "wb") as fprompt:
            np.save(fprompt, np.asarray(prompt_lens, dtype=np.int64), allow_pickle=False)
            _fsync(fprompt)
        for key in ("bin", "idx"):
            with open(tmp[key], "rb+") as f:
                _fsync(f)
        shas = {key: file_sha256(tmp[key]) for key in ("bin", "idx", "prompt")}
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "dtype": dtype_name,
            "num_samples": len(prompt_lens),
            "num_tokens": num_tokens,
            "vocab_size": vocab_size,
            "tokenizer_fingerprint": tokenizer_fingerprint,
            "source_fingerprint": source_fingerprint,
            "fingerprint": _files_sha256([tmp["bin"], tmp["idx"], tmp["prompt"]]),
            "files": {
                key: {
                    "name": os.path.basename(paths[key]),
                    "size": os.path.getsize(tmp[key]),
                    "sha256": shas[key],
                }
                for key in ("bin", "idx", "prompt")
            },
            "extra": dict(extra_meta or {}),
        }
        with open(tmp["json"], "w", encoding="utf-8") as fmeta:
            json.dump(meta, fmeta, indent=2, sort_keys=True)
            fmeta.write("\n")
            _fsync(fmeta)
        # The old json goes first and the new one comes last: in between nothing opens.
        if os.path.exists(paths["json"]):
            os.remove(paths["json"])
        for key in ("bin", "idx", "prompt", "json"):
            os.replace(tmp[key], paths[key])
        _fsync_dir(out_dir)
    finally:
        if builder is not None:
            builder.data_file.close()
        for p in tmp.values():
            if os.path.exists(p):
                os.remove(p)
    return meta


def _files_sha256(paths: Sequence[str], chunk_bytes: int = 1 << 20) -> str:
    """sha256 over the files' bytes, one after the other."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(chunk_bytes):
                digest.update(chunk)
    return digest.hexdigest()


def _fsync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class IndexedDataset:
    """Read-only view of a dataset written by ``write_indexed_dataset``.

    ``ds[i]`` returns ``(tokens, prompt_len)``: ``tokens`` a 1-D numpy view into the memory map (dtype
    ``ds.dtype``, uint16/uint32; copy or cast it before mutating), ``prompt_len`` an int. Picklable
    (the memory map is reopened on unpickle), so it can go to DataLoader workers.

    Raises (at construction): ``FileNotFoundError`` for a missing file; ``ValueError`` naming the file and
    field for an unknown format/version, a missing or malformed field, an idx that disagrees with the
    json, a bin whose size is not ``num_tokens * itemsize`` (truncated or padded), and, with
    ``verify=True``, a sha256 that differs from the json.
    """

    def __init__(self, prefix: str, verify: bool = False):
        self.prefix = os.fspath(prefix)
        self.paths = dataset_paths(self.prefix)
        self.verify = verify
        self.meta = self._read_meta()
        self.dtype = _DTYPES[self.meta["dtype"]]
        if verify:
            self._verify_checksums()
        self._index = self._read_index()
        self._check_bin_size()
        self._open_bin()

    # ----------------------------------------------------------------------------------------- reading
    def __len__(self) -> int:
        return self._index.shape[0]

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample index {i} out of range for {self.prefix} ({n} samples)")
        start, end, prompt_len = self._index[i]
        return self._bin[start:end], int(prompt_len)

    @property
    def fingerprint(self) -> str:
        """sha256 over the bin then idx bytes (as recorded in the json)."""
        return self.meta["fingerprint"]

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.meta["tokenizer_fingerprint"]

    @property
    def source_fingerprint(self) -> str:
        return self.meta["source_fingerprint"]

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def num_tokens(self) -> int:
        return self.meta["num_tokens"]

    @property
    def lengths(self) -> np.ndarray:
        """Token count of every sample, int64 ``[num_samples]``."""
        return self._index[:, 1] - self._index[:, 0]

    @property
    def prompt_lengths(self) -> np.ndarray:
        """Prompt token count of every sample, int64 ``[num_samples]``."""
        return self._index[:, 2].copy()

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.prefix!r}, num_samples={len(self)}, num_tokens={self.num_tokens}, "
            f"fingerprint={self.fingerprint[:12]}...)"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_bin", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open_bin()

    # ----------------------------------------------------------------------------------------- checks
    def _read_meta(self) -> dict[str, Any]:
        path = self.paths["json"]
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"dataset metadata {path} not found (wrong prefix, or the dataset was never completely written)"
            )
        try:
            with open(path, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot parse dataset metadata {path}: {e}") from e
        if not isinstance(meta, dict):
            raise ValueError(f"dataset metadata {path} must hold a JSON object")
        if meta.get("format", FORMAT_NAME) != FORMAT_NAME:
            raise ValueError(f"{path}: field 'format' is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
        for field in _REQUIRED_FIELDS:
            if field not in meta:
                raise ValueError(f"{path}: missing field '{field}'")
        if meta["version"] not in _READABLE_VERSIONS:
            raise ValueError(
                f"{path}: field 'version' is {meta['version']!r}; this reader supports versions "
                f"{_READABLE_VERSIONS} (re-run tools/preprocess_data.py to rewrite the dataset)"
            )
        if meta["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: field 'dtype' is {meta['dtype']!r}, expected one of {sorted(_DTYPES)}")
        for field in ("num_samples", "num_tokens", "vocab_size"):
            if not isinstance(meta[field], int) or meta[field] < 0:
                raise ValueError(f"{path}: field '{field}' must be a non-negative int, got {meta[field]!r}")
        for key in self._file_keys(meta):
            entry = meta["files"].get(key) if isinstance(meta["files"], dict) else None
            if not isinstance(entry, dict) or not {"size", "sha256"} <= entry.keys():
                raise ValueError(f"{path}: field 'files.{key}' must hold 'size' and 'sha256'")
        return meta

    def _require_file(self, key: str) -> str:
        path = self.paths[key]
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"dataset file {path} not found (metadata {self.paths['json']} refers to it)"
            )
        return path

    @staticmethod
    def _file_keys(meta: dict[str, Any]) -> tuple[str, ...]:
        return ("bin", "idx") if meta["version"] == 1 else ("bin", "idx", "prompt")

    def _verify_checksums(self) -> None:
        for key in self._file_keys(self.meta):
            path = self._require_file(key)
            expected = self.meta["files"][key]["sha256"]
            actual = file_sha256(path)
            if actual != expected:
                raise ValueError(
                    f"checksum mismatch for {path}: sha256 {actual} differs from field 'files.{key}.sha256' "
                    f"= {expected} in {self.paths['json']} (file corrupted or replaced)"
                )

    def _read_index(self) -> np.ndarray:
        index = self._read_npy_index() if self.meta["version"] == 1 else self._read_megatron_index()
        self._check_index(index)
        return index

    def _read_megatron_index(self) -> np.ndarray:
        """(start, end, prompt_len) rows from megatron-core's .idx (its own reader) + prompt lengths."""
        from megatron.core.datasets.indexed_dataset import _IndexReader

        path = self._require_file("idx")
        try:
            reader = _IndexReader(path, multimodal=False)
        except (AssertionError, OSError, ValueError, struct.error) as e:
            raise ValueError(f"cannot read megatron-core index {path}: {e}") from e
        if np.dtype(reader.dtype) != self.dtype:
            raise ValueError(
                f"{path}: token dtype {np.dtype(reader.dtype).name} differs from field 'dtype' = "
                f"{self.meta['dtype']!r} in {self.paths['json']}"
            )
        n = self.meta["num_samples"]
        if reader.sequence_count != n or not np.array_equal(reader.document_indices, np.arange(n + 1)):
            raise ValueError(
                f"{path}: expected {n} documents of one sequence each (field 'num_samples' of "
                f"{self.paths['json']}), got {reader.sequence_count} sequences in "
                f"{len(reader.document_indices) - 1} documents"
            )
        prompt_path = self._require_file("prompt")
        try:
            prompt = np.load(prompt_path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read prompt lengths {prompt_path}: {e}") from e
        if prompt.dtype != np.int64 or prompt.shape != (n,):
            raise ValueError(
                f"{prompt_path}: dtype {prompt.dtype} shape {prompt.shape}, expected int64 ({n},)"
            )
        starts = reader.sequence_pointers // self.dtype.itemsize
        index = np.stack([starts, starts + reader.sequence_lengths.astype(np.int64), prompt], axis=1)
        del reader
        return index.astype(np.int64).reshape(-1, 3)

    def _read_npy_index(self) -> np.ndarray:
        path = self._require_file("idx")
        try:
            index = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read dataset index {path}: {e}") from e
        n = self.meta["num_samples"]
        if index.dtype != np.int64 or index.shape != (n, 3):
            raise ValueError(
                f"{path}: index has dtype {index.dtype} shape {index.shape}, expected int64 ({n}, 3) "
                f"from field 'num_samples' of {self.paths['json']}"
            )
        return index

    def _check_index(self, index: np.ndarray) -> None:
        path, n = self.paths["idx"], self.meta["num_samples"]
        starts, ends, prompt = index[:, 0], index[:, 1], index[:, 2]
        contiguous = n == 0 or (starts[0] == 0 and np.array_equal(starts[1:], ends[:-1]))
        if not contiguous or np.any(ends < starts) or np.any(prompt < 0) or np.any(prompt > ends - starts):
            raise ValueError(f"{path}: inconsistent offsets or prompt lengths (index corrupted)")
        last = int(ends[-1]) if n else 0
        if last != self.meta["num_tokens"]:
            raise ValueError(
                f"{path}: last offset {last} differs from field 'num_tokens' = {self.meta['num_tokens']} "
                f"in {self.paths['json']}"
            )

    def _check_bin_size(self) -> None:
        path = self._require_file("bin")
        size = os.path.getsize(path)
        expected = self.meta["num_tokens"] * self.dtype.itemsize
        if size != expected:
            kind = "truncated" if size < expected else "larger than recorded"
            raise ValueError(
                f"{path} is {kind}: {size} bytes, expected {expected} (field 'num_tokens' = "
                f"{self.meta['num_tokens']} x {self.dtype.itemsize}-byte {self.meta['dtype']}, last offset in "
                f"{self.paths['idx']})"
            )

    def _open_bin(self) -> None:
        if self.meta["num_tokens"] == 0:  # np.memmap refuses empty files
            self._bin = np.zeros(0, dtype=self.dtype)
        else:
            self._bin = np.memmap(self.paths["bin"], dtype=self.dtype, mode="r")
