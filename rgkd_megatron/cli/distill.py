"""rgkd-distill: distill a teacher into the student with PbKD (or a baseline) and evaluate.

Usage::

    rgkd-distill --config examples/tiny_pbkd.yaml pbkd.rounds=3 pbkd.method=seqkd
    rgkd-distill --config examples/tiny_pbkd.yaml --dry-run [--json]   # the resolved config, nothing run

Same launch environments as rgkd-train (single process, torchrun, srun, mpirun). Outputs in
``logging.run_dir``: config.yaml, metrics.jsonl, preferences.jsonl (pairs with provenance),
student/ (megatron dist checkpoint), summary.json, report.md + plots.
"""

from __future__ import annotations

import sys

from rgkd_megatron.cli.recipe import recipe_command

build_parser, main = recipe_command(
    "rgkd-distill", __doc__, "pbkd.rounds=3 pbkd.bt_lambda=2", "rgkd_megatron.pbkd.run:run_distillation"
)

if __name__ == "__main__":
    sys.exit(main())
