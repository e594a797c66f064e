"""The shared command error handling (one line, exit 2, --debug for the traceback) and the JSON/JSONL
readers whose errors name the file and line."""

from __future__ import annotations

import argparse
import errno

import pytest

from rgkd_megatron.utils.cli_errors import add_debug_flag, cli_main
from rgkd_megatron.utils.jsonl import iter_jsonl, read_json


def _command(exc: BaseException):
    @cli_main("demo")
    def main(argv=None) -> int:
        add_debug_flag(argparse.ArgumentParser()).parse_args(argv)
        raise exc

    return main


@pytest.mark.parametrize(
    "exc, message",
    [
        (
            ValueError("data.seq_length: expected > 0, got -1"),
            "demo: error: data.seq_length: expected > 0, got -1",
        ),
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y.yaml"),
            "demo: error: /x/y.yaml: no such file",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/ro/out"),
            "demo: error: /ro/out: permission denied",
        ),
    ],
)
def test_user_errors_become_one_line_and_exit_2(capsys, exc, message):
    assert _command(exc)([]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err


def test_debug_flag_and_bugs_keep_the_traceback():
    with pytest.raises(ValueError, match="bad value"):
        _command(ValueError("bad value"))(["--debug"])
    with pytest.raises(RuntimeError):  # not a user error: a bug keeps its traceback
        _command(RuntimeError("internal"))([])
    with pytest.raises(OSError):  # an OS error naming no path is not the user's to fix
        _command(OSError("socket closed"))([])


def test_iter_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert list(iter_jsonl(path)) == [(1, f"{path}:1", {"a": 1}), (3, f"{path}:3", {"a": 2})]
    for raw, message in [
        (b'{"a": 1}\n[1, 2]\n', ":2: expected a JSON object, got list"),
        (b'{"a": 1}\n{"a": \n', ":2: invalid JSON"),
        (b'{"a": 1}\n{"a": "\xc3("}\n', ":2: not valid UTF-8 (byte 0xc3 at column 8)"),
    ]:
        path.write_bytes(raw)
        with pytest.raises(ValueError) as info:
            list(iter_jsonl(path))
        assert str(info.value).startswith(f"{path}{message}")
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        list(iter_jsonl(tmp_path / "absent.jsonl"))


def test_only_an_unterminated_last_line_is_a_torn_tail(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2, "x": "\xe2\x82')  # killed inside a multi-byte character
    assert [r for _, _, r in iter_jsonl(path, torn_tail_ok=True)] == [{"step": 1}]
    with pytest.raises(ValueError, match=":2: not valid UTF-8"):
        list(iter_jsonl(path))
    path.write_bytes(b'{"step": 1}\n{"step": 2\n{"step": 3}\n')  # a complete bad line is never dropped
    with pytest.raises(ValueError, match=":2: invalid JSON"):
        list(iter_jsonl(path, torn_tail_ok=True))


def test_read_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text('{\n  "method": "pbkd",\n  "final": {\n')
    with pytest.raises(ValueError, match=rf"{path}:4: invalid JSON"):
        read_json(path)
    path.write_bytes(b'{"method": "\xff"}')
    with pytest.raises(ValueError, match=rf"{path}: not valid UTF-8 \(byte 0xff at byte offset 13\)"):
        read_json(path)
