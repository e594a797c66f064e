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
from rgkd_megatron.utils.logging import get_logger, setup_logging


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as exc:
        print(f"rgkd-train: config error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        import yaml

        from rgkd_megatron.config import config_to_dict

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0

    import torch.distributed as dist

    from rgkd_megatron.parallel.launch import init_distributed
    from rgkd_megatron.training.loop import run_training

    env = init_distributed(backend=cfg.parallel.backend)
    setup_logging(cfg.logging.log_level, rank=env.rank)
    logger = get_logger("rgkd_megatron.cli.train")
    logger.info("launch: %s rank %d/%d", env.source, env.rank, env.world_size)
    try:
        final = run_training(cfg)
    except (ValueError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    logger.info("done: %s", {k: round(v, 5) for k, v in final.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
