"""Reading user JSON and JSONL files: every error names the file (and the line).

    for lineno, where, record in iter_jsonl(path):        # where = "path:lineno"
        ...
    summary = read_json(path)

Lines are split on ``\\n`` and decoded one at a time, so a byte that is not UTF-8 is reported with
its line and column instead of failing the whole file with an unnamed ``UnicodeDecodeError``.
Blank lines are skipped. With ``torn_tail_ok`` a last line that has no newline and does not parse
(a writer killed mid-line) is dropped with a warning instead of raising.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from rgkd_megatron.utils.logging import get_logger

__all__ = ["iter_jsonl", "read_json", "read_utf8"]

log = get_logger(__name__)


def _decode(raw: bytes, where: str, unit: str = "column") -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at {unit} {exc.start + 1}); "
            "expected UTF-8 text"
        ) from None


def _parse(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def iter_jsonl(
    path: str | os.PathLike[str], *, torn_tail_ok: bool = False
) -> Iterator[tuple[int, str, dict]]:
    """``(lineno, where, record)`` per non-blank line of ``path`` (``where`` = ``"path:lineno"``).

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        ValueError: a line that is not UTF-8, not JSON or not a JSON object.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = _decode(raw, where)
                if not line.strip():
                    continue
                record = _parse(line, where)
            except ValueError as exc:
                if torn_tail_ok and not raw.endswith(b"\n"):
                    log.warning("%s: dropping a torn last line (a writer stopped mid-line): %s", where, exc)
                    return
                raise
            yield lineno, where, record


def read_utf8(path: str | os.PathLike[str]) -> str:
    """The text of ``path``; ValueError naming the file and the byte when it is not UTF-8."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        return _decode(f.read(), path, unit="byte offset")


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON value in ``path``; ValueError naming the file (and line) when it is not UTF-8 JSON."""
    path = os.fspath(path)
    text = read_utf8(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
