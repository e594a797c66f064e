"""Student initialisation from a teacher: depth pruning and optional FFN-width reduction (HF -> HF).

- Depth: keep a chosen subset of the teacher's layers (``keep_layers``, strictly increasing), or
  ``num_layers`` evenly spaced ones (always the first and the last: round(i * (L-1) / (n-1))).
  Kept layer ``keep[k]`` becomes layer ``k``; embeddings, final norm and output layer are copied.
- Width (optional, ``ffn_hidden_size`` < the teacher's): per kept layer, keep the SwiGLU neurons j
  with the largest data-free magnitude score ``||gate_j|| * ||up_j|| * ||down_:,j||`` (L2 norms of
  gate/up rows and the down column: an upper bound of the neuron's output for unit-norm input),
  in their original order. Removing neuron j is exactly zeroing its gate row (silu(0) = 0).
- What was kept is recorded in ``prune_metadata.json`` (source, kept layers, per-layer kept FFN
  indices, criterion) and, as a short summary, in the safetensors header metadata.

Streams layer by layer through ``hf_io`` (one layer in memory besides the output shard buffer);
the output is an HF directory (config updated: ``num_hidden_layers``, ``intermediate_size``,
``layer_types`` if present; tokenizer files copied), ready for ``convert_hf_to_mcore``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from rgkd_megatron.convert.common import (
    ConversionError,
    atomic_output_dir,
    check_destination,
    copy_aux_files,
)
from rgkd_megatron.convert.hf_io import HFCheckpoint, ShardedSafetensorsWriter, parse_size
from rgkd_megatron.convert.hf_mapping import hf_shapes, parse_hf_config
from rgkd_megatron.convert.hf_to_mcore import check_inventory
from rgkd_megatron.utils.logging import get_logger
from rgkd_megatron.utils.progress import ProgressBar

logger = get_logger(__name__)

__all__ = ["evenly_spaced_layers", "ffn_neuron_scores", "prune_checkpoint"]

CRITERION = "magnitude: ||gate_j||_2 * ||up_j||_2 * ||down_:,j||_2, top-k, original order"


def evenly_spaced_layers(total: int, keep: int) -> list[int]:
    """``keep`` layer indices spread over ``total``, first and last included."""
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= total:
        raise ConversionError(f"--num-layers: expected an integer in [1, {total}], got {keep!r}")
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def _check_keep_layers(keep: Sequence[int], total: int) -> list[int]:
    keep = list(keep)
    if not keep:
        raise ConversionError("--keep-layers: empty")
    for i in keep:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < total:
            raise ConversionError(f"--keep-layers: layer {i!r} out of range [0, {total - 1}]")
    if any(b <= a for a, b in zip(keep, keep[1:])):
        raise ConversionError(f"--keep-layers: must be strictly increasing, got {keep}")
    return keep


def ffn_neuron_scores(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Score per SwiGLU neuron: gate [f, h], up [f, h], down [h, f] -> [f] (float32)."""
    g, u, d = (t.float() for t in (gate, up, down))
    return g.norm(dim=1) * u.norm(dim=1) * d.norm(dim=0)


