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
from rgkd_megatron.utils.logging import get_logger, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rgkd-distill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML recipe (examples/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pbkd.rounds=3 pbkd.bt_lambda=2")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as exc:
        print(f"rgkd-distill: config error: {exc}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from rgkd_megatron.parallel.launch import init_distributed
    from rgkd_megatron.pbkd.run import run_distillation

    env = init_distributed(backend=cfg.parallel.backend)
    setup_logging(cfg.logging.log_level, rank=env.rank)
    logger = get_logger("rgkd_megatron.cli.distill")
    try:
        final = run_distillation(cfg)
    except (ValueError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    logger.info("done: %s", {k: round(v, 4) for k, v in final.items() if isinstance(v, float)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
