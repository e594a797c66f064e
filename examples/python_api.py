"""The Python API on the tiny recipe: load a config, train the student, read what the run wrote.

Run (from the repository root)::

    python examples/python_api.py                         # 20 steps of examples/tiny_sft.yaml
    python examples/python_api.py train.train_iters=5     # any dotted override
    torchrun --nproc-per-node 2 examples/python_api.py parallel.tensor_model_parallel_size=2

``rgkd_megatron.distill(cfg)`` runs a distillation recipe the same way (e.g. examples/tiny_pbkd.yaml).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import rgkd_megatron


def main(overrides: list[str]) -> int:
    cfg = rgkd_megatron.load_config(
        "examples/tiny_sft.yaml",
        ["train.train_iters=20", "logging.run_dir=runs/python_api", "logging.progress_bar=false", *overrides],
    )
    metrics = rgkd_megatron.train(cfg)
    run_dir = Path(cfg.logging.run_dir)
    steps = [json.loads(line)["step"] for line in open(run_dir / "metrics.jsonl")]
    print(f"trained {steps[-1]} steps, final lm_loss {metrics['lm_loss']:.4f}")
    print(f"student: {run_dir / 'student'} (megatron-core)", end="")
    print(f", {run_dir / 'student_hf'} (Hugging Face)" if cfg.logging.export_hf else "")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
