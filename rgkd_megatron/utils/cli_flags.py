"""The flags every command shares, spelled one way (docs/cli.md has the table of names).

    parser = add_common_flags(argparse.ArgumentParser(prog="rgkd-eval"))   # --debug, --version
    parser.add_argument("--output", required=True, help="directory for report.md")
    deprecated_alias(parser, "--out", "--output")   # old spelling: works, warns, hidden from --help
    add_run_flags(parser)                           # --dry-run, --json

A renamed flag keeps its old spelling for one release: the old flag sets the same argument (so
``required`` and mutually exclusive groups see it), and using it prints one line on stderr,
``PROG: warning: --src is deprecated, use --input``, and issues a ``DeprecationWarning``.
Nothing here imports torch or megatron: ``--help`` and ``--version`` stay fast and quiet.
"""

from __future__ import annotations

import argparse
import platform
import sys
import warnings
from typing import Any

from rgkd_megatron.utils.cli_errors import add_debug_flag

__all__ = [
    "add_common_flags",
    "add_overrides",
    "add_run_flags",
    "add_version_flag",
    "deprecated_alias",
    "deprecation_message",
    "version_text",
]

_Container = argparse.ArgumentParser | argparse._ArgumentGroup


def version_text() -> str:
    """``rgkd_megatron X (megatron-core Y, Python Z)``; megatron-core's version is read from its
    package metadata, without importing it."""
    from importlib.metadata import PackageNotFoundError, version

    from rgkd_megatron import __version__

    try:
        mcore = f"megatron-core {version('megatron-core')}"
    except PackageNotFoundError:
        mcore = "megatron-core not installed"
    return f"rgkd_megatron {__version__} ({mcore}, Python {platform.python_version()})"


class _VersionAction(argparse.Action):
    """``--version``: print :func:`version_text` and exit 0 (computed only when asked)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        print(version_text())
        parser.exit(0)


def add_version_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--version`` (package, megatron-core and Python versions); returns ``parser``."""
    parser.add_argument("--version", action=_VersionAction, help="print the versions and exit")
    return parser


def add_common_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--debug`` and ``--version``, which every command has; returns ``parser``."""
    return add_version_flag(add_debug_flag(parser))


def add_run_flags(
    parser: _Container,
    dry_run: str | None = "check the inputs and print what would be done, write nothing",
    json_help: str | None = "print the result (or the dry-run plan) as one JSON object on stdout",
) -> _Container:
    """``--dry-run`` and ``--json`` (either left out when its help is None); returns ``parser``."""
    if dry_run is not None:
        parser.add_argument("--dry-run", action="store_true", help=dry_run)
    if json_help is not None:
        parser.add_argument("--json", action="store_true", help=json_help)
    return parser


def add_overrides(parser: _Container, example: str = "train.lr=1e-4 model.num_layers=4") -> _Container:
    """The positional dotted config overrides (``a.b=value``), applied after the YAML; parse with
    ``parse_intermixed_args`` so that they may come before and after the flags."""
    parser.add_argument("overrides", nargs="*", help=f"dotted config overrides, e.g. {example}")
    return parser


def deprecation_message(old: str, new: str) -> str:
    """The warning for a renamed flag, naming the new spelling."""
    return f"{old} is deprecated, use {new} (the old spelling goes away in the next release)"


class _Deprecating:
    """Mixed into an action's class by :func:`deprecated_alias`: warns when set through an old spelling."""

    renamed: dict[str, str]
    base_help: str | None

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        new = self.renamed.get(option_string or "")
        if new is not None:
            message = deprecation_message(option_string, new)
            warnings.warn(message, DeprecationWarning, stacklevel=2)
            print(f"{parser.prog}: warning: {message}", file=sys.stderr)
        super().__call__(parser, namespace, values, option_string)  # type: ignore[misc]


def deprecated_alias(parser: _Container, old: str, new: str) -> None:
    """Accept ``old`` as a deprecated spelling of the already added flag ``new``.

    The alias is the same argparse action (``required``, defaults, choices and mutually exclusive
    groups behave as for ``new``), is not listed in ``--help`` beyond a note in ``new``'s help, and
    prints a deprecation line on stderr when used."""
    registry = parser._option_string_actions
    action = registry.get(new)
    if action is None:
        raise ValueError(f"deprecated_alias: {new} is not a flag of this parser")
    if old in registry:
        raise ValueError(f"deprecated_alias: {old} is already a flag of this parser")
    registry[old] = action
    if not isinstance(action, _Deprecating):
        action.__class__ = type(f"Deprecating{type(action).__name__}", (_Deprecating, type(action)), {})
        action.renamed = {}
        action.base_help = action.help
    action.renamed[old] = new
    if action.base_help not in (None, argparse.SUPPRESS):
        action.help = f"{action.base_help} [formerly {', '.join(action.renamed)}]"
