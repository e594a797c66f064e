"""The SeqKD / SFT baseline through the PbKD trainer's data, budget and evaluation."""

from __future__ import annotations

from rgkd_megatron.pbkd.batches import collate_sequences
from rgkd_megatron.pbkd.trainer import PbKDTrainer
from rgkd_megatron.training.objectives import make_sft_forward_step


class SeqKDTrainer(PbKDTrainer):
    """The SeqKD / SFT baseline through the same data, budget and evaluation: each policy step is a
    cross-entropy step on teacher responses (as many rows as a PbKD policy step), no reward model."""

    splits_policy_step = False  # one fused policy step (see PbKDTrainer.splits_policy_step)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reports_reward_gap = False

    def policy_step(self, round_index: int) -> dict[str, float]:
        rows = self.p.prompts_per_step * self.p.samples_per_prompt
        rng = self._rng(round_index, 6, self.policy_steps)
        items = [
            self.train_items[i]
            for i in rng.choice(len(self.train_items), rows, replace=len(self.train_items) < rows)
        ]
        batch = collate_sequences(
            [list(i.prompt_ids) for i in items],
            [list(i.teacher_ids) for i in items],
            self.cfg.data.seq_length,
            self.tok.pad_id,
        )
        batch["loss_mask"] = batch.pop("response_mask")
        self.policy_steps += 1
        step = make_sft_forward_step(self.groups.pg_collection.tp)
        return self._run(self.models.policy, step, batch, self.cfg.train.micro_batch_size)
