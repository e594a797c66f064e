"""Load, override, validate and save the config tree (``schema.RGKDConfig``).

Design:
- Precedence: dataclass defaults < YAML recipe < dotted overrides (``train.lr=1e-4``), later
  overrides winning. Override values are parsed as YAML, so ``3`` is an int, ``1e-4`` a float,
  ``true`` a bool and ``null`` None. A field typed ``str`` keeps the raw text when the value does
  not parse as a string (``data.tokenizer=123`` is the path ``"123"``; an empty value is ``""``).
- YAML is read with a ``yaml.SafeLoader`` subclass only (plain data, never code). The subclass
  adds one resolver so ``1e-4`` reads as a float, as in YAML 1.2 (PyYAML's YAML 1.1 wants ``1.0e-4``).
- Parsing rejects unknown keys (with the closest valid name), wrong types and bad choices as
  soon as it sees them. ``validate_config`` then checks values and how fields fit together
  (sizes, divisibility by TP/PP/DP, the world size) and reports every problem in one ValueError.
  Every message starts with the dotted field and says what was expected and what it got.
- ``load_config`` validates what it can without a world size; the launcher calls
  ``validate_config(cfg, world_size)`` again once the world size is known.

Usage::

    cfg = load_config("examples/tiny_sft.yaml", ["parallel.tensor_model_parallel_size=2"])
    validate_config(cfg, world_size=4)
    save_resolved_config(cfg, cfg.logging.run_dir)  # on one rank
"""

import contextlib
import copy
import dataclasses
import difflib
import math
import os
import re
import tempfile
import types
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from rgkd_megatron.config.architecture import resolve_checkpoint_architectures
from rgkd_megatron.config.pbkd import validate_pbkd
from rgkd_megatron.config.roles import data_parallel_size, validate_placement, validate_schedule
from rgkd_megatron.config.schema import RGKDConfig
from rgkd_megatron.utils.jsonl import read_utf8

__all__ = [
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "data_parallel_size",
    "load_config",
    "save_resolved_config",
    "validate_config",
]

RESOLVED_CONFIG_NAME = "config.yaml"


class _SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads exponent floats without a dot (``1e-4``) as floats."""


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: Any) -> Any:
    return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a SafeLoader subclass: plain data only


# ---------------------------------------------------------------------------------------------
# Types


def _optional_inner(hint: Any) -> Any | None:
    """X for ``Optional[X]`` / ``X | None``, else None."""
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(get_args(hint)) == 2:
            return args[0]
    return None


def _describe(hint: Any) -> str:
    inner = _optional_inner(hint)
    if inner is not None:
        return f"{_describe(inner)} or null"
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(c) for c in get_args(hint))
    return {bool: "a bool (true/false)", int: "an int", float: "a number", str: "a string"}.get(
        hint, str(hint)
    )


def _coerce(dotted: str, hint: Any, value: Any) -> Any:
    """Return ``value`` checked against the type hint (ints widened to float), or raise ValueError."""
    inner = _optional_inner(hint)
    if inner is not None:
        return None if value is None else _coerce_plain(dotted, inner, value, f"{_describe(inner)} or null")
    return _coerce_plain(dotted, hint, value, _describe(hint))


def _coerce_plain(dotted: str, hint: Any, value: Any, expected: str) -> Any:
    ok = False
    if get_origin(hint) is Literal:
        ok = isinstance(value, str) and value in get_args(hint)
    elif hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok:
            value = float(value)
    elif hint is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - a schema field with a type this module does not know
        raise TypeError(f"{dotted}: unsupported config field type {hint!r}")
    if not ok:
        raise ValueError(f"{dotted}: expected {expected}, got {value!r} ({type(value).__name__})")
    return value


def _takes_raw_string(hint: Any) -> bool:
    return hint is str or _optional_inner(hint) is str


def _field_names(obj_or_cls: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(obj_or_cls)]


def _unknown_key(dotted: str, valid: Sequence[str]) -> ValueError:
    parent, _, key = dotted.rpartition(".")
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    suggestion = f"; did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ""
    return ValueError(f"{dotted}: unknown key, expected one of: {', '.join(valid)}{suggestion}")


# ---------------------------------------------------------------------------------------------
# Dict <-> dataclasses


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:  # an empty section (`model:` with nothing under it) means all defaults
        data = {}
    if not isinstance(data, Mapping):
        where = prefix or "config"
        raise ValueError(f"{where}: expected a mapping of fields, got {data!r} ({type(data).__name__})")
    hints = get_type_hints(cls)
    names = _field_names(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise _unknown_key(dotted, names)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, dotted)
        else:
            kwargs[key] = _coerce(dotted, hint, value)
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any]) -> RGKDConfig:
    """Build a config from a nested dict (as read from YAML), checking keys, types and choices."""
    return _build(RGKDConfig, data, "")


def config_to_dict(cfg: RGKDConfig) -> dict[str, Any]:
    """The config as a nested dict of plain values (YAML/JSON-serialisable)."""
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------
# Overrides


def _parse_override_value(path: str, hint: Any, raw: str) -> Any:
    if _takes_raw_string(hint):
        try:
            value = _yaml_load(raw)
        except yaml.YAMLError:
            return raw
        if isinstance(value, str) or (value is None and _optional_inner(hint) is not None and raw.strip()):
            return value
        return raw
    try:
        return _yaml_load(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or exc
        raise ValueError(f"{path}: expected {_describe(hint)}, got unparsable {raw!r} ({problem})") from None


def apply_overrides(cfg: RGKDConfig, overrides: Sequence[str]) -> RGKDConfig:
    """A copy of ``cfg`` with dotted ``section.field=value`` overrides applied in order."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'section.field=value' strings, not one string")
    cfg = copy.deepcopy(cfg)
    for text in overrides:
        path, sep, raw = text.partition("=")
        path = path.strip()
        if not sep or not path:
            raise ValueError(f"override {text!r}: expected 'section.field=value', e.g. 'train.lr=1e-4'")
        parts = path.split(".")
        node: Any = cfg
        for i, part in enumerate(parts):
            dotted = ".".join(parts[: i + 1])
            if not dataclasses.is_dataclass(node):
                raise ValueError(f"{path}: expected a field path, but '{'.'.join(parts[:i])}' is a field")
            if part not in _field_names(node):
                raise _unknown_key(dotted, _field_names(node))
            if i < len(parts) - 1:
                node = getattr(node, part)
        leaf = parts[-1]
        hint = get_type_hints(type(node))[leaf]
        if dataclasses.is_dataclass(hint):
            example = _field_names(hint)[0]
            raise ValueError(f"{path}: expected a field, got a section; override e.g. '{path}.{example}=...'")
        setattr(node, leaf, _coerce(path, hint, _parse_override_value(path, hint, raw)))
    return cfg


