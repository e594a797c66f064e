"""White-box MM-PbKD on the PbKD trainer (docs/design.md, the algorithm; ``losses.mm_pbkd``).

The reward is reparametrised as a bounded token-level Q(s, a) = B tanh((W h_s) . e_a / sqrt(d) + b_a):
``h_s`` from a GPT backbone (the reward role's model, with its output layer replaced by the
identity) and ``e_a`` the backbone's own (detached) input embedding, so only the needed actions are
evaluated (the k teacher ids, the taken action and the tail estimate), never a V-wide head.

Rows (label position t: state = tokens[:t+1], action = labels[t]):
- on-policy: fresh student samples, teacher top-k from the live teacher;
- off-policy: the teacher's responses (teacher prefixes);
- preference pairs (Q step only): implied returns R(y) = sum_h gamma^h (Q(s_h, a_h) - gamma V_E(s_h+1)).
Q step: minimise -(beta_mm gap_on + (1 - beta_mm) gap_off) + lambda BT(R+, R-), student detached
(its bucket log-probs are computed beforehand without grad). Student step: the moment gap through the
bucket softmax plus the on-policy policy-gradient term, Q detached (computed beforehand). Both losses
are the pure functions ``losses.mm_steps.mm_q_objective`` / ``mm_student_objective``; this trainer
runs the forward passes on the role engines and feeds them the micro-batches.
Pipeline parallelism is not supported yet for this method (the Q head needs the embedding table on
the last stage); TP and DP are.
"""

from __future__ import annotations

from functools import partial

import torch

from rgkd_megatron.config.pbkd import live_kd_topk
from rgkd_megatron.generation.generate import inference_mode, stage_forward
from rgkd_megatron.losses.mm_pbkd import mm_bucket_log_probs
from rgkd_megatron.losses.mm_steps import mm_q_objective, mm_student_objective
from rgkd_megatron.pbkd.batches import collate_sequences
from rgkd_megatron.pbkd.trainer import PbKDTrainer
from rgkd_megatron.training.engine import metric_pair


def _q_values(model, gpt, batch, tp_group, vocab_size):
    """Q on the buckets and of the taken actions; ``model`` is what to call (maybe DDP-wrapped),
    ``gpt`` the unwrapped GPT holding the head and the embedding."""
    hidden_bsh = model(batch["tokens"], batch["position_ids"], None)
    embedding = gpt.embedding.word_embeddings.weight.detach()
    q_bsc, q_action_bs = gpt.q_head.bucket_values(
        hidden_bsh.float(), batch["topk_ids"], embedding, action_ids_t=batch["labels"],
        tp_group=tp_group, vocab_size=vocab_size,
    )  # fmt: skip
    return q_bsc, q_action_bs


