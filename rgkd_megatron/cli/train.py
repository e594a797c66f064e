"""rgkd-train: train the student policy (SFT / SeqKD on teacher responses) on megatron-core.

Usage::

    rgkd-train --config examples/tiny_sft.yaml train.train_iters=50 parallel.tensor_model_parallel_size=2
    rgkd-train --config examples/tiny_sft.yaml --dry-run [--json]   # the resolved config, nothing run
    torchrun --nproc-per-node 4 -m rgkd_megatron.cli.train --config RECIPE.yaml   # or srun / mpirun

The launch environment (torchrun, SLURM srun, mpirun + mpi4py, or a single process) is detected;
NCCL is used with GPUs, gloo without. The resolved config, metrics.jsonl and checkpoints go to
``logging.run_dir``; rerunning the same command resumes from the latest complete checkpoint.
"""

from __future__ import annotations

import sys

from rgkd_megatron.cli.recipe import recipe_command

build_parser, main = recipe_command(
    "rgkd-train", __doc__, "train.lr=1e-4 model.num_layers=4", "rgkd_megatron.training.loop:run_training"
)

if __name__ == "__main__":
    sys.exit(main())
