"""Memory-mapped tokenized dataset: ``{prefix}.bin`` + ``{prefix}.idx`` + ``{prefix}.json``.

Format (version 1):
- ``{prefix}.bin``: every sample's token ids back to back, little-endian ``uint16`` when
  ``vocab_size < 65536``, else ``uint32``.
- ``{prefix}.idx``: a ``.npy`` int64 array of shape ``[num_samples, 3]``; row i is
  ``(start, end, prompt_len)``: sample i is ``bin[start:end]`` and its first ``prompt_len`` tokens are
  the prompt (no loss), the rest the response (loss), EOS included.
- ``{prefix}.json``: metadata: ``format``, ``version``, ``dtype``, ``num_samples``, ``num_tokens``,
  ``vocab_size``, ``tokenizer_fingerprint``, ``source_fingerprint``, ``fingerprint`` (sha256 over the
  bin bytes followed by the idx bytes: the dataset identity that keys the teacher cache) and ``files``
  (name, size and sha256 of bin and idx), plus any ``extra`` the writer was given.

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
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from rgkd_megatron.data.tokenizer import file_sha256

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "IndexedDataset", "dataset_paths", "write_indexed_dataset"]

FORMAT_NAME = "rgkd_indexed_dataset"
FORMAT_VERSION = 1
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
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
    """The three file paths of a dataset prefix: keys ``bin``, ``idx``, ``json``."""
    prefix = os.fspath(prefix)
    return {"bin": prefix + ".bin", "idx": prefix + ".idx", "json": prefix + ".json"}


def _dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size < 65536 else "uint32"


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
    if not isinstance(vocab_size, int) or vocab_size <= 0 or vocab_size > 2**32:
        raise ValueError(f"vocab_size must be a positive int <= 2**32, got {vocab_size!r}")
    paths = dataset_paths(out_prefix)
    out_dir = os.path.dirname(os.path.abspath(paths["bin"]))
    os.makedirs(out_dir, exist_ok=True)
    dtype_name = _dtype_for_vocab(vocab_size)
    dtype = _DTYPES[dtype_name]
    tmp = {k: f"{p}.tmp.{os.getpid()}" for k, p in paths.items()}

    bin_sha, idx_sha, dataset_sha = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    rows: list[tuple[int, int, int]] = []
    num_tokens = 0
    try:
        with open(tmp["bin"], "wb") as fbin:
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
                data = arr.astype(dtype).tobytes()
                fbin.write(data)
                bin_sha.update(data)
                dataset_sha.update(data)
                rows.append((num_tokens, num_tokens + arr.size, prompt_len))
                num_tokens += arr.size
            _fsync(fbin)
        if not rows:
            raise ValueError(f"no samples to write to {out_prefix}")
        index = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
        with open(tmp["idx"], "wb") as fidx:
            np.save(fidx, index, allow_pickle=False)
            _fsync(fidx)
        with open(tmp["idx"], "rb") as fidx:
            idx_bytes = fidx.read()
        idx_sha.update(idx_bytes)
        dataset_sha.update(idx_bytes)
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "dtype": dtype_name,
            "num_samples": len(rows),
            "num_tokens": num_tokens,
            "vocab_size": vocab_size,
            "tokenizer_fingerprint": tokenizer_fingerprint,
            "source_fingerprint": source_fingerprint,
            "fingerprint": dataset_sha.hexdigest(),
            "files": {
                "bin": {
                    "name": os.path.basename(paths["bin"]),
                    "size": num_tokens * dtype.itemsize,
                    "sha256": bin_sha.hexdigest(),
                },
                "idx": {
                    "name": os.path.basename(paths["idx"]),
                    "size": len(idx_bytes),
                    "sha256": idx_sha.hexdigest(),
                },
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
        os.replace(tmp["bin"], paths["bin"])
        os.replace(tmp["idx"], paths["idx"])
        os.replace(tmp["json"], paths["json"])
        _fsync_dir(out_dir)
    finally:
        for p in tmp.values():
            if os.path.exists(p):
                os.remove(p)
    return meta


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
        if meta["version"] != FORMAT_VERSION:
            raise ValueError(
                f"{path}: field 'version' is {meta['version']!r}; this reader supports version {FORMAT_VERSION}"
            )
        if meta["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: field 'dtype' is {meta['dtype']!r}, expected one of {sorted(_DTYPES)}")
        for field in ("num_samples", "num_tokens", "vocab_size"):
            if not isinstance(meta[field], int) or meta[field] < 0:
                raise ValueError(f"{path}: field '{field}' must be a non-negative int, got {meta[field]!r}")
        for key in ("bin", "idx"):
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

    def _verify_checksums(self) -> None:
        for key in ("bin", "idx"):
            path = self._require_file(key)
            expected = self.meta["files"][key]["sha256"]
            actual = file_sha256(path)
            if actual != expected:
                raise ValueError(
                    f"checksum mismatch for {path}: sha256 {actual} differs from field 'files.{key}.sha256' "
                    f"= {expected} in {self.paths['json']} (file corrupted or replaced)"
                )

    def _read_index(self) -> np.ndarray:
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
        return index

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
