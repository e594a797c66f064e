"""The TEACHER role on its own window: online PbKD judged by the live teacher (teacher_loglik) with
the teacher on rank 0, the student on rank 1 and the reward model on rank 2 reproduces the
colocated single-process run exactly: same preference pairs (chosen/rejected and the teacher's
log-likelihood margins), same losses, same teacher NLL of the student's outputs."""

from __future__ import annotations

import dataclasses
import json

import yaml
from distill_helpers import disaggregated, distill_under_torchrun, metrics_rows
from distributed_utils import run_distributed

TEACHER = {"num_layers": 3, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
           "max_position_embeddings": 192, "init_method_std": 0.1}  # fmt: skip


def _save_teacher(rank, world_size, work):
    from rgkd_megatron.checkpoint.dist_ckpt import save_model_weights
    from rgkd_megatron.config import ModelConfig, ParallelConfig
    from rgkd_megatron.models.builders import build_policy
    from rgkd_megatron.parallel.groups import RoleLayout
    from rgkd_megatron.training.setup import init_role

    cfg = ModelConfig(**TEACHER)
    groups = init_role(RoleLayout(), seed=99)
    save_model_weights(f"{work}/teacher", build_policy(cfg, ParallelConfig(), groups, 512))
    with open(f"{work}/teacher_model.yaml", "w") as f:
        yaml.safe_dump({"model": dataclasses.asdict(cfg)}, f)


def test_teacher_judge_on_its_own_window_equals_colocated(tmp_path):
    run_distributed(_save_teacher, 1, args=(str(tmp_path),))
    common = [
        "pbkd.judge=teacher_loglik", f"pbkd.teacher_load={tmp_path}/teacher",
        f"pbkd.teacher_model_config={tmp_path}/teacher_model.yaml", "pbkd.rounds=2", "pbkd.iterations_per_round=1",
        "pbkd.pairs_per_round=6", "pbkd.max_new_tokens=10", "logging.progress_bar=false",
    ]  # fmt: skip
    colocated, windows = tmp_path / "colocated", tmp_path / "windows"
    distill_under_torchrun(colocated, 1, common)
    placed = disaggregated(teacher=(0, 1, 1), policy=(1, 1, 1), reward=(2, 1, 1))
    distill_under_torchrun(windows, 3, [*common, *placed])

    def pairs(run):
        rows = [json.loads(line) for line in (run / "preferences.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items()} for r in rows]

    a, b = pairs(colocated), pairs(windows)
    assert len(a) == 12 and a == b  # the teacher window judged, and wrote the store
    assert {r["provenance"]["judge"] for r in a} == {"teacher_loglik"}
    assert len({r["margin"] for r in a}) > 1  # real log-likelihood margins, not ties
    rows_a = [{k: v for k, v in r.items() if k != "time"} for r in metrics_rows(colocated)]
    rows_b = [{k: v for k, v in r.items() if k != "time"} for r in metrics_rows(windows)]
    assert rows_a == rows_b
    assert any("eval_teacher_nll_of_student" in r for r in rows_b)
    assert any("rm_loss" in r for r in rows_b) and any("policy_pg_loss" in r for r in rows_b)
