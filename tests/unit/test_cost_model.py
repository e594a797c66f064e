"""Cost model (rgkd_megatron.schedule.cost_model) and the rgkd-plan CLI: parameter and FLOP counts
against hand computations and published parameter counts, the 6*N*D rule, phase times of a toy
GPU computed by hand, and the presets' predictions against independent sums."""

import json
from pathlib import Path

import pytest

from rgkd_megatron.cli.plan import main
from rgkd_megatron.schedule.cost_model import (
    GPUS,
    PRESETS,
    SHAPES,
    Efficiency,
    GPUSpec,
    ModelShape,
    RoleSetup,
    Scenario,
    Workload,
    allreduce_time,
    decode_step_cost,
    forward_flops,
    matmul_params,
    param_count,
    phase_times,
    predict,
    training_flops,
)
from rgkd_megatron.schedule.plan import PlanSpec, build_plan, check_plan, predict_from_measurements

REPO = Path(__file__).resolve().parents[2]
# 2 layers, h=8, f=16, 2 heads of 4 with 1 KV group (kv_dim 4), vocab 10, untied
TINY = ModelShape(
    "tiny",
    num_layers=2,
    hidden_size=8,
    ffn_hidden_size=16,
    num_attention_heads=2,
    num_query_groups=1,
    vocab_size=10,
)


def test_tiny_shape_counts_by_hand():
    # per layer: Q, O 8*8 each = 128; K, V 8*4 each = 64; SwiGLU 3*8*16 = 384 -> 576
    assert matmul_params(TINY) == 2 * 576 + 10 * 8  # + output layer = 1232
    assert param_count(TINY) == 1152 + 2 * 80 + (2 * 2 + 1) * 8  # + embedding, output, 5 norms = 1352
    tied = ModelShape("tied", 2, 8, 16, 2, 1, 10, tie_word_embeddings=True)
    assert param_count(tied) == 1352 - 80 and matmul_params(tied) == 1232


def test_tiny_flops_by_hand():
    # 1 sequence of 4 tokens: matmuls 2 * 1232 * 4 = 9856; attention per layer 2 matmuls * 2 * 4^2 * 8,
    # halved for causal = 256, 2 layers = 512
    assert forward_flops(TINY, 1, 4) == 9856 + 512
    assert forward_flops(TINY, 1, 4, causal=False) == 9856 + 1024
    assert training_flops(TINY, 1, 4) == 3 * 10368
    # decode, 2 sequences attending to 5 tokens: matmuls 2 * 1232 * 2 = 4928; attention 4 * 5 * 8 * 2
    # layers * 2 seqs = 640; bytes: bf16 weights 2 * 1352 = 2704, K and V 2 * 2 layers * 4 * 5 * 2 seqs * 2 B = 320
    assert decode_step_cost(TINY, 2, 5) == (4928 + 640, 2704 + 320)


def test_published_parameter_counts():
    assert param_count(SHAPES["llama2-7b"]) == 6_738_415_616
    assert param_count(SHAPES["llama2-70b"]) == 68_976_648_192
    assert param_count(SHAPES["llama3-8b"]) == 8_030_261_248


@pytest.mark.parametrize("name", ["llama2-7b", "llama2-70b", "llama3-8b", "llama3-70b"])
def test_training_flops_within_5_percent_of_6ND(name):
    shape, seq = SHAPES[name], 2048
    ratio = training_flops(shape, 1, seq) / (6 * param_count(shape) * seq)
    assert 0.95 < ratio < 1.05, ratio


def test_allreduce_by_hand():
    eff = Efficiency(comm_efficiency=0.5, collective_latency_s=0.1)
    # 0.1 s + 2 * 3/4 * 1000 B / (1000 B/s * 0.5)
    assert allreduce_time(1000, 4, 1e-6, eff) == pytest.approx(3.1)
    assert allreduce_time(1000, 1, 1e-6, eff) == 0


