"""Load weights into an already-built (possibly TP/PP-sharded) model from either kind of checkpoint.

``load_weights(path, model)`` is what every command calls to initialise a model: a megatron-core
checkpoint goes through ``dist_checkpointing`` (``load_model_weights``), a Hugging Face folder
through the HF -> megatron mapping, in memory. For the latter each rank asks its own model which
chunks it holds (megatron-core's sharded state dict: checkpoint key, global offset, local shape, as
for a megatron checkpoint) and builds just those from the safetensors tensors, one HF tensor at a
time (``hf_to_mcore``'s resolver), so no temporary megatron checkpoint is written and a rank reads
only its layers. The vocabulary is padded to the model's embedding rows.
"""

from __future__ import annotations

import os

import torch

from rgkd_megatron.convert.common import ConversionError
from rgkd_megatron.convert.detect import checkpoint_kind

__all__ = ["load_backbone", "load_hf_weights", "load_weights"]


def load_hf_weights(
    path: str | os.PathLike, model: torch.nn.Module | None, skip_prefix: str | None = None
) -> None:
    """Fill ``model``'s local shards from the Hugging Face folder ``path`` (not collective; a rank
    without the model passes None). Keys starting with ``skip_prefix`` keep their values."""
    if model is None:
        return
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factory_merges
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess

    from rgkd_megatron.checkpoint.dist_ckpt import model_sharded_state_dict
    from rgkd_megatron.convert.hf_io import HFCheckpoint
    from rgkd_megatron.convert.hf_mapping import EMBED, OUTPUT, mapping_rules, parse_hf_config
    from rgkd_megatron.convert.hf_to_mcore import _make_resolver, check_inventory

    ckpt = HFCheckpoint(path)
    arch = parse_hf_config(ckpt.config)
    check_inventory(ckpt, arch)
    rules = mapping_rules(arch)
    sharded, _, factories = load_preprocess(model_sharded_state_dict(model))
    tensors = [v for v in nested_values(sharded) if isinstance(v, ShardedTensor)]
    vocab_rows = [t.global_shape[0] for t in tensors if t.key in (EMBED, OUTPUT)]
    padded = vocab_rows[0] if vocab_rows else arch.vocab_size  # the model's padded vocabulary
    resolve = _make_resolver(ckpt, arch, rules, padded, torch.float32)
    known = {r.key for r in rules}
    for sh in sorted(tensors, key=lambda t: (t.key, t.global_offset)):  # fc1: gate and up together
        if skip_prefix and sh.key.startswith(skip_prefix):
            continue
        if sh.key not in known:
            raise ConversionError(f"{path}: the model has tensor {sh.key}, which {arch.architecture} lacks")
        sizes = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
        sh.data = resolve(sh.key, tuple(sh.global_offset), sizes).reshape(sh.local_shape).to(sh.dtype)
    dict_list_map_inplace(lambda v: v.data if isinstance(v, ShardedTensor) else None, sharded)
    state = apply_factory_merges(sharded, factories)
    state = {k: v for k, v in state.items() if v is not None}
    missing, unexpected = model.load_state_dict(state, strict=False)
    skipped = [k for k in missing if not k.endswith("_extra_state")]
    if skip_prefix:
        skipped = [k for k in skipped if not k.startswith(skip_prefix)]
    if skipped or unexpected:
        raise ConversionError(f"{path}: load mismatch: missing {skipped}, unexpected {unexpected}")


def load_weights(path: str | os.PathLike, model: torch.nn.Module | None, field: str = "model.load") -> None:
    """Initialise ``model`` from a megatron checkpoint or a Hugging Face folder (detected by its
    files). Collective over the world for a megatron checkpoint: every rank calls it, a rank that
    holds no such model with None."""
    if checkpoint_kind(path, field) == "hf":
        load_hf_weights(path, model)
    else:
        from rgkd_megatron.checkpoint.dist_ckpt import load_model_weights

        load_model_weights(path, model)


def load_backbone(path: str | os.PathLike, model: torch.nn.Module | None, field: str = "model.load") -> None:
    """Every weight but the output layer (a reward model initialised from a policy checkpoint)."""
    if checkpoint_kind(path, field) == "hf":
        load_hf_weights(path, model, skip_prefix="output_layer.")
    else:
        from rgkd_megatron.checkpoint.dist_ckpt import load_backbone_weights

        load_backbone_weights(path, model)
