"""Hugging Face (safetensors + config.json) -> megatron-core distributed checkpoint.

Steps, all checks before anything is written:
1. ``config.json`` -> architecture (``hf_mapping.parse_hf_config``; unsupported features named);
   TP must divide heads, query groups and the FFN width, PP the layers.
2. The safetensors inventory (headers only) against the architecture: every missing, extra or
   mis-shaped tensor and every unsupported dtype is reported by name. A tied checkpoint may carry
   ``lm_head.weight`` only if it equals the embedding.
3. A meta-device policy (``build_policy_skeleton``, vocabulary padded for ``tp``) gives megatron's
   own checkpoint layout; ``lazy_save.save_lazily`` writes it, each chunk built on demand from the
   HF tensors (``hf_mapping.pack``). Peak memory: about one layer's largest tensor.
4. Next to the checkpoint: ``model_config.yaml`` (the ``model`` section for ``rgkd-train``, with
   ``load`` set to the destination), ``hf_config.json`` (the source config, used on the way back),
   ``rgkd_convert.json`` (what was done) and the tokenizer / generation-config files.

The output directory is assembled under a temporary name and renamed when complete.
The checkpoint is layout-independent: it loads at any TP/PP (``--tp`` only sets the vocab padding,
and megatron pads/crops the embedding rows when loading at another TP).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from rgkd_megatron.checkpoint.manifest import write_manifest
from rgkd_megatron.convert.common import (
    ConversionError,
    atomic_output_dir,
    check_destination,
    copy_aux_files,
    dtype_name,
    parse_dtype,
    single_process_group,
)
from rgkd_megatron.convert.hf_io import HFCheckpoint
from rgkd_megatron.convert.hf_mapping import (
    IGNORED_HF_SUFFIXES,
    LlamaFamily,
    Rule,
    hf_shapes,
    mapping_rules,
    mcore_shape,
    model_config_fields,
    pack,
    padded_vocab,
    parse_hf_config,
    validate_layout,
)
from rgkd_megatron.convert.plan import conversion_plan
from rgkd_megatron.utils.logging import get_logger

logger = get_logger(__name__)

__all__ = ["check_inventory", "convert_hf_to_mcore", "model_config_yaml"]

_PARAMS_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
MAX_LISTED_PROBLEMS = 12


def check_inventory(ckpt: HFCheckpoint, arch: LlamaFamily) -> None:
    """Missing, extra or mis-shaped tensors, unsupported dtypes, an untied lm_head in a tied model."""
    expected = hf_shapes(arch)
    problems = []
    for name, shape in expected.items():
        info = ckpt.tensors.get(name)
        if info is None:
            problems.append(f"tensor {name}: missing")
        elif info.shape != shape:
            problems.append(f"tensor {name}: shape {list(info.shape)}, expected {list(shape)}")
    for name, info in ckpt.tensors.items():
        if name in expected or name.endswith(IGNORED_HF_SUFFIXES):
            continue
        if name == "lm_head.weight" and arch.tie_word_embeddings:
            if info.shape != expected["model.embed_tokens.weight"]:
                problems.append(
                    f"tensor lm_head.weight: shape {list(info.shape)} differs from the embedding's"
                )
            continue
        problems.append(f"tensor {name}: unexpected for {arch.architecture} with this config.json")
    if problems:
        more = len(problems) - MAX_LISTED_PROBLEMS
        listed = "; ".join(problems[:MAX_LISTED_PROBLEMS]) + (f"; ... and {more} more" if more > 0 else "")
        raise ConversionError(f"{ckpt.dir}: {listed}")
    for name in expected:
        ckpt.tensors[name].torch_dtype  # noqa: B018 - raises ConversionError naming an unsupported dtype
    if arch.tie_word_embeddings and "lm_head.weight" in ckpt.tensors:
        ckpt.tensors["lm_head.weight"].torch_dtype  # noqa: B018
        if not torch.equal(ckpt.get("lm_head.weight"), ckpt.get("model.embed_tokens.weight")):
            raise ConversionError(
                "tensor lm_head.weight: differs from model.embed_tokens.weight although config.json has "
                "tie_word_embeddings=true"
            )


def _output_dtype(requested: str | None, ckpt: HFCheckpoint) -> torch.dtype:
    dtype = parse_dtype(requested)
    if dtype is not None:
        return dtype
    source = ckpt.tensors["model.embed_tokens.weight"].torch_dtype
    if source == torch.float64:
        raise ConversionError("tensor model.embed_tokens.weight: float64 source, pass --dtype fp32|bf16|fp16")
    mixed = {i.dtype for n, i in ckpt.tensors.items() if not n.endswith(IGNORED_HF_SUFFIXES)}
    if len(mixed) > 1:
        logger.warning("source tensors have mixed dtypes %s: all are cast to %s", sorted(mixed), source)
    return source


def model_config_yaml(fields: dict[str, Any], comment: str) -> str:
    """The ``model`` section as YAML, preceded by ``comment`` lines."""
    header = "".join(f"# {line}\n" if line else "#\n" for line in comment.splitlines())
    return header + yaml.safe_dump({"model": fields}, sort_keys=False)


def _make_resolver(ckpt: HFCheckpoint, arch: LlamaFamily, rules: list[Rule], padded: int, dtype: torch.dtype):
    by_key = {r.key: r for r in rules}
    cache: dict[tuple[str, int | None], torch.Tensor] = {}

    def resolve(key: str, offset: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        rule = by_key[key]
        layer = offset[0] if rule.per_layer else None
        full = cache.get((key, layer))
        if full is None:
            cache.clear()  # chunks of one tensor come together (fc1: gate then up)
            full = pack(rule, arch, [ckpt.get(n).to(dtype) for n in rule.hf_names(layer)], padded)
            cache[(key, layer)] = full
        inner_offset, inner_sizes = (offset[1:], sizes[1:]) if rule.per_layer else (offset, sizes)
        index = tuple(slice(o, o + s) for o, s in zip(inner_offset, inner_sizes))
        return full[index].reshape(sizes)

    return resolve


def _check_skeleton(sharded_sd: dict, rules: list[Rule], arch: LlamaFamily, padded: int) -> None:
    """megatron's checkpoint layout must be exactly the one the mapping describes."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    found: dict[str, tuple[int, ...] | None] = {}
    for value in nested_values(sharded_sd):
        if isinstance(value, ShardedTensor):
            found[value.key] = tuple(value.global_shape)
        elif isinstance(value, ShardedTensorFactory):
            found[value.key] = None  # SwiGLU fc1: shape checked after the factory splits it
    expected = {
        r.key: (
            (arch.num_layers, *mcore_shape(r, arch, padded)) if r.per_layer else mcore_shape(r, arch, padded)
        )
        for r in rules
    }
    if set(found) != set(expected):
        raise AssertionError(
            f"megatron-core checkpoint layout changed: unmapped {sorted(set(found) - set(expected))}, "
            f"absent {sorted(set(expected) - set(found))}"
        )
    for key, shape in found.items():
        if shape is not None and shape != expected[key]:
            raise AssertionError(
                f"megatron-core tensor {key}: global shape {shape}, mapping says {expected[key]}"
            )


