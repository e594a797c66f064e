"""rgkd-train: train the student policy (SFT / SeqKD on teacher responses) on megatron-core.

Usage::

    rgkd-train --config examples/tiny_sft.yaml train.train_iters=50 parallel.tensor_model_parallel_size=2
    torchrun --nproc-per-node 4 -m rgkd_megatron.cli.train --config RECIPE.yaml   # or srun / mpirun

The launch environment (torchrun, SLURM srun, mpirun + mpi4py, or a single process) is detected;
NCCL is used with GPUs, gloo without. The resolved config, metrics.jsonl and checkpoints go to
``logging.run_dir``; rerunning the same command resumes from the latest complete checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from rgkd_megatron.config import load_config
from rgkd_megatron.utils.cli_errors import add_debug_flag, cli_main
from rgkd_megatron.utils.logging import get_logger


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rgkd-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML recipe (examples/*.yaml); omitted = built-in defaults")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides applied after the recipe, e.g. train.lr=1e-4 model.num_layers=4",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="validate and print the resolved config, then exit"
    )
    return add_debug_flag(parser)


@cli_main("rgkd-train")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        import yaml

        from rgkd_megatron.config import config_to_dict

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0

    from rgkd_megatron.api import run_launched
    from rgkd_megatron.training.loop import run_training

    final = run_launched(cfg, run_training, "rgkd_megatron.cli.train")
    get_logger("rgkd_megatron.cli.train").info("done: %s", {k: round(v, 5) for k, v in final.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
