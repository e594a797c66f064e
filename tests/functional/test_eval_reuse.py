"""A run started from another run's student reuses that run's final held-out evaluation only when
nothing it depends on changed, and the reused numbers equal a fresh evaluation of the same weights."""

from __future__ import annotations

import json
from pathlib import Path

from distributed_utils import run_distributed

REPO = Path(__file__).resolve().parents[2]
COMMON = [
    f"pbkd.prompts_path={REPO}/examples/data/tiny_sft.jsonl",
    f"data.tokenizer={REPO}/examples/tokenizer/tokenizer.json",
    "logging.progress_bar=false",
    "pbkd.method=seqkd",
    "pbkd.max_new_tokens=12",
    "pbkd.rounds=1",
    "pbkd.iterations_per_round=2",
]


def _distill(rank, world_size, run_dir, overrides):
    from rgkd_megatron.config import load_config
    from rgkd_megatron.pbkd.run import run_distillation

    cfg = load_config(
        str(REPO / "examples" / "tiny_pbkd.yaml"), [*COMMON, f"logging.run_dir={run_dir}", *overrides]
    )
    run_distillation(cfg)
    return json.loads((Path(run_dir) / "summary.json").read_text())


def _eval(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith("eval_")}


def test_initial_evaluation_reused_only_when_identical(tmp_path, caplog):
    first = run_distributed(_distill, 1, args=(str(tmp_path / "first"), []))[0]
    load = [f"model.load={tmp_path / 'first' / 'student'}"]
    reused = run_distributed(_distill, 1, args=(str(tmp_path / "reused"), load))[0]
    assert _eval(reused["initial"]) == _eval(first["final"])
    assert (tmp_path / "reused" / "heldout_outputs_initial.jsonl").read_text() == (
        tmp_path / "first" / "heldout_outputs.jsonl"
    ).read_text()

    # a fresh evaluation of the same weights (the outputs file removed: nothing to reuse) agrees
    (tmp_path / "first" / "heldout_outputs.jsonl").unlink()
    fresh = run_distributed(_distill, 1, args=(str(tmp_path / "fresh"), load))[0]
    for key, value in _eval(first["final"]).items():
        assert abs(fresh["initial"][key] - value) <= 1e-6 * max(1.0, abs(value)), key

    # another generation length changes what the evaluation measures: not reused
    other = run_distributed(_distill, 1, args=(str(tmp_path / "other"), [*load, "pbkd.max_new_tokens=6"]))[0]
    assert other["eval_identity"]["max_new_tokens"] == 6
    assert first["final"]["eval_response_len"] > 6, "precondition: a reused evaluation would be longer"
    assert other["initial"]["eval_response_len"] <= 6
