"""Token-level KD baselines (forward/reverse KL, JSD/GKD, skew KL, TVD) on ``pbkd/distill.py``.

Same prompts, student, step budget and evaluation as PbKD; each policy step minimises the sparse
top-k + tail divergence (``rgkd_megatron.losses.topk_kd``) between the teacher and the student on
the response tokens of either the teacher's responses (off-policy, word-level KD) or fresh student
samples (``pbkd.on_policy=true``: GKD-style). Teacher top-k comes from the teacher cache when
``pbkd.cache_path`` is set and the step is off-policy, else from the live teacher role (a no-grad
forward per step); the loss is normalised by the step's global count of response tokens.
"""

from __future__ import annotations

from functools import partial

import torch

from rgkd_megatron.config.pbkd import live_kd_topk
from rgkd_megatron.kernels.backend import topk_kd_loss
from rgkd_megatron.methods import get_method
from rgkd_megatron.pbkd.batches import collate_sequences
from rgkd_megatron.pbkd.distill import DistillTrainer
from rgkd_megatron.pbkd.teacher_source import CachedTeacher
from rgkd_megatron.training.engine import metric_pair


def _kd_loss_func(opts: dict, tp_group, batch: dict, logits_bsv: torch.Tensor):
    mask = batch["response_mask"]
    loss, metrics = topk_kd_loss(
        logits_bsv, batch["topk_ids"], batch["topk_logprobs"], mask, opts["kind"], opts["temperature"], tp_group,
        teacher_tail_t=batch.get("teacher_tail"), beta=opts["beta"], alpha=opts["alpha"],
        vocab_size=opts["vocab_size"], normalizer=1.0, backend=opts["backend"],
        chunk_budget_mib=opts["chunk_budget_mib"],
    )  # fmt: skip
    count = mask.sum()
    return (
        loss,
        count.to(torch.int),
        {
            "kd_loss": metric_pair(loss, count),
            "kd_teacher_topk_mass": metric_pair(metrics["kd/teacher_topk_mass"] * count, count),
        },
    )


class KDTrainer(DistillTrainer):
    """Word-level / on-policy KD baseline with the divergence named by ``pbkd.method``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cached = None
        if self.p.cache_path and not self.p.on_policy:
            self.cached = CachedTeacher(
                self.p.cache_path,
                self.p.prompts_path,
                self.tok,
                self.models.vocab_size,
                self.p.kd_temperature,
                self.run_dir / "data",
                self.p.kd_topk,
            )
        elif self.teacher is None:
            raise ValueError(
                f"pbkd.method={self.p.method} needs the teacher's probabilities: set pbkd.cache_path "
                "(off-policy) or pbkd.teacher_load and pbkd.teacher_model_config (live)"
            )

    def policy_step(self, round_index: int) -> dict[str, float]:
        rows = self.p.prompts_per_step * self.p.samples_per_prompt
        rng = self._rng(round_index, 7, self.policy_steps)
        items = self._pick(self.train_items, rows, rng)
        prompts = [list(i.prompt_ids) for i in items]
        if self.p.on_policy:
            responses = self.policy.generate(
                prompts, self._seed(round_index, 8, self.policy_steps)
            ).response_ids()
        else:
            responses = [list(i.teacher_ids) for i in items]
        batch = collate_sequences(prompts, responses, self.cfg.data.seq_length, self.tok.pad_id)
        if self.cached is not None:
            batch["topk_ids"], batch["topk_logprobs"], batch["teacher_tail"] = self.cached.buckets(
                [i.prompt_id for i in items], batch
            )
        else:
            batch["topk_ids"], batch["topk_logprobs"] = self.teacher.topk(
                batch["tokens"], live_kd_topk(self.p), self.p.kd_temperature
            )
        opts = {
            "kind": get_method(self.p.method).kd_loss, "temperature": self.p.kd_temperature, "beta": self.p.kd_beta,
            "alpha": self.p.kd_alpha, "vocab_size": self.models.vocab_size, "backend": self.cfg.model.kd_kernel,
            "chunk_budget_mib": self.cfg.model.kd_chunk_budget_mib,
        }  # fmt: skip
        self.policy_steps += 1

        def forward_step(data_iterator, model):
            micro = next(data_iterator)
            logits = model(micro["tokens"], micro["position_ids"], None)
            return logits, partial(_kd_loss_func, opts, self.policy.tp_group, micro)

        return self.policy.train(forward_step, batch, self.cfg.train.micro_batch_size)