def convert_hf_to_mcore(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    tp: int = 1,
    pp: int = 1,
    dtype: str | None = "auto",
    make_vocab_size_divisible_by: int = 128,
    dry_run: bool = False,
    ignore_sliding_window: bool = False,
) -> dict[str, Any]:
    """Convert; returns the plan (``plan.conversion_plan``) plus, when written, ``seconds`` and ``dst``."""
    ckpt = HFCheckpoint(src)
    arch = parse_hf_config(ckpt.config, ignore_sliding_window=ignore_sliding_window)
    validate_layout(arch, tp, pp)
    if isinstance(make_vocab_size_divisible_by, bool) or make_vocab_size_divisible_by < 1:
        raise ConversionError(
            f"--make-vocab-size-divisible-by: expected a positive integer, got {make_vocab_size_divisible_by!r}"
        )
    check_inventory(ckpt, arch)
    out_dtype = _output_dtype(dtype, ckpt)
    rules = mapping_rules(arch)
    padded = padded_vocab(arch, make_vocab_size_divisible_by, tp)
    plan = conversion_plan(arch, rules, padded, out_dtype, tp, pp)
    if dry_run:
        return plan
    dst = check_destination(dst).resolve()
    fields = model_config_fields(arch, make_vocab_size_divisible_by)
    start = time.perf_counter()
    from rgkd_megatron.checkpoint.dist_ckpt import model_sharded_state_dict
    from rgkd_megatron.config.schema import ModelConfig, ParallelConfig
    from rgkd_megatron.convert.lazy_save import save_lazily
    from rgkd_megatron.models.builders import build_policy_skeleton

    with atomic_output_dir(dst) as tmp, single_process_group() as groups:
        skeleton_cfg = ModelConfig(
            **{**fields, "make_vocab_size_divisible_by": make_vocab_size_divisible_by * tp},
            spec="local",
            params_dtype=_PARAMS_DTYPE[out_dtype],
        )
        skeleton = build_policy_skeleton(skeleton_cfg, ParallelConfig(), groups, arch.vocab_size)
        skeleton.to(out_dtype)  # the local spec's torch norms are created in fp32 whatever params_dtype
        sharded_sd = model_sharded_state_dict(skeleton)
        _check_skeleton(sharded_sd, rules, arch, padded)
        resolve = _make_resolver(ckpt, arch, rules, padded, out_dtype)
        save_lazily(sharded_sd, tmp, resolve, desc="hf->mcore")
        ckpt.close()
        copied = copy_aux_files(src, tmp)
        tokenizer_note = (
            f"The tokenizer files are in this directory too: data.tokenizer={dst}"
            if "tokenizer.json" in copied or "tokenizer.model" in copied
            else "No tokenizer files were found next to the source: set data.tokenizer yourself."
        )
        comment = (
            f"Model section for rgkd-train, written by tools/convert_checkpoint.py --to mcore from\n"
            f"{Path(src).resolve()} ({arch.architecture}).\n"
            f"Vocabulary {arch.vocab_size} rows, stored padded to {padded} (tp={tp}); loads at any TP/PP.\n"
            "Use: copy this block into your recipe (params_dtype/spec/recompute keep their defaults),\n"
            "or pass the fields as dotted overrides: model.load=... model.num_layers=... etc.\n"
            + tokenizer_note
        )
        (tmp / "model_config.yaml").write_text(model_config_yaml({**fields, "load": str(dst)}, comment))
        (tmp / "hf_config.json").write_text(json.dumps(ckpt.config, indent=2) + "\n")
        seconds = time.perf_counter() - start
        meta = {
            "direction": "hf->mcore",
            "source": str(Path(src).resolve()),
            "architecture": arch.architecture,
            "tp": tp,
            "pp": pp,
            "dtype": dtype_name(out_dtype),
            "vocab_size": arch.vocab_size,
            "padded_vocab_size": padded,
            "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
            "aux_files": copied,
            "seconds": round(seconds, 2),
        }
        (tmp / "rgkd_convert.json").write_text(json.dumps(meta, indent=1) + "\n")
        write_manifest(tmp)  # model.load and --to hf verify the files against it
    logger.info("hf->mcore: wrote %s in %.1f s", dst, seconds)
    return {**plan, "seconds": seconds, "dst": str(dst)}
