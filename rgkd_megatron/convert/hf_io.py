"""Streaming access to Hugging Face safetensors checkpoints: read one tensor at a time, write shards.

- ``HFCheckpoint(dir)`` reads ``config.json`` and the tensor inventory (name -> shape, dtype, file)
  from the safetensors headers only (``model.safetensors`` or ``model.safetensors.index.json`` +
  shards); ``get(name)`` reads that one tensor (memory-mapped), so a 70B checkpoint is never in RAM
  at once. Unsupported files (``pytorch_model.bin``), a broken index or a tensor of an unknown dtype
  raise ``ConversionError`` naming the file or tensor.
- ``ShardedSafetensorsWriter(dir, max_shard_bytes)`` buffers tensors up to ``max_shard_bytes`` and
  writes ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json`` (or a single
  ``model.safetensors``), the layout ``transformers`` reads; memory stays below one shard.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rgkd_megatron.convert.common import ConversionError

__all__ = ["HFCheckpoint", "ShardedSafetensorsWriter", "TensorInfo", "parse_size", "read_hf_config"]

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
"""Floating dtypes a converter accepts; anything else (int8, fp8, bool, ...) is refused by name."""


class TensorInfo:
    __slots__ = ("name", "shape", "dtype", "file")

    def __init__(self, name: str, shape: tuple[int, ...], dtype: str, file: str) -> None:
        self.name, self.shape, self.dtype, self.file = name, shape, dtype, file

    def __repr__(self) -> str:
        return f"TensorInfo({self.name}, {list(self.shape)}, {self.dtype}, {self.file})"

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in SAFETENSORS_DTYPES:
            raise ConversionError(
                f"tensor {self.name} ({self.file}): dtype {self.dtype} is not supported "
                f"(expected one of {', '.join(SAFETENSORS_DTYPES)})"
            )
        return SAFETENSORS_DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.torch_dtype.itemsize


def read_hf_config(src: str | os.PathLike) -> dict:
    path = Path(src) / "config.json"
    if not Path(src).is_dir():
        raise ConversionError(f"--input {src}: not a directory")
    if not path.is_file():
        raise ConversionError(f"--input {src}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path}: not valid JSON ({exc})") from exc


class HFCheckpoint:
    """A Hugging Face checkpoint directory, read lazily."""

    def __init__(self, src: str | os.PathLike) -> None:
        self.dir = Path(src)
        self.config = read_hf_config(self.dir)
        self.tensors = self._inventory()

    def _files(self) -> list[str]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ConversionError(f"{index}: not a safetensors index (no weight_map)") from exc
            files = sorted(set(weight_map.values()))
            for f in files:
                if not (self.dir / f).is_file():
                    raise ConversionError(f"{index}: shard {f} listed in weight_map is missing")
            self._weight_map = weight_map
            return files
        self._weight_map = None
        if (self.dir / "model.safetensors").is_file():
            return ["model.safetensors"]
        bins = [p.name for p in self.dir.glob("pytorch_model*.bin")]
        hint = f" (found {bins[0]}: re-save it with save_pretrained(safe_serialization=True))" if bins else ""
        raise ConversionError(
            f"--input {self.dir}: no model.safetensors or model.safetensors.index.json{hint}"
        )

    def _inventory(self) -> dict[str, TensorInfo]:
        out: dict[str, TensorInfo] = {}
        for fname in self._files():
            try:
                with safe_open(str(self.dir / fname), framework="pt") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        out[name] = TensorInfo(name, tuple(sl.get_shape()), sl.get_dtype(), fname)
            except ConversionError:
                raise
            except Exception as exc:  # noqa: BLE001 - safetensors raises several types
                raise ConversionError(f"{self.dir / fname}: cannot read safetensors header ({exc})") from exc
        if self._weight_map is not None:
            for name, fname in self._weight_map.items():
                if name not in out or out[name].file != fname:
                    raise ConversionError(
                        f"tensor {name}: listed in model.safetensors.index.json under {fname} but not found there"
                    )
        return out

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor. The file is mapped only for this call, so pages read for earlier tensors
        do not accumulate in this process's resident memory."""
        info = self.tensors.get(name)
        if info is None:
            raise ConversionError(f"tensor {name}: missing from {self.dir}")
        with safe_open(str(self.dir / info.file), framework="pt") as handle:
            return handle.get_tensor(name)

    def close(self) -> None:
        """Nothing stays open between ``get`` calls; kept for symmetry."""


def parse_size(text: str | int, field: str = "--max-shard-size") -> int:
    """'5GB' / '500MB' / '1024' -> bytes (decimal units, as transformers)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    if not m:
        raise ConversionError(f"{field}: cannot parse size {text!r} (e.g. 5GB, 500MB)")
    scale = {
        "": 1,
        "B": 1,
        "K": 1e3,
        "KB": 1e3,
        "M": 1e6,
        "MB": 1e6,
        "G": 1e9,
        "GB": 1e9,
        "T": 1e12,
        "TB": 1e12,
    }
    value = int(float(m.group(1)) * scale[m.group(2)])
    if value <= 0:
        raise ConversionError(f"{field}: must be positive, got {text!r}")
    return value


class ShardedSafetensorsWriter:
    """Write tensors in order into size-capped safetensors shards, HF naming and index."""

    def __init__(
        self, out_dir: str | os.PathLike, max_shard_bytes: int, metadata: dict[str, str] | None = None
    ):
        self.dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._buffer or any(name in names for _, names in self._shards):
            raise AssertionError(f"tensor {name} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        fname = f"shard-{len(self._shards):05d}.safetensors.part"
        save_file(self._buffer, str(self.dir / fname), metadata=self.metadata)
        self._shards.append((fname, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard and the index; returns the final file names."""
        if self._buffer or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self.dir / self._shards[0][0], self.dir / "model.safetensors")
            return ["model.safetensors"]
        weight_map, files = {}, []
        for i, (tmp_name, names) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / tmp_name, self.dir / final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return files
