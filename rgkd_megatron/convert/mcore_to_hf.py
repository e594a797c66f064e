"""megatron-core distributed checkpoint -> Hugging Face (safetensors shards + config.json).

Works on a checkpoint written by ``convert_hf_to_mcore`` and on a training checkpoint
(``runs/X/checkpoints/iter_*``: only the model tensors are read, optimizer state is ignored), at
whatever TP/PP it was saved: dist checkpoints store global tensors.

The HF config comes from, in order: ``--hf-config`` (a config.json, e.g. the original model's);
``SRC/hf_config.json`` (written by the HF -> mcore conversion: a round trip gives the same file);
``--model-config`` (a YAML with a ``model`` section: ``model_config.yaml`` or a run's
``config.yaml``); ``SRC/model_config.yaml``; ``SRC/../../config.yaml`` (a training run's resolved
config). A config built from a ``model`` section is a Llama (or Qwen2 with ``add_qkv_bias``) config.

Every expected tensor is checked against the checkpoint's metadata (names and global shapes)
before anything is written; the embedding may have any number of padded rows >= ``vocab_size``,
which are dropped. Reading is per layer (one ``dist_checkpointing.load`` of that layer's slices),
writing in size-capped shards, so memory stays around one layer plus one output shard.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from rgkd_megatron.checkpoint.manifest import verify_checkpoint
from rgkd_megatron.convert.common import (
    ConversionError,
    atomic_output_dir,
    check_destination,
    copy_aux_files,
    dtype_name,
    parse_dtype,
    single_process_group,
)
from rgkd_megatron.convert.hf_io import ShardedSafetensorsWriter, parse_size
from rgkd_megatron.convert.hf_mapping import (
    EMBED,
    OUTPUT,
    LlamaFamily,
    Rule,
    hf_config_from_model_fields,
    mapping_rules,
    mcore_shape,
    parse_hf_config,
    unpack,
    validate_layout,
)
from rgkd_megatron.convert.plan import conversion_plan
from rgkd_megatron.utils.jsonl import read_json
from rgkd_megatron.utils.logging import get_logger
from rgkd_megatron.utils.progress import ProgressBar

logger = get_logger(__name__)

__all__ = ["convert_mcore_to_hf", "find_hf_config", "read_checkpoint_metadata"]

_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")


def read_checkpoint_metadata(src: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Tensor key -> (global shape, dtype) of a torch_dist checkpoint, from its metadata only."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not src.is_dir():
        raise ConversionError(f"--input {src}: not a directory")
    if not (src / "metadata.json").is_file() or not (src / ".metadata").is_file():
        raise ConversionError(
            f"--input {src}: not a megatron-core distributed checkpoint (no metadata.json / .metadata)"
        )
    backend = json.loads((src / "metadata.json").read_text()).get("sharded_backend")
    if backend != "torch_dist":
        raise ConversionError(
            f"{src / 'metadata.json'}: sharded_backend={backend!r}, only torch_dist is supported"
        )
    metadata = FileSystemReader(str(src)).read_metadata()
    return {
        key: (tuple(meta.size), meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }


def _model_section(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConversionError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ConversionError(f"{path}: no `model:` section")
    from rgkd_megatron.config.schema import ModelConfig

    fields = {**vars(ModelConfig()), **data["model"]}
    return fields


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path)
    except ValueError as exc:  # names the file and line
        raise ConversionError(str(exc)) from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return data


def find_hf_config(
    src: Path, hf_config: str | None, model_config: str | None, vocab_size: int | None
) -> tuple[dict[str, Any], str]:
    """The HF config for ``src`` (see the module docstring for the order) and where it came from."""
    if hf_config:
        path = Path(hf_config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ConversionError(f"--hf-config {hf_config}: no such file")
        cfg, origin = _read_json(path), str(path)
    elif (src / "hf_config.json").is_file():
        cfg, origin = _read_json(src / "hf_config.json"), str(src / "hf_config.json")
    else:
        candidates = (
            [Path(model_config)]
            if model_config
            else [src / "model_config.yaml", src.parent.parent / "config.yaml"]
        )
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ConversionError(
                f"--input {src}: no hf_config.json or model_config.yaml here and none given: pass --hf-config "
                "(a config.json) or --model-config (a YAML with a model section)"
                if not model_config
                else f"--model-config {model_config}: no such file"
            )
        fields = _model_section(found)
        if vocab_size is not None:
            fields["vocab_size"] = vocab_size
        elif fields.get("vocab_size") is None and (tokenizer_dir := _run_tokenizer(src)) != src:
            from rgkd_megatron.data.tokenizer import load_tokenizer

            fields["vocab_size"] = load_tokenizer(str(tokenizer_dir)).vocab_size  # as the run resolved it
        cfg, origin = hf_config_from_model_fields(fields, dtype=None), str(found)
    if vocab_size is not None:
        cfg["vocab_size"] = vocab_size
    return cfg, origin


def _check_checkpoint(
    meta: dict[str, tuple[tuple[int, ...], torch.dtype]], arch: LlamaFamily, rules: list[Rule], src: Path
) -> int:
    """Every mapped tensor present with the right global shape; returns the padded vocab size."""
    problems = []
    embed = meta.get(EMBED)
    padded = embed[0][0] if embed else arch.vocab_size
    if embed and padded < arch.vocab_size:
        problems.append(f"tensor {EMBED}: {padded} rows, fewer than vocab_size={arch.vocab_size}")
    for rule in rules:
        shape = mcore_shape(rule, arch, padded)
        expected = (arch.num_layers, *shape) if rule.per_layer else shape
        if rule.key not in meta:
            problems.append(f"tensor {rule.key}: missing from the checkpoint")
        elif meta[rule.key][0] != expected:
            problems.append(
                f"tensor {rule.key}: global shape {list(meta[rule.key][0])}, expected {list(expected)}"
            )
    keys = {r.key for r in rules}
    for key in meta:
        if key.startswith(_MODEL_PREFIXES) and key not in keys:
            why = " (config has tie_word_embeddings=true)" if key == OUTPUT else ""
            problems.append(f"tensor {key}: unexpected for {arch.architecture} with this config{why}")
    if problems:
        raise ConversionError(f"{src}: " + "; ".join(problems))
    return padded


def role_tensors(meta: dict[str, Any], role: str | None, src: Path) -> tuple[dict[str, Any], str]:
    """(the metadata of one role's model with its key prefix dropped, that prefix). A multi-role
    loop checkpoint (keys ``policy.decoder...``, ``reward.decoder...``) needs ``role``."""
    roles = sorted(
        {k.split(".", 1)[0] for k in meta if "." in k and k.split(".", 1)[1].startswith(_MODEL_PREFIXES)}
        - {p.rstrip(".") for p in _MODEL_PREFIXES}
    )
    if role is None:
        if roles and not any(k.startswith(_MODEL_PREFIXES) for k in meta):
            raise ConversionError(
                f"--input {src}: a multi-role loop checkpoint (roles: {', '.join(roles)}): pass --role ROLE"
            )
        return meta, ""
    if role not in roles:
        raise ConversionError(f"--role {role}: no such role in {src} (roles: {', '.join(roles) or 'none'})")
    prefix = f"{role}."
    return {k[len(prefix) :]: v for k, v in meta.items() if k.startswith(prefix)}, prefix


def _run_tokenizer(src: Path) -> Path:
    """SRC when it holds tokenizer files, else the ``data.tokenizer`` of the training run's resolved
    config (``SRC/../../config.yaml``) when there is one, else SRC."""
    if any((src / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        return src
    run_config = src.parent.parent / "config.yaml"
    try:
        tokenizer = (yaml.safe_load(run_config.read_text()) or {}).get("data", {}).get("tokenizer")
    except (OSError, yaml.YAMLError, AttributeError):
        return src
    if not tokenizer:
        return src
    path = Path(tokenizer)
    return path if path.is_dir() else path.parent


def _load_slices(
    src: Path, request: dict[str, tuple[tuple[int, ...], torch.dtype, int | None, int]], prefix: str = ""
):
    """{key: (shape, dtype, layer or None, num_layers)} -> {key: tensor} via dist_checkpointing.load
    (the checkpoint's keys are ``prefix + key``)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    sharded = {}
    for key, (shape, dtype, layer, num_layers) in request.items():
        if layer is None:
            sharded[key] = ShardedTensor.from_rank_offsets(prefix + key, torch.empty(shape, dtype=dtype))
        else:
            data = torch.empty((1, *shape), dtype=dtype)
            sharded[key] = ShardedTensor.from_rank_offsets(prefix + key, data, (0, layer, num_layers))
    from rgkd_megatron.checkpoint.dist_ckpt import read_errors

    # one layer at a time: the access pattern is deliberately partial
    with read_errors(src):
        loaded = dist_checkpointing.load(sharded, str(src), validate_access_integrity=False)
    # the common (non-sharded) part rides along, e.g. {"model": {}} when rank 0 held no weights
    return {k: (v[0] if request[k][2] is not None else v) for k, v in loaded.items() if k in request}


def convert_mcore_to_hf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    hf_config: str | None = None,
    model_config: str | None = None,
    vocab_size: int | None = None,
    tokenizer: str | None = None,
    dtype: str | None = "auto",
    max_shard_size: str | int = "5GB",
    dry_run: bool = False,
    ignore_sliding_window: bool = False,
    tp: int = 1,
    pp: int = 1,
    role: str | None = None,
) -> dict[str, Any]:
    """Convert; returns the plan (per-rank sizes for ``tp``/``pp``, the layout it would be trained
    at) plus, when written, ``seconds``, ``files`` and ``dst``. ``role``: the model to convert from
    a multi-role loop checkpoint (``rgkd-distill``'s ``checkpoints/iter_*``), e.g. ``policy``."""
    src = Path(src)
    if src.is_dir():
        verify_checkpoint(src)  # names a truncated or missing file before torch trips over it
    meta, prefix = role_tensors(read_checkpoint_metadata(src), role, src)
    cfg, origin = find_hf_config(src, hf_config, model_config, vocab_size)
    arch = parse_hf_config(cfg, ignore_sliding_window=ignore_sliding_window)
    validate_layout(arch, tp, pp)
    rules = mapping_rules(arch)
    padded = _check_checkpoint(meta, arch, rules, src)
    stored = meta[EMBED][1]
    out_dtype = parse_dtype(dtype) or stored
    max_bytes = parse_size(max_shard_size)
    plan = conversion_plan(arch, rules, padded, out_dtype, tp, pp)
    plan["config_source"] = origin
    if dry_run:
        return plan
    dst = check_destination(dst).resolve()
    tokenizer_dir = Path(tokenizer) if tokenizer else _run_tokenizer(src)
    if tokenizer and not tokenizer_dir.is_dir():
        raise ConversionError(f"--tokenizer {tokenizer}: not a directory")
    start = time.perf_counter()
    globals_ = [r for r in rules if not r.per_layer]
    layer_rules = [r for r in rules if r.per_layer]
    with atomic_output_dir(dst) as tmp, single_process_group():
        writer = ShardedSafetensorsWriter(tmp, max_bytes, metadata={"rgkd_source": str(src.resolve())})

        def emit(rule: Rule, tensor: torch.Tensor, layer: int | None) -> None:
            for name, part in zip(rule.hf_names(layer), unpack(rule, arch, tensor)):
                writer.add(name, part.to(out_dtype).clone())

        with ProgressBar(total=arch.num_layers + 1, desc="mcore->hf", unit="layer") as bar:
            first, last = globals_[:1], globals_[1:]  # embedding first, final norm/output last (HF order)
            loaded = _load_slices(
                src, {r.key: (meta[r.key][0], meta[r.key][1], None, 0) for r in first}, prefix
            )
            for r in first:
                emit(r, loaded[r.key], None)
            for i in range(arch.num_layers):
                request = {
                    r.key: (mcore_shape(r, arch, padded), meta[r.key][1], i, arch.num_layers)
                    for r in layer_rules
                }
                loaded = _load_slices(src, request, prefix)
                for r in layer_rules:
                    emit(r, loaded[r.key], i)
                bar.update(1)
            loaded = _load_slices(
                src, {r.key: (meta[r.key][0], meta[r.key][1], None, 0) for r in last}, prefix
            )
            for r in last:
                emit(r, loaded[r.key], None)
            bar.update(1)
        files = writer.close()
        out_cfg = dict(cfg)
        if cfg.get("dtype", cfg.get("torch_dtype")) != dtype_name(out_dtype):
            for key in [k for k in ("dtype", "torch_dtype") if k in cfg] or ["torch_dtype"]:
                out_cfg[key] = dtype_name(out_dtype)
        (tmp / "config.json").write_text(json.dumps(out_cfg, indent=2) + "\n")
        copied = copy_aux_files(tokenizer_dir, tmp)
        if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
            logger.warning("no tokenizer files in %s: pass --tokenizer DIR to include them", tokenizer_dir)
    seconds = time.perf_counter() - start
    logger.info("mcore->hf: wrote %s (%d files) in %.1f s", dst, len(files), seconds)
    return {**plan, "seconds": seconds, "files": files, "dst": str(dst)}
