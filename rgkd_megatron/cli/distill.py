"""rgkd-distill: distill a teacher into the student with PbKD (or a baseline) and evaluate.

Usage::

    rgkd-distill --config examples/tiny_pbkd.yaml pbkd.rounds=3 pbkd.method=seqkd

Same launch environments as rgkd-train (single process, torchrun, srun, mpirun). Outputs in
``logging.run_dir``: config.yaml, metrics.jsonl, preferences.jsonl (pairs with provenance),
student/ (megatron dist checkpoint), summary.json, report.md + plots.
"""

from __future__ import annotations

import argparse
import sys

from rgkd_megatron.config import load_config
from rgkd_megatron.utils.cli_errors import add_debug_flag, cli_main
from rgkd_megatron.utils.logging import get_logger


@cli_main("rgkd-distill")
def main(argv: list[str] | None = None) -> int:
    parser = add_debug_flag(
        argparse.ArgumentParser(prog="rgkd-distill", description=__doc__.split("\n\n")[0])
    )
    parser.add_argument("--config", help="YAML recipe (examples/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pbkd.rounds=3 pbkd.bt_lambda=2")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from rgkd_megatron.api import run_launched
    from rgkd_megatron.pbkd.run import run_distillation

    final = run_launched(cfg, run_distillation, "rgkd_megatron.cli.distill")
    logger = get_logger("rgkd_megatron.cli.distill")
    logger.info("done: %s", {k: round(v, 4) for k, v in final.items() if isinstance(v, float)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