def _dumps(metadata: dict[str, Any]) -> str:
    """JSON with one line per field (and per layer for the neuron lists): readable, diffable."""
    lines = []
    for key, value in metadata.items():
        if isinstance(value, dict) and value:
            inner = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items())
            lines.append(f" {json.dumps(key)}: {{\n{inner}\n }}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def prune_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    keep_layers: Sequence[int] | None = None,
    num_layers: int | None = None,
    ffn_hidden_size: int | None = None,
    max_shard_size: str | int = "5GB",
    dry_run: bool = False,
) -> dict[str, Any]:
    """Prune an HF teacher into an HF student; returns the metadata written to prune_metadata.json
    (``dry_run``: every check, nothing written; the layers and width that would be kept)."""
    ckpt = HFCheckpoint(src)
    arch = parse_hf_config(ckpt.config, ignore_sliding_window=True)
    if (keep_layers is None) == (num_layers is None):
        raise ConversionError("give exactly one of --keep-layers and --num-layers")
    keep = (
        _check_keep_layers(keep_layers, arch.num_layers)
        if keep_layers is not None
        else evenly_spaced_layers(arch.num_layers, num_layers)
    )
    width = arch.ffn_hidden_size if ffn_hidden_size is None else ffn_hidden_size
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= arch.ffn_hidden_size:
        raise ConversionError(
            f"--ffn-hidden-size: expected an integer in [1, {arch.ffn_hidden_size}], got {ffn_hidden_size!r}"
        )
    check_inventory(ckpt, arch)
    expected = hf_shapes(arch)
    max_bytes = parse_size(max_shard_size)
    dst = check_destination(dst).resolve()
    if dry_run:
        ckpt.close()
        return {"dry_run": True, "source": str(Path(src).resolve()), "output": str(dst),
                "source_num_layers": arch.num_layers, "kept_layers": keep,
                "source_ffn_hidden_size": arch.ffn_hidden_size, "ffn_hidden_size": width}  # fmt: skip
    start = time.perf_counter()
    kept_neurons: dict[int, list[int]] = {}
    summary = {"rgkd_prune_kept_layers": ",".join(map(str, keep)), "rgkd_prune_ffn_hidden_size": str(width)}
    with atomic_output_dir(dst) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_bytes, metadata=summary)
        writer.add("model.embed_tokens.weight", ckpt.get("model.embed_tokens.weight"))
        with ProgressBar(total=len(keep), desc="prune", unit="layer") as bar:
            for new, old in enumerate(keep):
                prefix, new_prefix = f"model.layers.{old}.", f"model.layers.{new}."
                names = [n for n in expected if n.startswith(prefix)]
                tensors = {n[len(prefix) :]: ckpt.get(n) for n in names}
                if width < arch.ffn_hidden_size:
                    scores = ffn_neuron_scores(
                        tensors["mlp.gate_proj.weight"],
                        tensors["mlp.up_proj.weight"],
                        tensors["mlp.down_proj.weight"],
                    )
                    idx = torch.sort(torch.topk(scores, width).indices).values
                    kept_neurons[new] = idx.tolist()
                    tensors["mlp.gate_proj.weight"] = tensors["mlp.gate_proj.weight"][idx]
                    tensors["mlp.up_proj.weight"] = tensors["mlp.up_proj.weight"][idx]
                    tensors["mlp.down_proj.weight"] = tensors["mlp.down_proj.weight"][:, idx]
                for rest, tensor in tensors.items():
                    writer.add(new_prefix + rest, tensor)
                bar.update(1)
        writer.add("model.norm.weight", ckpt.get("model.norm.weight"))
        if not arch.tie_word_embeddings:
            writer.add("lm_head.weight", ckpt.get("lm_head.weight"))
        files = writer.close()
        cfg = dict(ckpt.config)
        cfg["num_hidden_layers"] = len(keep)
        cfg["intermediate_size"] = width
        if isinstance(cfg.get("layer_types"), list) and len(cfg["layer_types"]) == arch.num_layers:
            cfg["layer_types"] = [cfg["layer_types"][i] for i in keep]
        if isinstance(cfg.get("max_window_layers"), int):  # Qwen2: layers below this use full attention
            cfg["max_window_layers"] = sum(1 for i in keep if i < cfg["max_window_layers"])
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        copied = copy_aux_files(src, tmp)
        metadata = {
            "source": str(Path(src).resolve()),
            "source_num_layers": arch.num_layers,
            "kept_layers": keep,
            "source_ffn_hidden_size": arch.ffn_hidden_size,
            "ffn_hidden_size": width,
            "ffn_criterion": CRITERION if width < arch.ffn_hidden_size else None,
            "ffn_kept_neurons": {str(k): v for k, v in kept_neurons.items()},
            "files": files,
            "aux_files": copied,
            "seconds": round(time.perf_counter() - start, 2),
        }
        (tmp / "prune_metadata.json").write_text(_dumps(metadata))
    ckpt.close()
    logger.info(
        "prune: kept layers %s of %d, ffn %d -> %d: %s",
        keep,
        arch.num_layers,
        arch.ffn_hidden_size,
        width,
        dst,
    )
    return metadata
