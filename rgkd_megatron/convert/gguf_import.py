"""Import a GGUF file of a Llama-architecture model into a Hugging Face checkpoint directory.

What comes from maintained libraries, and what is ours:
- ``gguf`` (llama.cpp's Python package) reads the file (``GGUFReader``, memory-mapped), maps tensor
  names (``get_tensor_name_map``: HF module name <-> GGUF name) and dequantizes every ggml type it
  knows (``gguf.quants.dequantize``: Q4_0/Q4_1/Q8_0/K-quants/F16/BF16/...).
- ``transformers`` converts the GGUF tokenizer metadata into a tokenizer (``AutoTokenizer`` with
  ``gguf_file``), saved as ``tokenizer.json`` + ``tokenizer_config.json`` (chat template included).
- Ours: the ``config.json`` from the GGUF metadata (every required field named when missing), the
  streaming tensor loop (one tensor dequantized at a time, written in size-capped safetensors
  shards), and undoing llama.cpp's q/k permutation: its converter reorders the rows of q_proj and
  k_proj within each head from the rotate-half RoPE layout [x_0..x_{d/2-1}, x_{d/2}..x_{d-1}] to
  the interleaved pairs (x_0, x_{d/2}), (x_1, x_{d/2+1}), ... that ggml's RoPE expects; we apply
  the inverse (``unpermute_rope``) so the weights are standard HF Llama weights.

The output is an ordinary HF directory (``config.json``, ``generation_config.json``, safetensors,
tokenizer files, ``gguf_import.json`` recording the source file and its tensor types), ready for
``transformers`` and for ``convert_hf_to_mcore``. Dequantized values are exact in fp32 (the
default); ``--dtype bf16`` rounds them.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rgkd_megatron.convert.common import (
    ConversionError,
    atomic_output_dir,
    check_destination,
    dtype_name,
    parse_dtype,
)
from rgkd_megatron.convert.hf_io import ShardedSafetensorsWriter, parse_size
from rgkd_megatron.convert.hf_mapping import hf_shapes, parse_hf_config
from rgkd_megatron.utils.logging import get_logger
from rgkd_megatron.utils.progress import ProgressBar

logger = get_logger(__name__)

__all__ = ["gguf_config", "import_gguf", "unpermute_rope"]

SUPPORTED_GGUF_ARCHITECTURES = ("llama",)


def unpermute_rope(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute`` of q/k rows: per head, interleaved pairs -> rotate-half halves.

    llama.cpp: ``w.reshape(n, 2, d // n // 2, *rest).swapaxes(1, 2).reshape(w.shape)``."""
    rows = weight.shape[0]
    head_dim = rows // num_heads
    rest = weight.shape[1:]
    return weight.reshape(num_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


class _Fields:
    def __init__(self, reader: Any, path: Path) -> None:
        self.reader, self.path = reader, path

    def get(self, name: str, default: Any = ..., kind: type | tuple = (int, float, str, bool)) -> Any:
        field = self.reader.fields.get(name)
        if field is None:
            if default is ...:
                raise ConversionError(f"{self.path.name}: GGUF metadata field {name} is missing")
            return default
        value = field.contents()
        if kind is not None and not isinstance(value, kind):
            raise ConversionError(
                f"{self.path.name}: GGUF metadata field {name}={value!r} has the wrong type"
            )
        return value


def gguf_config(reader: Any, path: Path) -> dict[str, Any]:
    """An HF LlamaConfig dict from the GGUF metadata (llama.* and tokenizer.ggml.* fields)."""
    f = _Fields(reader, path)
    arch = f.get("general.architecture", kind=str)
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ConversionError(
            f"{path.name}: general.architecture={arch!r}: unsupported (supported: {SUPPORTED_GGUF_ARCHITECTURES})"
        )
    if f.get(f"{arch}.rope.scaling.type", None, kind=str) not in (None, "none"):
        raise ConversionError(
            f"{path.name}: {arch}.rope.scaling.type: RoPE scaling is not supported by the importer"
        )
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = f.get(f"{arch}.vocab_size", len(tokens.data) if tokens is not None else ..., kind=int)
    heads = f.get(f"{arch}.attention.head_count", kind=int)
    hidden = f.get(f"{arch}.embedding_length", kind=int)
    rope_dim = f.get(f"{arch}.rope.dimension_count", None, kind=int)
    if rope_dim is not None and heads and rope_dim != hidden // heads:
        raise ConversionError(
            f"{path.name}: {arch}.rope.dimension_count={rope_dim}: partial rotary embeddings are not supported"
        )
    names = {t.name for t in reader.tensors}
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": f.get(f"{arch}.feed_forward_length", kind=int),
        "num_hidden_layers": f.get(f"{arch}.block_count", kind=int),
        "num_attention_heads": heads,
        "num_key_value_heads": f.get(f"{arch}.attention.head_count_kv", heads, kind=int),
        "max_position_embeddings": f.get(f"{arch}.context_length", kind=int),
        "rms_norm_eps": float(f.get(f"{arch}.attention.layer_norm_rms_epsilon", kind=float)),
        "rope_theta": float(f.get(f"{arch}.rope.freq_base", 10000.0, kind=(int, float))),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": f.get("tokenizer.ggml.bos_token_id", None, kind=int),
        "eos_token_id": f.get("tokenizer.ggml.eos_token_id", None, kind=int),
        "pad_token_id": f.get("tokenizer.ggml.padding_token_id", None, kind=int),
    }
    return cfg


