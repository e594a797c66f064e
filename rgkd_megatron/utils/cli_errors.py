"""One way for every command to end on a user error: one line on stderr, exit code 2, no traceback.

    @cli_main("rgkd-train")
    def main(argv: list[str] | None = None) -> int:
        parser = add_debug_flag(argparse.ArgumentParser(...))
        ...

Expected user errors are bad values (``ValueError``, which includes config and conversion errors
and undecodable input), missing files and OS errors that name a path (``OSError.filename``, e.g. a
permission denied or a full disk). Anything else is a bug and keeps its traceback. ``--debug``
re-raises user errors too, for the full traceback.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence

__all__ = ["EXIT_USER_ERROR", "add_debug_flag", "cli_main", "is_user_error", "user_error_message"]

EXIT_USER_ERROR = 2
DEBUG_FLAG = "--debug"


def add_debug_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--debug`` (full tracebacks instead of one-line errors) to ``parser``; returns it."""
    parser.add_argument(
        DEBUG_FLAG, action="store_true", help="show the full traceback of an error instead of one line"
    )
    return parser


def is_user_error(exc: BaseException) -> bool:
    """A bad value, a missing file or an OS error about a named path: the user can fix it."""
    if isinstance(exc, ValueError):
        return True
    return isinstance(exc, OSError) and (isinstance(exc, FileNotFoundError) or exc.filename is not None)


def user_error_message(exc: BaseException) -> str:
    """The one-line message of a user error (``path: reason`` for OS errors)."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        target = f" -> {exc.filename2}" if exc.filename2 is not None else ""
        return f"{exc.filename}{target}: {exc.strerror.lower()}"
    return str(exc) or type(exc).__name__


def cli_main(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a command's ``main(argv)``: user errors become ``prog: error: message`` on stderr and
    exit code 2, unless ``--debug`` is among the arguments."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(argv: Sequence[str] | None = None) -> int:
            args = list(sys.argv[1:] if argv is None else argv)
            try:
                return main(argv)
            except Exception as exc:
                if DEBUG_FLAG in args or not is_user_error(exc):
                    raise
                print(f"{prog}: error: {user_error_message(exc)}", file=sys.stderr)
                return EXIT_USER_ERROR

        return run

    return wrap