# ---------------------------------------------------------------------------------------------
# Load / save


def load_config(path: str | None, overrides: Sequence[str] = (), *, validate: bool = True) -> RGKDConfig:
    """Defaults, then the YAML recipe at ``path`` (None = defaults only), then ``overrides``, then
    the architecture of the ``model.load`` checkpoint for the model fields neither set (a field both
    set differently is an error naming the field and the two values).

    With ``validate`` (default) runs ``validate_config(cfg)`` without a world size; call it again
    with the world size once the launcher knows it. Raises ValueError naming the bad field.
    """
    data: Any = {}
    if path is not None:
        text = read_utf8(path)
        try:
            data = _yaml_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from None
        try:
            cfg = config_from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    else:
        cfg = RGKDConfig()
    cfg = apply_overrides(cfg, overrides)
    cfg = resolve_checkpoint_architectures(cfg, _model_fields_set(data, overrides))
    if validate:
        validate_config(cfg)
    return cfg


def _model_fields_set(data: Any, overrides: Sequence[str]) -> set[str]:
    """The ``model`` field names the recipe or an override sets (the rest may come from model.load)."""
    section = data.get("model") if isinstance(data, Mapping) else None
    named = set(section) if isinstance(section, Mapping) else set()
    for text in overrides:
        path = text.partition("=")[0].strip()
        if path.startswith("model."):
            named.add(path.removeprefix("model."))
    return named