def _gguf_names(cfg: dict[str, Any], num_layers: int) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name, from gguf's own name table."""
    import gguf

    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, num_layers)
    out = {}
    for hf_name in hf_shapes(parse_hf_config(cfg)):
        module, _, suffix = hf_name.rpartition(".")
        name = table.get_name(module)
        if name is None:
            raise AssertionError(f"gguf has no name for {module}")
        out[hf_name] = f"{name}.{suffix}"
    return out


def _save_tokenizer(src: Path, out_dir: Path, vocab_size: int) -> list[str]:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types here
        raise ConversionError(f"{src.name}: transformers could not build the tokenizer ({exc})") from exc
    if len(tokenizer) > vocab_size:
        raise ConversionError(
            f"{src.name}: tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size={vocab_size}"
        )
    before = set(os.listdir(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return sorted(set(os.listdir(out_dir)) - before)


def import_gguf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: str | None = "fp32",
    max_shard_size: str | int = "5GB",
    tokenizer: bool = True,
    dry_run: bool = False,
) -> dict[str, Any]:
    """GGUF file -> HF checkpoint directory; returns a report (config, tensor types, seconds).
    ``dry_run``: the metadata and tensor names checked, nothing dequantized or written."""
    import gguf

    src = Path(src)
    if not src.is_file():
        raise ConversionError(f"--input {src}: no such file")
    start = time.perf_counter()
    try:
        reader = gguf.GGUFReader(str(src))
    except Exception as exc:  # noqa: BLE001 - gguf raises ValueError / struct errors
        raise ConversionError(f"--input {src}: not a readable GGUF file ({exc})") from exc
    cfg = gguf_config(reader, src)
    arch = parse_hf_config(cfg)
    out_dtype = parse_dtype(dtype) or torch.float32
    cfg["torch_dtype"] = dtype_name(out_dtype)
    max_bytes = parse_size(max_shard_size)
    shapes = hf_shapes(arch)
    to_gguf = _gguf_names(cfg, arch.num_layers)
    by_gguf = {t.name: t for t in reader.tensors}
    missing = [f"{g} (-> {h})" for h, g in to_gguf.items() if g not in by_gguf]
    extra = sorted(set(by_gguf) - set(to_gguf.values()))
    if missing or extra:
        parts = ([f"missing tensor(s) {', '.join(missing)}"] if missing else []) + (
            [f"unexpected tensor(s) {', '.join(extra)}"] if extra else []
        )
        raise ConversionError(f"{src.name}: " + "; ".join(parts))
    dst = check_destination(dst).resolve()
    if dry_run:
        types = dict(Counter(t.tensor_type.name for t in reader.tensors))
        return {"dry_run": True, "source": str(src.resolve()), "dst": str(dst), "config": cfg,
                "tensors": len(to_gguf), "tensor_types": types, "dtype": dtype_name(out_dtype)}  # fmt: skip
    q_heads, kv_heads = arch.num_heads, arch.num_kv_heads
    with atomic_output_dir(dst) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_bytes, metadata={"rgkd_source": src.name})
        with ProgressBar(total=len(to_gguf), desc="gguf->hf", unit="tensor") as bar:
            for hf_name, gguf_name in to_gguf.items():
                t = by_gguf[gguf_name]
                try:
                    values = gguf.quants.dequantize(t.data, t.tensor_type)
                except (NotImplementedError, ValueError, TypeError) as exc:
                    raise ConversionError(
                        f"tensor {gguf_name}: cannot dequantize ggml type {t.tensor_type.name} ({exc})"
                    ) from exc
                numpy_shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists ne0 (columns) first
                if numpy_shape != shapes[hf_name] or values.size != np.prod(numpy_shape):
                    raise ConversionError(
                        f"tensor {gguf_name}: shape {list(numpy_shape)}, expected {list(shapes[hf_name])} for {hf_name}"
                    )
                array = np.ascontiguousarray(values, dtype=np.float32).reshape(numpy_shape)
                tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
                if hf_name.endswith("q_proj.weight"):
                    tensor = unpermute_rope(tensor, q_heads)
                elif hf_name.endswith("k_proj.weight"):
                    tensor = unpermute_rope(tensor, kv_heads)
                writer.add(hf_name, tensor.to(out_dtype))
                bar.update(1)
        files = writer.close()
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        generation = {
            k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg[k] is not None
        }
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tokenizer_files = _save_tokenizer(src, tmp, arch.vocab_size) if tokenizer else []
        seconds = time.perf_counter() - start
        report = {
            "source": str(src.resolve()),
            "source_bytes": src.stat().st_size,
            "general": {k: _Fields(reader, src).get(k, None) for k in ("general.name", "general.license")},
            "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
            "qk_rope_permutation": "undone (llama.cpp interleaved -> HF rotate-half)",
            "dtype": dtype_name(out_dtype),
            "files": files,
            "tokenizer_files": tokenizer_files,
            "seconds": round(seconds, 2),
        }
        (tmp / "gguf_import.json").write_text(json.dumps(report, indent=1) + "\n")
    logger.info("gguf->hf: wrote %s in %.1f s", dst, seconds)
    return {**report, "config": cfg, "dst": str(dst)}