def _toy(hbm_tb_s: float) -> Scenario:
    gpu = GPUSpec("toy", 1, bf16_tflops=1e-9, hbm_tb_s=hbm_tb_s, nvlink_gb_s=1.0, ib_gb_s=1.0)  # 1000 FLOP/s
    workload = Workload(
        prompt_len=3, response_len=2, seq_length=5, pairs_per_round=2, rollout_rows=2, policy_rows=2,
        reward_score_rows=2, rm_rows=4, teacher_rows=2, micro_batch_size=2,
    )  # fmt: skip
    eff = Efficiency(mfu=0.5, hbm_efficiency=0.5, comm_efficiency=1.0, collective_latency_s=0.0)
    roles = {"policy": RoleSetup(TINY), "reward": RoleSetup(TINY)}
    return Scenario("toy", "toy", gpu, 8, roles, PlanSpec(1, 1, 1, 1), workload, eff)


def test_phase_times_of_a_toy_gpu_by_hand():
    times = phase_times(_toy(hbm_tb_s=1e-9))  # 500 FLOP/s and 500 B/s effective, one GPU, no comm
    fwd_2x5 = 2 * 1232 * 10 + 4 * 25 * 8 * 2 * 2 / 2  # 26240
    fwd_4x5 = 2 * 1232 * 20 + 4 * 25 * 8 * 2 * 4 / 2  # 52480
    assert times["policy/policy_update"] == pytest.approx(4 * fwd_2x5 / 500)  # train (3) + reference (1)
    assert times["reward/rm_update"] == pytest.approx(3 * fwd_4x5 / 500)
    assert times["reward/score"] == pytest.approx(fwd_2x5 / 500)
    # rollout: prefill of 2 x 3 tokens, then decode steps at context 3 and 4, compute-bound here:
    prefill = 2 * 1232 * 6 + 4 * 9 * 8 * 2 * 2 / 2  # 15360
    steps = (4928 + 4 * 3 * 8 * 2 * 2) + (4928 + 4 * 4 * 8 * 2 * 2)  # 5312 + 5440
    assert times["policy/rollout"] == pytest.approx((prefill + steps) / 500)
    assert times["policy/collect"] == times["policy/rollout"]  # same rows here
    # 10x slower memory: decode is memory-bound: weights 2704 B + KV 2*2*4*ctx*2*2 B at 50 B/s
    slow = phase_times(_toy(hbm_tb_s=1e-10))
    assert slow["policy/rollout"] == pytest.approx(prefill / 500 + (2704 + 192) / 50 + (2704 + 256) / 50)
    assert slow["policy/policy_update"] == times["policy/policy_update"]


def test_h200_decodes_faster_and_trains_at_the_same_speed():
    h100, h200 = PRESETS["70b-7b"]("H100-80GB"), PRESETS["70b-7b"]("H200-141GB")
    t100, t200 = phase_times(h100), phase_times(h200)
    assert t200["policy/rollout"] < t100["policy/rollout"]
    assert t200["policy/policy_update"] == t100["policy/policy_update"]  # same dense bf16 peak
    assert GPUS["H200-141GB"].hbm_tb_s / GPUS["H100-80GB"].hbm_tb_s == pytest.approx(4.8 / 3.35)


def test_presets_predictions_against_independent_sums():
    serial = predict(PRESETS["70b-7b-serial"]())
    t = serial["phase_times"]
    per_iteration = t["policy/rollout"] + t["teacher/teacher_score"] + t["reward/score"]
    per_iteration += t["policy/policy_update"] + t["reward/rm_update"]
    assert serial["prediction"]["iteration_time"] == pytest.approx(
        (2 * t["policy/collect"] + 16 * per_iteration) / 16
    )
    assert serial["prediction"]["teacher"]["busy"] == pytest.approx(t["teacher/teacher_score"])
    overlapped = predict(PRESETS["70b-7b"]())
    assert overlapped["phase_times"] == t  # same placement, same phases
    assert overlapped["prediction"]["iteration_time"] < serial["prediction"]["iteration_time"]
    # the RM block leaves the policy's critical path, and teacher and RM score the rollouts side by
    # side: rollout -> max(teacher score, RM score) -> update
    chain = (
        t["policy/rollout"] + max(t["teacher/teacher_score"], t["reward/score"]) + t["policy/policy_update"]
    )
    assert overlapped["prediction"]["iteration_time"] == pytest.approx(
        (2 * t["policy/collect"] + 16 * chain) / 16, rel=0.02
    )
    for out in (serial, overlapped):
        for role in ("policy", "reward", "teacher"):
            assert 0 <= out["prediction"][role]["idle_fraction"] <= 1
    colocated = predict(PRESETS["70b-7b-colocated"]())
    assert all(colocated["prediction"][r]["idle"] == 0 for r in ("policy", "reward", "teacher"))
    assert overlapped["placement"]["teacher"] == {
        "model": "llama2-70b", "params_b": 68.98, "first_rank": 0, "num_ranks": 8, "tp": 8, "pp": 1, "dp": 1,
    }  # fmt: skip
    for factory in PRESETS.values():
        assert check_plan(build_plan(factory().spec)) == []


