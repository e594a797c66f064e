"""The architecture of a model comes from the checkpoint it is loaded from.

A recipe with ``model.load`` (or a teacher with ``pbkd.teacher_load``) need not repeat the
architecture: the fields in ``convert.detect.ARCH_FIELDS`` are read from the checkpoint (HF
``config.json``, or the ``model_config.yaml`` beside a megatron checkpoint). A field the recipe
sets must agree with the checkpoint; a disagreement is an error naming the field and both values.

"Set by the recipe" is known exactly when the config is loaded from YAML and overrides
(``load_config`` passes the dotted names it saw); for a config built in code, a field that differs
from its schema default counts as set.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from collections.abc import Collection
from typing import Any

from rgkd_megatron.config.schema import ModelConfig, RGKDConfig

__all__ = ["resolve_architecture", "resolve_checkpoint_architectures", "teacher_architecture"]


def _same(a: object, b: object) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def resolve_architecture(
    model: ModelConfig, path: str | None, field: str, explicit: Collection[str] | None = None
) -> ModelConfig:
    """``model`` with the architecture of the checkpoint at ``path`` filled in (unchanged when
    ``path`` is None, does not exist yet, or describes no architecture). ``explicit``: the
    ``model`` field names the recipe set (None = those differing from the defaults)."""
    if not path or not os.path.exists(path):
        return model
    from rgkd_megatron.convert.detect import checkpoint_model_fields

    fields = checkpoint_model_fields(path, field)
    if not fields:
        return model
    default = ModelConfig()
    section = field.rpartition(".")[0] or "model"
    errors, updates = [], {}
    for name, value in fields.items():
        ours = getattr(model, name)
        is_set = name in explicit if explicit is not None else not _same(ours, getattr(default, name))
        if is_set and ours is not None and not _same(ours, value):
            errors.append(
                f"{section}.{name}: the recipe has {ours!r}, the checkpoint {field}={path} has {value!r}"
            )
        else:
            updates[name] = (
                float(value) if isinstance(getattr(default, name), float) and value is not None else value
            )
    if errors:
        raise ValueError("; ".join(errors))
    return dataclasses.replace(model, **updates)


@functools.lru_cache(maxsize=16)
def _read_yaml(path: str, mtime_ns: int, size: int) -> Any:
    """The YAML file at ``path``, parsed once per (path, modification time, size): validation,
    placement and model building all ask for the teacher's architecture, the file is read once."""
    import yaml

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def teacher_architecture(cfg: RGKDConfig) -> ModelConfig | None:
    """The teacher's ``model`` section: ``pbkd.teacher_model_config`` (a YAML file) when set, checked
    against the checkpoint ``pbkd.teacher_load``; else the checkpoint's own; None without either."""
    path, load = cfg.pbkd.teacher_model_config, cfg.pbkd.teacher_load
    if path:
        from rgkd_megatron.config.loader import config_from_dict

        stat = os.stat(path)
        raw = copy.deepcopy(_read_yaml(os.path.abspath(path), stat.st_mtime_ns, stat.st_size))
        section = raw.get("model", raw)
        base = config_from_dict({"model": section}).model
        return resolve_architecture(base, load, "pbkd.teacher_load", explicit=set(section))
    if load and os.path.exists(load):
        return resolve_architecture(ModelConfig(), load, "pbkd.teacher_load", explicit=())
    return None


def resolve_checkpoint_architectures(cfg: RGKDConfig, explicit: Collection[str] | None = None) -> RGKDConfig:
    """``cfg`` with the student's architecture taken from ``model.load`` (see the module docstring)."""
    model = resolve_architecture(cfg.model, cfg.model.load, "model.load", explicit)
    return cfg if model is cfg.model else dataclasses.replace(cfg, model=model)
