"""What a checkpoint directory is, and the architecture it describes.

Every place that loads a model (``model.load``, the teacher, the tools) accepts either kind:

- ``"hf"``: a Hugging Face folder, ``config.json`` + ``model.safetensors`` (or its sharded index);
  the architecture is the ``config.json``'s.
- ``"megatron"``: a megatron-core distributed checkpoint (``metadata.json``); the architecture is
  the ``model_config.yaml`` written beside every checkpoint this toolkit saves or converts (an older
  checkpoint without one describes no architecture: the recipe's is used as is).

``checkpoint_model_fields`` returns the architecture as ``model`` section fields
(``ModelConfig``); ``ARCH_FIELDS`` are the ones a recipe may not contradict.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml

from rgkd_megatron.convert.common import ConversionError

__all__ = ["ARCH_FIELDS", "checkpoint_kind", "checkpoint_model_fields"]

CheckpointKind = Literal["hf", "megatron"]

ARCH_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "vocab_size",
    "max_position_embeddings",
    "rotary_base",
    "rotary_scaling_factor",
    "norm_epsilon",
    "tie_word_embeddings",
    "add_qkv_bias",
)
"""``model`` fields that define the weights' shapes and the forward pass: taken from the checkpoint."""


def checkpoint_kind(path: str | os.PathLike, field: str = "checkpoint") -> CheckpointKind:
    """'hf' or 'megatron' from the files in ``path``; ConversionError naming ``field`` otherwise."""
    p = Path(path)
    if not p.is_dir():
        raise ConversionError(f"{field}: {path} is not a directory (expected a checkpoint folder)")
    if (p / "metadata.json").is_file():
        return "megatron"
    has_weights = (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()
    if (p / "config.json").is_file() and has_weights:
        return "hf"
    raise ConversionError(
        f"{field}: {path} is neither a megatron-core checkpoint (metadata.json) nor a Hugging Face "
        "folder (config.json + model.safetensors)"
    )


def checkpoint_model_fields(path: str | os.PathLike, field: str = "checkpoint") -> dict[str, Any] | None:
    """The architecture of the checkpoint at ``path`` as ``ARCH_FIELDS`` values; None for a megatron
    checkpoint without ``model_config.yaml``."""
    if checkpoint_kind(path, field) == "hf":
        from rgkd_megatron.convert.hf_io import read_hf_config
        from rgkd_megatron.convert.hf_mapping import model_config_fields, parse_hf_config

        try:
            arch = parse_hf_config(read_hf_config(path))
        except ConversionError as exc:
            raise ConversionError(f"{field}: {path}: {exc}") from None
        fields = model_config_fields(arch, 128)
    else:
        yaml_path = Path(path) / "model_config.yaml"
        if not yaml_path.is_file():
            return None
        try:
            data = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConversionError(f"{yaml_path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            raise ConversionError(f"{yaml_path}: no `model:` section")
        fields = data["model"]
    return {name: fields[name] for name in ARCH_FIELDS if name in fields}
