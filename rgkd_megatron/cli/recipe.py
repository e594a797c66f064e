"""What ``rgkd-train`` and ``rgkd-distill`` share: a YAML recipe with dotted overrides, ``--dry-run``
(validate and print the resolved config) and ``--json``, then one launch of the run function."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

from rgkd_megatron.utils.cli_errors import cli_main
from rgkd_megatron.utils.cli_flags import add_common_flags, add_overrides, add_run_flags

__all__ = ["recipe_command", "recipe_parser", "run_recipe"]


def recipe_parser(prog: str, description: str, example: str) -> argparse.ArgumentParser:
    """``--config``, the dotted overrides, ``--dry-run``, ``--json``, ``--debug`` and ``--version``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML recipe (examples/*.yaml); omitted = built-in defaults")
    add_overrides(parser, example)
    add_run_flags(
        parser,
        dry_run="validate and print the resolved config, then exit (nothing is launched or written)",
        json_help="print the resolved config (--dry-run) or the final metrics as one JSON object",
    )
    return add_common_flags(parser)


def run_recipe(
    prog: str, argv: Sequence[str] | None, parser: argparse.ArgumentParser, run: Callable[[Any], dict]
) -> int:
    """Parse, load the recipe, then print it (``--dry-run``) or launch ``run(cfg)`` (rank-aware
    logging, process group) and report its final metrics."""
    from rgkd_megatron.config import load_config
    from rgkd_megatron.utils.logging import get_logger

    args = parser.parse_intermixed_args(argv)  # overrides before and after the flags
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        import yaml

        from rgkd_megatron.config import config_to_dict

        resolved = config_to_dict(cfg)
        print(json.dumps(resolved) if args.json else yaml.safe_dump(resolved, sort_keys=False))
        return 0

    from rgkd_megatron.api import run_launched
    from rgkd_megatron.utils.logging import infer_rank

    module = f"rgkd_megatron.cli.{prog.removeprefix('rgkd-')}"
    final = run_launched(cfg, run, module)
    floats = {k: round(v, 5) for k, v in final.items() if isinstance(v, float)}
    get_logger(module).info("done: %s", floats)
    if args.json and infer_rank() == 0:
        print(json.dumps(final, default=str))
    return 0


def recipe_command(
    prog: str, doc: str, example: str, target: str
) -> tuple[Callable[[], argparse.ArgumentParser], Callable[..., int]]:
    """``(build_parser, main)`` of a recipe command whose run function is ``target``
    (``"package.module:function"``, imported only when the run is launched)."""

    def build_parser() -> argparse.ArgumentParser:
        return recipe_parser(prog, doc.split("\n\n")[0], example)

    def run(cfg: Any) -> dict:
        import importlib

        module, _, name = target.partition(":")
        return getattr(importlib.import_module(module), name)(cfg)

    @cli_main(prog)
    def main(argv: Sequence[str] | None = None) -> int:
        return run_recipe(prog, argv, build_parser(), run)

    return build_parser, main