def test_predict_with_measured_times_is_the_plan_simulator():
    scenario = PRESETS["70b-7b"]()
    measured = {key: float(i + 1) for i, key in enumerate(sorted(phase_times(scenario)))}
    out = predict(scenario, measured)
    assert out["phase_times_source"] == "measured" and out["phase_breakdown"] is None
    assert out["prediction"] == predict_from_measurements(build_plan(scenario.spec), measured)


# ---------------------------------------------------------------------------------------------
# rgkd-plan


def test_cli_preset_text_and_json(capsys):
    assert main(["--preset", "70b-7b"]) == 0
    text = capsys.readouterr().out
    assert "teacher  ranks   0-7   tp=8 pp=1 dp=1" in text and "predicted iteration time:" in text
    assert main(["--preset", "70b-7b", "--json", "--events"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["world_size"] == 32 and out["plan"]["per_round"] == {"policy": {"collect": 1}}
    assert len(out["events"]) == out["plan"]["events"]
    assert main(["--list-presets"]) == 0
    assert "70b-7b-colocated" in capsys.readouterr().out


def test_cli_recipe_with_measured_times(tmp_path, capsys):
    recipe = str(REPO / "examples" / "tiny_pbkd.yaml")  # 2 rounds x 3 iterations, k_r = k_p = 1
    measured = tmp_path / "m.json"
    measured.write_text(
        json.dumps(
            {
                "policy": {"collect": 1, "rollout": 2, "policy_update": 3},
                "reward/score": 1,
                "reward/rm_update": 4,
            }
        )
    )
    assert main(["--config", recipe, "--measured", str(measured), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prediction"]["iteration_time"] == pytest.approx((2 * 1 + 6 * (2 + 3 + 1 + 4)) / 6)
    measured.write_text(json.dumps({"policy/collect": 1}))
    assert main(["--config", recipe, "--measured", str(measured)]) == 2
    err = capsys.readouterr().err
    assert "no duration for reward/rm_update, policy/rollout, reward/score, policy/policy_update" in err
    bad = [
        "placement.mode=disaggregated",
        "placement.policy.num_ranks=2",
        "placement.reward.first_rank=1",
        "placement.reward.num_ranks=2",
    ]
    assert main(["--config", recipe, *bad]) == 2
    assert "placement.reward.first_rank: window [1, 3) of the reward role overlaps" in capsys.readouterr().err
    assert main(["--config", recipe, "schedule.overlap=true"]) == 2
    assert "schedule.overlap: expected false with placement.mode=colocated" in capsys.readouterr().err


def test_cli_recipe_flop_estimate_disaggregated(capsys):
    recipe = str(REPO / "examples" / "tiny_pbkd.yaml")
    args = ["placement.mode=disaggregated", "placement.policy.num_ranks=2", "placement.reward.first_rank=2"]
    args += [
        "placement.reward.num_ranks=1",
        "schedule.overlap=true",
        "model.vocab_size=256",
        "train.global_batch_size=8",
    ]
    assert main(["--config", recipe, *args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["world_size"] == 3 and out["placement"]["policy"]["dp"] == 2
    assert out["plan"]["staleness"] == 1 and out["phase_times_source"] == "flop_estimate"
