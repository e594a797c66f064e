"""The SeqKD / SFT baseline through the shared data, budget and evaluation (``pbkd/distill.py``)."""

from __future__ import annotations

from rgkd_megatron.pbkd.batches import collate_sequences
from rgkd_megatron.pbkd.distill import DistillTrainer
from rgkd_megatron.training.objectives import make_sft_forward_step


class SeqKDTrainer(DistillTrainer):
    """The SeqKD / SFT baseline through the same data, budget and evaluation: each policy step is a
    cross-entropy step on teacher responses (as many rows as a PbKD policy step), no reward model."""

    def policy_step(self, round_index: int) -> dict[str, float]:
        rows = self.p.prompts_per_step * self.p.samples_per_prompt
        rng = self._rng(round_index, 6, self.policy_steps)
        items = self._pick(self.train_items, rows, rng)
        batch = collate_sequences(
            [list(i.prompt_ids) for i in items],
            [list(i.teacher_ids) for i in items],
            self.cfg.data.seq_length,
            self.tok.pad_id,
        )
        batch["loss_mask"] = batch.pop("response_mask")
        self.policy_steps += 1
        step = make_sft_forward_step(self.policy.tp_group)
        return self.policy.train(step, batch, self.cfg.train.micro_batch_size)
