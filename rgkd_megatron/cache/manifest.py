"""Teacher top-k cache manifest: identity, row keying, shard plan, fingerprints, compatibility checks.

Keying. The cache is keyed by (dataset fingerprint, sample id, token offset), nothing else. Sample
``i`` of ``L`` tokens is fed to the teacher truncated to ``seq_length + 1`` tokens, so it has
``n_i = max(0, min(L, seq_length + 1) - 1)`` rows; row ``t`` (``0 <= t < n_i``) is the teacher's
distribution after reading tokens ``0..t``, i.e. over the token at offset ``t + 1``. In a training
batch that is the position whose ``position_ids == t`` and ``sample_ids == i``
(``rgkd_megatron.data.batching``). Rows of all samples are numbered globally in sample order; the
row index ``rows.npy`` (int64 ``[N + 1]``) holds the first global row of every sample.

Shards. Consecutive samples are grouped into shards of at most ``rows_per_shard`` rows (a sample
never straddles two shards; a sample longer than the target gets a shard of its own). The plan
depends only on the dataset, ``seq_length`` and ``rows_per_shard``: never on the writer's DP size,
micro-batch or seed, so any layout can write or resume any cache, and any student can read it.

Files of a cache directory::

    manifest.json          written last, when every shard exists (its presence = complete cache)
    rows.npy               row index (see above)
    shard_000000.bin ...   shards (``format.py``)
    build.json             the identity of a build in progress (resume checks it); removed at the end
    shard_000000.json ...  per-shard sidecars ({size, sha256}) of a build in progress; removed at the end

Manifest (JSON object): ``format``, ``version``, ``teacher`` {fingerprint, source, checkpoint,
random_init_seed, model, padded_vocab_size, params_dtype}, ``tokenizer_fingerprint``, ``vocab_size``
(the real, shared tokenizer vocabulary: ids are below it and the teacher's softmax covers exactly
it, its padding columns excluded), ``k``, ``temperature``, ``dtype`` (fp16 / bf16 / fp32, or q8
in version 2), ``ids_dtype`` (``int32`` in version 1, ``packedB`` with B = id_bits in version 2), ``dataset``
{fingerprint, num_samples, num_tokens, path}, ``seq_length``, ``rows_per_shard``, ``block_rows``,
``num_rows``, ``row_index`` {name, size, sha256}, ``shards`` [{name, first_sample, num_samples,
first_row, num_rows, size, sha256}], ``build`` {micro_batch_size, num_microbatches, pad_multiple,
tp, pp, dp, device, versions}. ``build.dp`` is informational; every other build field changes the
teacher's arithmetic, so a resumed build must use the same values (``resume_mismatch``).
``version`` is the shard format (``format.py``): 2 is written, 1 and 2 are read. On load, the
manifest's k / dtype / block_rows / version are checked against the first shard's header, so an
edited manifest is reported by field, not as a size mismatch.

Compatibility (``check_compatible``): a student reading the cache must have the same tokenizer
fingerprint, the same real vocabulary size (its own padded output size may differ, e.g. 151,936 vs
the teacher's 152,064, as long as it is >= the shared size) and the same dataset fingerprint.
Every mismatch raises ``CacheMismatchError`` naming the field.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any

import numpy as np

from rgkd_megatron.cache.codec import storage_dtype
from rgkd_megatron.cache.format import (
    FORMAT_VERSION,
    SUPPORTED_VERSIONS,
    ShardLayout,
    fsync_dir,
    id_bits_for,
    read_header,
    shard_layout,
)

__all__ = [
    "FORMAT_NAME",
    "CacheMismatchError",
    "check_compatible",
    "checkpoint_fingerprint",
    "get_field",
    "id_bits_of",
    "layout_of",
    "load_manifest",
    "new_identity",
    "plan_shards",
    "resume_mismatch",
    "row_index_bytes",
    "rows_per_sample",
    "shard_name",
    "teacher_fingerprint",
    "write_json_atomic",
]

FORMAT_NAME = "rgkd_teacher_topk_cache"
MANIFEST = "manifest.json"
BUILD_STATE = "build.json"
ROW_INDEX = "rows.npy"
_SMALL_FILE = 1 << 20
# fields of the manifest that a resumed build must reproduce exactly (dotted paths)
IDENTITY_FIELDS = (
    "format", "version", "teacher.fingerprint", "tokenizer_fingerprint", "vocab_size", "k", "temperature",
    "dtype", "ids_dtype", "dataset.fingerprint", "seq_length", "rows_per_shard", "block_rows",
    "build.micro_batch_size", "build.num_microbatches", "build.pad_multiple", "build.tp", "build.pp",
    "build.device",
)  # fmt: skip


class CacheMismatchError(ValueError):
    """The cache was built for another tokenizer / vocabulary / dataset / teacher / settings."""


def shard_name(index: int) -> str:
    return f"shard_{index:06d}.bin"


def rows_per_sample(lengths: np.ndarray, seq_length: int) -> np.ndarray:
    """Cache rows of each sample: ``max(0, min(L, seq_length + 1) - 1)`` (int64)."""
    if seq_length < 1:
        raise ValueError(f"seq_length={seq_length}: must be >= 1")
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.clip(np.minimum(lengths, seq_length + 1) - 1, 0, None)


def plan_shards(rows: np.ndarray, rows_per_shard: int) -> list[dict[str, int]]:
    """Group consecutive samples into shards of at most ``rows_per_shard`` rows (module docstring)."""
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard={rows_per_shard}: must be >= 1")
    shards: list[dict[str, int]] = []
    first_sample, first_row, count = 0, 0, 0
    for i, n in enumerate(np.asarray(rows, dtype=np.int64).tolist()):
        if count > 0 and count + n > rows_per_shard:
            shards.append(dict(first_sample=first_sample, num_samples=i - first_sample,
                               first_row=first_row, num_rows=count))  # fmt: skip
            first_sample, first_row, count = i, first_row + count, 0
        count += n
    if len(rows) > first_sample or not shards:
        shards.append(dict(first_sample=first_sample, num_samples=len(rows) - first_sample,
                           first_row=first_row, num_rows=count))  # fmt: skip
    return shards


def new_identity(
    *,
    teacher: dict[str, Any],
    tokenizer_fingerprint: str,
    vocab_size: int,
    dataset: dict[str, Any],
    lengths: np.ndarray,
    k: int,
    temperature: float,
    dtype: str,
    seq_length: int,
    rows_per_shard: int,
    block_rows: int,
    build: dict[str, Any],
    version: int = FORMAT_VERSION,
) -> tuple[dict[str, Any], np.ndarray]:
    """(the manifest without ``shards``, row offsets int64 [N + 1]) of a cache over samples of ``lengths``.

    ``dataset`` holds at least ``fingerprint``; ``build`` the writer settings (see the module docstring);
    ``version`` the shard format (``format.py``; 1 only to write caches for older readers / tests).
    """
    storage_dtype(dtype)
    if version not in SUPPORTED_VERSIONS or (version == 1 and dtype == "q8"):
        raise ValueError(f"version: expected one of {SUPPORTED_VERSIONS} (q8 needs 2), got {version}")
    if not 1 <= k <= vocab_size:
        raise ValueError(f"k: expected 1 <= k <= vocab_size ({vocab_size}), got {k}")
    if rows_per_shard < 1 or block_rows < 1:
        raise ValueError(f"rows_per_shard ({rows_per_shard}) and block_rows ({block_rows}) must be >= 1")
    offsets = np.concatenate([[0], np.cumsum(rows_per_sample(lengths, seq_length))]).astype(np.int64)
    index = row_index_bytes(offsets)
    identity = {
        "format": FORMAT_NAME,
        "version": int(version),
        "teacher": teacher,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "vocab_size": int(vocab_size),
        "k": int(k),
        "temperature": float(temperature),
        "dtype": dtype,
        "ids_dtype": "int32" if version == 1 else f"packed{id_bits_for(vocab_size)}",
        "dataset": {**dataset, "num_samples": len(offsets) - 1},
        "seq_length": int(seq_length),
        "rows_per_shard": int(rows_per_shard),
        "block_rows": int(block_rows),
        "num_rows": int(offsets[-1]),
        "row_index": {"name": ROW_INDEX, "size": len(index), "sha256": hashlib.sha256(index).hexdigest()},
        "build": build,
    }
    return identity, offsets


def row_index_bytes(offsets: np.ndarray) -> bytes:
    """The exact bytes of ``rows.npy`` for int64 row offsets [N + 1]."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(offsets, dtype="<i8"), allow_pickle=False)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# fingerprints


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_fingerprint(directory: str) -> str:
    """sha256 over a checkpoint directory's metadata: every file's relative path and size, plus the
    contents of every file up to 1 MiB (dist_checkpointing's metadata.json, .metadata, common.pt,
    our markers). Cheap for a 70B checkpoint; weight files are identified by name and size only."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"teacher checkpoint directory {directory} not found")
    entries = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            entry = {"path": os.path.relpath(path, directory), "size": size}
            if size <= _SMALL_FILE:
                entry["sha256"] = _sha256_file(path)
            entries.append(entry)
    if not entries:
        raise ValueError(f"teacher checkpoint directory {directory} is empty")
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def teacher_fingerprint(
    model: dict[str, Any],
    padded_vocab_size: int,
    params_dtype: str,
    checkpoint: str | None = None,
    random_init: dict[str, Any] | None = None,
) -> str:
    """Identity of the teacher: its resolved model config and either its checkpoint's metadata or,
    for random weights, everything they depend on (seed, and the layout/device for the RNG)."""
    if (checkpoint is None) == (random_init is None):
        raise ValueError("teacher_fingerprint: give exactly one of checkpoint or random_init")
    weights = {"checkpoint": checkpoint_fingerprint(checkpoint)} if checkpoint else {"random": random_init}
    payload = {
        "model": model,
        "padded_vocab_size": padded_vocab_size,
        "params_dtype": params_dtype,
        **weights,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# files


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def get_field(obj: dict, dotted: str) -> Any:
    """The value at a dotted path (``build.tp``) of a manifest / identity, None where absent."""
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def resume_mismatch(existing: dict, requested: dict) -> str | None:
    """The first identity field (dotted) where a build in progress differs from the request, or None."""
    for field in IDENTITY_FIELDS:
        if get_field(existing, field) != get_field(requested, field):
            return field
    return None


def load_manifest(directory: str) -> dict[str, Any]:
    """Read and structurally validate ``directory/manifest.json``; errors name the file and field."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        hint = " (a build is in progress or was interrupted: rerun the build to resume it)"
        raise FileNotFoundError(
            f"teacher cache {directory}: {MANIFEST} not found"
            + (hint if os.path.exists(os.path.join(directory, BUILD_STATE)) else "")
        )
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot parse {path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: field 'format' is not {FORMAT_NAME!r}")
    if manifest.get("version") not in SUPPORTED_VERSIONS:
        raise ValueError(
            f"{path}: field 'version' is {manifest.get('version')!r}, expected one of {SUPPORTED_VERSIONS}"
        )
    for field, kind in (("k", int), ("vocab_size", int), ("num_rows", int), ("block_rows", int),
                        ("seq_length", int), ("temperature", (int, float)), ("dtype", str),
                        ("tokenizer_fingerprint", str), ("shards", list), ("row_index", dict),
                        ("dataset", dict), ("teacher", dict)):  # fmt: skip
        if not isinstance(manifest.get(field), kind) or isinstance(manifest.get(field), bool):
            raise ValueError(f"{path}: field '{field}' missing or of the wrong type")
    try:
        layout_of(manifest, 0)
    except ValueError as e:
        raise ValueError(f"{path}: fields 'dtype' / 'version' do not describe a shard format: {e}") from e
    _check_against_first_shard(manifest, directory, path)
    _check_shard_list(manifest, path)
    return manifest


def id_bits_of(manifest: dict[str, Any]) -> int:
    """Bits per stored id of the cache a manifest (or identity) describes (version 1: int32)."""
    return 32 if manifest.get("version", FORMAT_VERSION) == 1 else id_bits_for(manifest["vocab_size"])


def layout_of(manifest: dict[str, Any], num_rows: int) -> ShardLayout:
    """The shard layout of ``num_rows`` rows of the cache a manifest (or identity) describes."""
    version = manifest.get("version", FORMAT_VERSION)
    return shard_layout(
        num_rows, manifest["k"], manifest["dtype"], manifest["block_rows"], version, id_bits_of(manifest)
    )


def _check_against_first_shard(manifest: dict, directory: str, path: str) -> None:
    """An edited manifest: its k / dtype / block_rows / version against the first shard's header."""
    shards = manifest["shards"]
    if not shards or not isinstance(shards[0], dict) or not isinstance(shards[0].get("name"), str):
        return
    shard_path = os.path.join(directory, os.path.basename(shards[0]["name"]))
    if not os.path.isfile(shard_path):
        return  # reported by the reader, naming the missing shard
    try:
        header = read_header(shard_path)
    except ValueError:
        return  # a damaged shard: reported by the reader's own checks
    for field, got in (("k", header.k), ("dtype", header.dtype), ("block_rows", header.block_rows),
                       ("version", header.version)):  # fmt: skip
        if manifest.get(field) != got:
            raise ValueError(
                f"{path}: field '{field}' is {manifest.get(field)!r}, but the shards were written with "
                f"{field} = {got!r} (shard {shard_path}): the manifest was edited or belongs to another cache"
            )


def _check_shard_list(manifest: dict, path: str) -> None:
    next_sample, next_row = 0, 0
    for i, shard in enumerate(manifest["shards"]):
        keys = ("name", "first_sample", "num_samples", "first_row", "num_rows", "size", "sha256")
        if not isinstance(shard, dict) or any(key not in shard for key in keys):
            raise ValueError(f"{path}: field 'shards[{i}]' lacks one of {keys}")
        if shard["first_sample"] != next_sample or shard["first_row"] != next_row:
            raise ValueError(f"{path}: field 'shards[{i}]' does not continue the previous shard")
        expected = layout_of(manifest, shard["num_rows"])
        if shard["size"] != expected.size:
            raise ValueError(
                f"{path}: field 'shards[{i}].size' = {shard['size']}, the format needs {expected.size}"
            )
        next_sample += shard["num_samples"]
        next_row += shard["num_rows"]
    if next_sample != manifest["dataset"].get("num_samples") or next_row != manifest["num_rows"]:
        raise ValueError(
            f"{path}: the shards cover {next_sample} samples / {next_row} rows, fields 'dataset.num_samples' "
            f"/ 'num_rows' say {manifest['dataset'].get('num_samples')} / {manifest['num_rows']}"
        )


# --------------------------------------------------------------------------------------------------
# compatibility with a student


def _short(value: Any) -> str:
    return value[:16] + "..." if isinstance(value, str) and len(value) > 19 else repr(value)


def check_compatible(
    manifest: dict[str, Any],
    *,
    tokenizer_fingerprint: str | None = None,
    vocab_size: int | None = None,
    padded_vocab_size: int | None = None,
    dataset_fingerprint: str | None = None,
    temperature: float | None = None,
    k: int | None = None,
    teacher_fingerprint: str | None = None,
    where: str = "teacher cache",
) -> None:
    """Refuse a cache that does not match the student's setup; each error names the field.

    ``vocab_size`` is the student's real (tokenizer) vocabulary: it must equal the cache's shared
    ``vocab_size``; ``padded_vocab_size`` (the student's output-layer rows, any padding) must be >= it.
    Arguments left None are not checked.
    """

    def mismatch(field: str, cached: Any, student: Any, why: str) -> CacheMismatchError:
        return CacheMismatchError(
            f"{where}: field '{field}' is {_short(cached)} but the student has {_short(student)} ({why})"
        )

    checks = (
        ("tokenizer_fingerprint", tokenizer_fingerprint, "the cache was built with another tokenizer"),
        ("dataset.fingerprint", dataset_fingerprint, "the cache was built over another tokenized dataset"),
        (
            "vocab_size",
            vocab_size,
            "different real vocabularies; padding must not differ here, it is handled by padded_vocab_size",
        ),  # fmt: skip
        ("k", k, "different top-k"),
        ("teacher.fingerprint", teacher_fingerprint, "another teacher"),
    )
    for field, student, why in checks:
        if student is not None and get_field(manifest, field) != student:
            raise mismatch(field, get_field(manifest, field), student, why)
    if temperature is not None and abs(float(manifest["temperature"]) - float(temperature)) > 1e-12:
        raise mismatch(
            "temperature", manifest["temperature"], temperature, "log-probs are stored at the cache's T"
        )
    if padded_vocab_size is not None and padded_vocab_size < manifest["vocab_size"]:
        raise mismatch(
            "vocab_size", manifest["vocab_size"], padded_vocab_size,
            "the student's output layer has fewer rows than the shared vocabulary",
        )  # fmt: skip