def save_resolved_config(cfg: RGKDConfig, run_dir: str) -> str:
    """Write ``run_dir/config.yaml`` atomically (temp file + os.replace); returns its path.

    Call it on one rank only. ``load_config`` reads the file back to the same config.
    """
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, RESOLVED_CONFIG_NAME)
    body = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    text = "# Resolved rgkd_megatron config: defaults + recipe + overrides.\n" + body
    fd, tmp = tempfile.mkstemp(prefix=f".{RESOLVED_CONFIG_NAME}.", suffix=".tmp", dir=run_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


# ---------------------------------------------------------------------------------------------
# Validation


def _type_errors(obj: Any, prefix: str) -> list[str]:
    """Type/choice errors of a config built in code (the loader checks these while parsing)."""
    errors = []
    hints = get_type_hints(type(obj))
    for name in _field_names(obj):
        dotted = f"{prefix}.{name}" if prefix else name
        value, hint = getattr(obj, name), hints[name]
        if dataclasses.is_dataclass(hint):
            if isinstance(value, hint):
                errors += _type_errors(value, dotted)
            else:
                errors.append(f"{dotted}: expected a {hint.__name__}, got {type(value).__name__}")
            continue
        try:
            _coerce(dotted, hint, value)
        except ValueError as exc:
            errors.append(str(exc))
    return errors


def _raise_if(errors: list[str]) -> None:
    if len(errors) == 1:
        raise ValueError(errors[0])
    if errors:
        raise ValueError(f"{len(errors)} config errors:\n  " + "\n  ".join(errors))


# (dotted field, lower bound, bound included); None values of Optional fields are skipped.
_BOUNDS = [
    *((f"model.{n}", 0, False) for n in (
        "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
        "vocab_size", "make_vocab_size_divisible_by", "max_position_embeddings", "rotary_base",
        "rotary_scaling_factor", "norm_epsilon", "init_method_std", "kd_chunk_budget_mib",
    )),
    ("parallel.tensor_model_parallel_size", 0, False),
    ("parallel.pipeline_model_parallel_size", 0, False),
    ("optimizer.weight_decay", 0, True),
    ("optimizer.adam_beta1", 0, True),
    ("optimizer.adam_beta2", 0, True),
    ("optimizer.adam_eps", 0, False),
    ("optimizer.clip_grad", 0, True),
    ("data.seq_length", 0, False),
    *((f"train.{n}", 0, False) for n in ("train_iters", "micro_batch_size", "global_batch_size", "lr")),
    *((f"train.{n}", 0, True) for n in (
        "min_lr", "lr_warmup_iters", "save_interval", "eval_interval", "keep_last_checkpoints",
        "keep_checkpoint_every",
    )),
    ("train.log_interval", 0, False),
]  # fmt: skip


def _get(cfg: RGKDConfig, dotted: str) -> Any:
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def validate_config(cfg: RGKDConfig, world_size: int | None = None) -> None:
    """Raise one ValueError listing every problem, each naming its dotted field.

    Checks types and choices, value ranges, the model/parallel shape constraints of megatron-core
    and, when ``world_size`` is given, that the layout and batch sizes fit it.
    """
    _raise_if(_type_errors(cfg, ""))

    errors = []
    for dotted, low, inclusive in _BOUNDS:
        value = _get(cfg, dotted)
        if value is not None and (value < low or (value == low and not inclusive)):
            relation = ">=" if inclusive else ">"
            errors.append(f"{dotted}: expected a value {relation} {low}, got {value}")
    for dotted in ("optimizer.adam_beta1", "optimizer.adam_beta2"):
        if _get(cfg, dotted) >= 1:
            errors.append(f"{dotted}: expected a value < 1, got {_get(cfg, dotted)}")
    _raise_if(errors)  # the checks below divide by these values

    m, par, d, t = cfg.model, cfg.parallel, cfg.data, cfg.train
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size

    def multiple(dotted: str, value: int, of_name: str, of: int) -> None:
        if value % of:
            errors.append(f"{dotted}: expected a multiple of {of_name} ({of}), got {value}")

    multiple("model.hidden_size", m.hidden_size, "model.num_attention_heads", m.num_attention_heads)
    multiple("model.num_attention_heads", m.num_attention_heads, "parallel.tensor_model_parallel_size", tp)
    if m.num_query_groups is not None:
        multiple(
            "model.num_attention_heads", m.num_attention_heads, "model.num_query_groups", m.num_query_groups
        )
        multiple("model.num_query_groups", m.num_query_groups, "parallel.tensor_model_parallel_size", tp)
    multiple("model.ffn_hidden_size", m.ffn_hidden_size, "parallel.tensor_model_parallel_size", tp)
    multiple("model.num_layers", m.num_layers, "parallel.pipeline_model_parallel_size", pp)
    if par.sequence_parallel:
        if tp == 1:
            errors.append(
                "parallel.sequence_parallel: expected false when parallel.tensor_model_parallel_size "
                "is 1 (sequence parallelism shards over the TP group), got true"
            )
        else:
            multiple("data.seq_length", d.seq_length, "parallel.tensor_model_parallel_size", tp)
    if par.overlap_param_gather and not par.use_distributed_optimizer:
        errors.append(
            "parallel.overlap_param_gather: expected false unless parallel.use_distributed_optimizer "
            "is true, got true"
        )
    if d.seq_length > m.max_position_embeddings:
        errors.append(
            f"data.seq_length: expected <= model.max_position_embeddings ({m.max_position_embeddings}), "
            f"got {d.seq_length}"
        )
    if t.min_lr > t.lr:
        errors.append(f"train.min_lr: expected <= train.lr ({t.lr}), got {t.min_lr}")
    errors.extend(validate_pbkd(cfg.pbkd))
    errors.extend(validate_schedule(cfg))
    errors.extend(validate_placement(cfg, world_size))

    dp = 1
    if cfg.placement.mode == "disaggregated" or world_size is not None:
        try:
            dp = data_parallel_size(cfg, world_size)
        except ValueError as exc:
            errors.append(str(exc))
    if t.global_batch_size % (t.micro_batch_size * dp):
        errors.append(
            f"train.global_batch_size: expected a multiple of train.micro_batch_size * data-parallel size "
            f"({t.micro_batch_size} * {dp} = {t.micro_batch_size * dp}), got {t.global_batch_size}"
        )
    _raise_if(errors)
