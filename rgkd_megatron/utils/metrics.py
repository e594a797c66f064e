"""Scalar metrics to JSONL, wandb and TensorBoard, from rank 0 only.

    with MetricsLogger(run_dir, rank=env.rank, wandb=True, config=cfg_dict) as metrics:
        metrics.log(step, {"loss": 2.31, "lr": 3e-4}, prefix="train")
    rows = read_metrics(run_dir)      # [{"step": ..., "time": ..., "train/loss": ...}, ...]

Design choices:

- JSONL is the source of truth (`run_dir/metrics.jsonl`, one object per `log` call, flushed per
  line, appended to on resume once ``truncate_metrics`` has cut it back to the resumed step):
  offline wandb keeps history only in a binary file, and tests and reports need to read numbers
  back. wandb and TensorBoard are optional mirrors.
- Only rank 0 writes; other ranks get a logger whose calls do nothing, so callers need no `if`.
- wandb is initialised lazily at the first `log` (offline by default, files under `run_dir`);
  TensorBoard writes to `run_dir/tb`. Asking for either when it is not importable raises a
  RuntimeError at construction, on every rank, before any work is done.
- Secrets never leave the process: config keys that look like credentials (a name segment equal
  to key/token/secret/password, e.g. "api_key", "hf_token", "wandbSecret"; counts such as
  "num_tokens" or names such as "tokenizer" are kept) are replaced by "***" before the config
  reaches wandb or TensorBoard. WANDB_API_KEY is never read.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rgkd_megatron.utils.jsonl import iter_jsonl
from rgkd_megatron.utils.logging import get_logger

__all__ = ["METRICS_FILE", "MetricsLogger", "read_metrics", "scrub_secrets", "truncate_metrics"]

METRICS_FILE = "metrics.jsonl"
REDACTED = "***"
_SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd", "pwd", "credential", "credentials"}
_SECRET_SUFFIXES = ("apikey", "secret", "password", "passwd")

log = get_logger(__name__)


def _is_secret_key(key: str) -> bool:
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key)  # camelCase -> camel_Case
    for word in re.split(r"[^A-Za-z0-9]+", words):
        word = word.lower()
        if word in _SECRET_WORDS or word.endswith(_SECRET_SUFFIXES):
            return True
    return False


def scrub_secrets(obj: Any) -> Any:
    """A copy of `obj` with the values of credential-like keys (at any depth) replaced by "***"."""
    if isinstance(obj, Mapping):
        return {k: (REDACTED if _is_secret_key(str(k)) else scrub_secrets(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(scrub_secrets(v) for v in obj)
    return obj


def _to_number(key: str, value: Any) -> float | int:
    if hasattr(value, "item"):  # torch / numpy scalars
        try:
            value = value.item()
        except (RuntimeError, ValueError):
            raise ValueError(f"metric {key!r} is not a scalar: {value!r}") from None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"metric {key!r} has non-numeric value {value!r}") from None


def _require_module(module: str, feature: str, install: str) -> None:
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise RuntimeError(
            f"{feature} was requested but `{module}` is not importable; `pip install {install}`"
        )


class MetricsLogger:
    """Scalar metrics writer; a no-op on ranks other than 0.

    Args:
        run_dir: directory for metrics.jsonl, the wandb run and tb/ (created on rank 0).
        rank: this process's global rank; only rank 0 writes.
        jsonl: write run_dir/metrics.jsonl.
        wandb: mirror to wandb (lazily initialised at the first log call).
        wandb_project: wandb project name.
        wandb_mode: "offline" (default), "online" or "disabled".
        tensorboard: mirror to a TensorBoard SummaryWriter in run_dir/tb.
        config: run configuration, recorded (scrubbed of secrets) in wandb and TensorBoard.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        rank: int = 0,
        jsonl: bool = True,
        wandb: bool = False,
        wandb_project: str = "rgkd",
        wandb_mode: str = "offline",
        tensorboard: bool = False,
        config: dict[str, Any] | None = None,
    ) -> None:
        if wandb:
            _require_module("wandb", "wandb logging", "wandb")
        if tensorboard:
            _require_module("tensorboard", "TensorBoard logging", "tensorboard")
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.active = rank == 0
        self.use_jsonl = jsonl
        self.use_wandb = wandb
        self.use_tensorboard = tensorboard
        self.wandb_project = wandb_project
        self.wandb_mode = wandb_mode
        self.config = scrub_secrets(dict(config or {}))
        self._jsonl_file: Any = None
        self._wandb_run: Any = None
        self._tb_writer: Any = None
        self._closed = False
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            self._jsonl_file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            self._tb_writer = self._open_tensorboard()

    @property
    def jsonl_path(self) -> Path:
        return self.run_dir / METRICS_FILE

    def _open_tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
        except ImportError as exc:
            raise RuntimeError(f"TensorBoard logging was requested but cannot be imported: {exc}") from exc
        writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))
        if self.config:
            text = json.dumps(self.config, indent=2, sort_keys=True, default=str)
            writer.add_text("config", f"```\n{text}\n```", 0)
        return writer

    def _wandb(self) -> Any:
        if self._wandb_run is None:
            try:
                import wandb  # noqa: PLC0415 - ~1 s import, only when asked for
            except ImportError as exc:
                raise RuntimeError(f"wandb logging was requested but cannot be imported: {exc}") from exc
            self._wandb_run = wandb.init(
                project=self.wandb_project,
                mode=self.wandb_mode,
                dir=str(self.run_dir),
                config=self.config,
                reinit="create_new",
            )
            log.info("wandb run %s (%s) in %s", self._wandb_run.id, self.wandb_mode, self.run_dir)
        return self._wandb_run

    def log(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
        """Record `metrics` at `step`; keys become "<prefix>/<key>" when a prefix is given."""
        if not self.active:
            return
        if self._closed:
            raise RuntimeError("MetricsLogger.log called after close()")
        head = prefix.rstrip("/") + "/" if prefix else ""
        values = {f"{head}{k}": _to_number(f"{head}{k}", v) for k, v in metrics.items()}
        if self._jsonl_file is not None:
            row = {"step": int(step), "time": round(time.time(), 3), **values}
            self._jsonl_file.write(json.dumps(row) + "\n")
            self._jsonl_file.flush()
        if self.use_wandb:
            self._wandb().log(values, step=int(step))
        if self._tb_writer is not None:
            for key, value in values.items():
                if math.isfinite(value):
                    self._tb_writer.add_scalar(key, value, int(step))
            self._tb_writer.flush()

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._jsonl_file is not None:
            self._jsonl_file.close()
            self._jsonl_file = None
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (or of `path/metrics.jsonl` when `path` is a directory).

    A torn last line (a run killed mid-write) is dropped with a warning; a malformed line elsewhere
    raises ValueError naming the file and the line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return [row for _, _, row in iter_jsonl(path, torn_tail_ok=True)]


def truncate_metrics(path: str | os.PathLike[str], last_step: int | None) -> None:
    """Prepare ``metrics.jsonl`` for a (re)started run, atomically: keep the rows up to ``last_step``
    (the resumed checkpoint's step; the run logs the later ones again) and drop a torn last line.
    ``last_step=None`` (a start from scratch) drops every row of an earlier attempt. Every command
    calls this once before its MetricsLogger opens the file, on rank 0.
    """
    path = Path(path)
    if not path.is_file():
        return
    rows = read_metrics(path)
    kept = [row for row in rows if last_step is not None and row.get("step", 0) <= last_step]
    if len(kept) < len(rows):
        log.warning(
            "%s: dropping %d rows logged after step %s (the run restarts from there)",
            path, len(rows) - len(kept), last_step if last_step is not None else "0 (no checkpoint)",
        )  # fmt: skip
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
    os.replace(tmp, path)