class MMPbKDTrainer(PbKDTrainer):
    """MM-PbKD: a Q-function adversary read through the teacher's (top-k + tail) probabilities."""

    splits_policy_step = False  # one fused policy step (see DistillTrainer.splits_policy_step)
    reports_reward_gap = False  # the adversary is a token-level Q, not a sequence reward

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.teacher is None:
            raise ValueError(
                "pbkd.method=mm_pbkd needs the teacher: set pbkd.teacher_load and pbkd.teacher_model_config"
            )
        if self.groups.layout.pp > 1:
            raise ValueError("pbkd.method=mm_pbkd: pipeline parallelism is not supported yet (use TP/DP)")
        self.q_model = self.reward.unwrapped()
        if not hasattr(self.q_model, "q_head"):
            raise RuntimeError("build_pbkd_models did not attach the Q head for mm_pbkd")

    # -- rows with the teacher's buckets -------------------------------------------------------
    def _rows(self, prompts, responses):
        batch = collate_sequences(prompts, responses, self.cfg.data.seq_length, self.tok.pad_id)
        batch["topk_ids"], batch["topk_logprobs"] = self.teacher.topk(
            batch["tokens"], min(live_kd_topk(self.p), self.models.vocab_size),
            1.0,  # pi_E itself: V_E and the Bellman rewards need temperature 1
        )  # fmt: skip
        return batch

    def _student_buckets(self, batch):
        """Student bucket log-probs and action log-probs (no grad), for the Q step."""
        with inference_mode(self.policy.unwrapped()):
            logits = stage_forward(
                self.policy.unwrapped(), self.groups, batch["tokens"], 0, None, gather=False
            )
            _, log_q, action_lp = mm_bucket_log_probs(
                logits, batch["topk_ids"], batch["topk_logprobs"], action_ids_t=batch["labels"],
                tp_group=self.groups.pg_collection.tp, vocab_size=self.models.vocab_size,
            )  # fmt: skip
        return log_q.float(), action_lp.float()

    def _q_detached(self, batch):
        with inference_mode(self.q_model):
            return _q_values(
                self.q_model, self.q_model, batch, self.groups.pg_collection.tp, self.models.vocab_size
            )

    def _on_off_rows(self, round_index: int, salt: int):
        g, n = self.p.prompts_per_step, self.p.samples_per_prompt
        rng = self._rng(round_index, salt, self.policy_steps, self.rm_steps)
        items = [self.train_items[i] for i in rng.choice(len(self.train_items), g, replace=False)]
        prompts = [list(i.prompt_ids) for i in items for _ in range(n)]
        samples = self.policy.generate(
            prompts, self._seed(round_index, salt + 1, self.policy_steps, self.rm_steps)
        )
        on = self._rows(prompts, samples.response_ids())
        off = self._rows(
            [list(i.prompt_ids) for i in items for _ in range(n)],
            [list(i.teacher_ids) for i in items for _ in range(n)],
        )
        return on, off

    # -- the max player --------------------------------------------------------------------------
    def rm_step(self, round_index: int) -> dict[str, float]:
        on, off = self._on_off_rows(round_index, 20)
        trainable = self.store.trainable()
        rng = self._rng(round_index, 22, self.rm_steps)
        pairs = [trainable[i] for i in rng.choice(len(trainable), len(on["tokens"]) // 2, replace=True)]
        chosen = self._rows([list(p.prompt_ids) for p in pairs], [list(p.chosen_ids) for p in pairs])
        rejected = self._rows([list(p.prompt_ids) for p in pairs], [list(p.rejected_ids) for p in pairs])
        for batch in (on, off, chosen, rejected):
            batch["student_log_q"], _ = self._student_buckets(batch)
        n_rows = len(on["tokens"])
        mbs = self.cfg.train.micro_batch_size
        micro_count = n_rows // mbs
        b_per = len(pairs) // micro_count
        parts = []
        for m in range(micro_count):  # micro m: mbs on rows, mbs off rows, b_per chosen, b_per rejected
            sl, pl = slice(m * mbs, (m + 1) * mbs), slice(m * b_per, (m + 1) * b_per)
            parts.append({k: torch.cat([on[k][sl], off[k][sl], chosen[k][pl], rejected[k][pl]]) for k in on})
        batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        sizes = {
            "on": mbs,
            "pairs": b_per,
            "total_on": n_rows,
            "total_pairs": len(pairs),
            "rows": 2 * mbs + 2 * b_per,
        }
        total_rows = 2 * n_rows + 2 * len(pairs)
        opts = {
            "gamma": self.p.gamma,
            "beta_mm": self.p.beta_mm,
            "lam": self.p.bt_lambda,
            "total_rows": total_rows,
        }
        tp_group, vocab = self.groups.pg_collection.tp, self.models.vocab_size

        def loss_func(micro, out):
            q_bsc, q_action = out
            loss, m = mm_q_objective(
                q_bsc, q_action, micro["topk_logprobs"], micro["student_log_q"], micro["response_mask"],
                on_rows=sizes["on"], pair_rows=sizes["pairs"], gamma=opts["gamma"], beta_mm=opts["beta_mm"],
                lam=opts["lam"], total_on=sizes["total_on"], total_pairs=sizes["total_pairs"],
            )  # fmt: skip
            g = opts["total_rows"]
            metrics = {
                "mmq_loss": metric_pair(loss * g, g),
                "mmq_gap_on": metric_pair(m["mmq/gap_on_sum"], sizes["on"]),
                "mmq_gap_off": metric_pair(m["mmq/gap_off_sum"], sizes["on"]),
                "mmq_pref_accuracy": metric_pair(m["mmq/accuracy_sum"], sizes["pairs"]),
            }
            return loss * g, torch.tensor(sizes["rows"], dtype=torch.int), metrics

        def forward_step(data_iterator, model):
            micro = next(data_iterator)
            out = _q_values(model, self.q_model, micro, tp_group, vocab)
            return out, partial(loss_func, micro)

        self.rm_steps += 1
        return self.reward.train(forward_step, batch, sizes["rows"])

    # -- the min player --------------------------------------------------------------------------
    def policy_step(self, round_index: int) -> dict[str, float]:
        """Moment gap + on-policy PG term (``mm_student_loss``, mixed by beta_mm), plus the options
        PbKD has: beta * KL(pi || pi_ref) per token of the on-policy samples and alpha * SeqKD NLL per
        token of the teacher responses (both token means over the whole step)."""
        on, off = self._on_off_rows(round_index, 30)
        for batch in (on, off):
            batch["q_bsc"], batch["q_action"] = self._q_detached(batch)
        seq_len = self.cfg.data.seq_length
        on["ref_logprobs"] = torch.zeros(on["tokens"].shape, dtype=torch.float32)
        on["ref_logprobs"][:, :-1] = self.policy.reference_logprobs(on["tokens"].tolist())[:, : seq_len - 1]
        off["ref_logprobs"] = torch.zeros_like(on["ref_logprobs"])
        mbs = self.cfg.train.micro_batch_size
        n_rows = len(on["tokens"])
        t_on = max(float(on["response_mask"].sum()), 1.0)
        t_off = max(float(off["response_mask"].sum()), 1.0)
        parts = []
        for m in range(n_rows // mbs):
            sl = slice(m * mbs, (m + 1) * mbs)
            parts.append({k: torch.cat([on[k][sl], off[k][sl]]) for k in on})
        batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        tp_group, vocab, p = self.groups.pg_collection.tp, self.models.vocab_size, self.p

        def loss_func(micro, logits):
            log_p, log_q, action_lp = mm_bucket_log_probs(
                logits, micro["topk_ids"], micro["topk_logprobs"], action_ids_t=micro["labels"],
                tp_group=tp_group, vocab_size=vocab,
            )  # fmt: skip
            mask = micro["response_mask"]
            loss, m = mm_student_objective(
                micro["q_bsc"], log_p, log_q, action_lp, micro["ref_logprobs"], mask, on_rows=mbs,
                gamma=p.gamma, beta_mm=p.beta_mm, kl_beta=p.kl_beta, seqkd_alpha=p.seqkd_alpha,
                total_on_tokens=t_on, total_off_tokens=t_off, total_rows=n_rows,
            )  # fmt: skip
            metrics = {
                "mms_gap_on": metric_pair(m["mms/gap_on_sum"], mbs),
                "mms_gap_off": metric_pair(m["mms/gap_off_sum"], mbs),
                "mms_loss": metric_pair(loss, mbs),
                "policy_kl": metric_pair(m["kl/value_sum"], mask[:mbs].sum()),
                "policy_seqkd_nll": metric_pair(m["seqkd/nll_sum"], mask[mbs : 2 * mbs].sum()),
            }
            return loss, torch.tensor(mbs, dtype=torch.int), metrics

        def forward_step(data_iterator, model):
            micro = next(data_iterator)
            return model(micro["tokens"], micro["position_ids"], None), partial(loss_func, micro)

        self.policy_steps += 1
        return self.policy.train(forward_step, batch, 2 * mbs)
