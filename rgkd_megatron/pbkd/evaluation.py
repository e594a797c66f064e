"""Held-out evaluation of a distillation run (a mixin of ``DistillTrainer``).

The policy side answers the held-out prompts greedily; the teacher side scores those answers (its
NLL per token); the reward side, for methods with a sequence reward, reports the reward gap.
Besides the means (``eval_*`` metrics) the policy side returns per-prompt records under the private
key ``_records`` and the teacher side per-prompt NLLs under ``_teacher_nll_items``; ``pbkd.run``
joins them into ``heldout_outputs.jsonl`` (what ``rgkd-eval`` pairs across methods and seeds).

Diagnostics a reviewer looks for in a distilled student:
- ``eval_eos_rate``: share of answers that stopped on EOS (not cut at ``pbkd.max_new_tokens``);
- ``eval_len_ratio``: mean answer length over the teacher's (tokens, EOS included);
- ``eval_distinct2`` / ``eval_repetition3``: distinct word bigrams, share of repeated word trigrams
  (``rgkd_megatron.eval.diagnostics``): degenerate, looping text scores low / high.
"""

from __future__ import annotations

import numpy as np

from rgkd_megatron.eval.diagnostics import distinct_n, repetition_rate
from rgkd_megatron.eval.scores import rouge_l_per_item
from rgkd_megatron.pbkd.prompts import PromptItem
from rgkd_megatron.pbkd.roles import mean_nll


class EvaluationMixin:
    """Needs ``self.policy`` / ``self.teacher`` (role engines, ``pbkd/engines.py``), ``self.tok``,
    ``self.heldout_items``, ``self.reports_reward_gap`` and, when that is True, ``self.score_rollout``."""

    teacher_self_nll: float | None = None
    """The teacher's NLL of its own held-out responses (computed once, or taken from a reused evaluation)."""

    def evaluate(self, items: list[PromptItem] | None = None) -> dict:
        """Every evaluation metric on this rank (colocated: all models here), in the order of the
        plan's ``evaluate`` events: policy, teacher, reward."""
        items = items or self.heldout_items
        metrics, responses = self.evaluate_policy(items)
        if self.teacher is not None:
            metrics.update(self.evaluate_teacher(responses, items))
        if self.reports_reward_gap:
            metrics.update(self.evaluate_reward(responses, items))
        return metrics

    def evaluate_policy(self, items: list[PromptItem] | None = None) -> tuple[dict, list[list[int]]]:
        """Policy side: greedy responses on held-out prompts, ROUGE-L, length and the diagnostics.
        Returns (metrics, responses)."""
        items = items or self.heldout_items
        out = self.policy.generate([list(i.prompt_ids) for i in items], seed=0, greedy=True)
        responses = out.response_ids()
        finished = out.finished.tolist()
        texts = [self.tok.decode([t for t in r if t != self.tok.eos_id]) for r in responses]
        rouge = rouge_l_per_item(texts, [i.teacher for i in items])
        metrics: dict = {"eval_rougeL_vs_teacher": float(np.mean(rouge))}
        refs = [(t, i.reference) for t, i in zip(texts, items) if i.reference]
        if refs:
            metrics["eval_rougeL_vs_reference"] = float(
                np.mean(rouge_l_per_item([t for t, _ in refs], [r for _, r in refs]))
            )
        metrics["eval_response_len"] = float(np.mean([len(r) for r in responses]))
        metrics["eval_len_ratio"] = metrics["eval_response_len"] / float(
            np.mean([len(i.teacher_ids) for i in items])
        )
        metrics["eval_eos_rate"] = float(np.mean(finished))
        metrics["eval_distinct2"] = distinct_n(texts, 2)
        metrics["eval_repetition3"] = repetition_rate(texts, 3)
        metrics["_records"] = [
            {"prompt_id": i.prompt_id, "prompt": i.prompt, "teacher": i.teacher, "student": t,
             "student_ids": list(r), "finished": bool(f), "rougeL_teacher": float(s)}
            for i, t, r, f, s in zip(items, texts, responses, finished, rouge)
        ]  # fmt: skip
        return metrics, responses

    def evaluate_teacher(self, responses: list[list[int]], items: list[PromptItem] | None = None) -> dict:
        """Teacher side: its NLL of the student's held-out responses (mean and per prompt), and of its own."""
        items = items or self.heldout_items
        prompts = [list(i.prompt_ids) for i in items]
        per_item = self.teacher.nlls(prompts, responses)
        metrics = {
            "eval_teacher_nll_of_student": mean_nll(per_item),
            "_teacher_nll_items": [s / n if n else None for s, n in per_item],
        }
        if self.teacher_self_nll is None:
            own = self.teacher.nlls(prompts, [list(i.teacher_ids) for i in items])
            self.teacher_self_nll = mean_nll(own)
        metrics["eval_teacher_nll_of_teacher"] = self.teacher_self_nll
        return metrics

    def evaluate_reward(self, responses: list[list[int]], items: list[PromptItem] | None = None) -> dict:
        """Reward side: mean bounded reward of the teacher's minus the student's held-out responses."""
        items = items or self.heldout_items
        prompts = [list(i.prompt_ids) for i in items]
        r_student = self.score_rollout([p + r for p, r in zip(prompts, responses)])
        r_teacher = self.score_rollout([p + list(i.teacher_ids) for p, i in zip(prompts, items)])
        return {"eval_reward_gap": float(r_teacher.mean() - r_student.mean())}
