"""What a training run leaves behind for its users: self-describing checkpoints and the final student.

Every megatron checkpoint a run saves carries its ``model_config.yaml``, ``hf_config.json`` and
the tokenizer files (``convert.export.write_checkpoint_sidecar``), so
``tools/convert_checkpoint.py --to hf --input CKPT --output OUT`` and ``model.load=CKPT`` need nothing
else. At the end the student is saved as ``<run_dir>/student`` (megatron-core, weights only) and,
unless ``logging.export_hf`` is false, as the Hugging Face checkpoint ``<run_dir>/student_hf``
(config, tokenizer, chat template, safetensors).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from rgkd_megatron.config import RGKDConfig, config_to_dict
from rgkd_megatron.utils.logging import get_logger

logger = get_logger(__name__)

__all__ = ["describe_checkpoint", "save_student"]


def describe_checkpoint(path: str | os.PathLike, cfg: RGKDConfig) -> None:
    """Rank 0 writes the model section and the tokenizer into the saved checkpoint ``path``."""
    if dist.get_rank() != 0:
        return
    from rgkd_megatron.convert.export import write_checkpoint_sidecar

    write_checkpoint_sidecar(path, config_to_dict(cfg)["model"], cfg.data.tokenizer or None)


def save_student(cfg: RGKDConfig, model: torch.nn.Module | None) -> Path:
    """Collective: save the final student (a rank without the policy passes None), describe it,
    and export it to Hugging Face on rank 0 (``logging.export_hf``). Returns the megatron path."""
    from rgkd_megatron.checkpoint.dist_ckpt import save_model_weights

    run_dir = Path(cfg.logging.run_dir)
    student = run_dir / "student"
    save_model_weights(student, model)
    describe_checkpoint(student, cfg)
    if dist.get_rank() == 0 and cfg.logging.export_hf:
        from rgkd_megatron.convert.export import export_hf

        model_section = config_to_dict(cfg)["model"]
        export_hf(student, model_section, cfg.data.tokenizer or None, run_dir / "student_hf")
        logger.info("student: %s (megatron-core), %s (Hugging Face)", student, run_dir / "student_hf")
    return student
