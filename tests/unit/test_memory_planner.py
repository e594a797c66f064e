"""Memory planner (rgkd_megatron.schedule.memory) and ``rgkd-plan --memory``: every formula against a
hand computation from published shapes and formulas (Megatron distributed-optimizer table,
Korthikanti et al. 2022 Table 2), refusal of layouts that cannot fit, and the CLI's exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from rgkd_megatron.schedule.cost_model import GPUS, PRESETS, SHAPES, ModelShape, RoleSetup, Scenario, Workload
from rgkd_megatron.schedule.memory import (
    GIB,
    MemoryOptions,
    kv_cache_bytes,
    layer_activation_bytes,
    plan_memory,
    stage_params,
    state_bytes_per_param,
    usable_bytes,
)
from rgkd_megatron.schedule.plan import PlanSpec

TRAIN_ONLY = PlanSpec(rounds=1, iterations_per_round=1, k_r=0, k_p=1, collect=False, reward_model=False,
                      rollouts=False)  # fmt: skip
LLAMA2_7B_PARAMS = 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 2 * 32000 * 4096 + (2 * 32 + 1) * 4096


def _train_scenario(shape, tp=1, pp=1, dp=1, seq=1024, rows=8, mbs=1, gpu="H100-80GB") -> Scenario:
    wl = Workload(prompt_len=seq, response_len=0, seq_length=seq, pairs_per_round=0, rollout_rows=0,
                  policy_rows=rows, micro_batch_size=mbs, reference_forward=False)  # fmt: skip
    return Scenario("t", "t", GPUS[gpu], 8, {"policy": RoleSetup(shape, tp, pp, dp)}, TRAIN_ONLY, wl)


def test_llama2_7b_parameters_and_18_bytes_per_param():
    # published shape: 32 layers, h 4096, SwiGLU 11008, 32 heads (MHA), vocab 32000, untied: 6.74B
    shape = SHAPES["llama2-7b"]
    assert stage_params(shape, 1, 1, "all") == LLAMA2_7B_PARAMS
    assert LLAMA2_7B_PARAMS == pytest.approx(6.74e9, rel=1e-3)
    rep = plan_memory(_train_scenario(shape), MemoryOptions(distributed_optimizer=False))[0]
    c = rep.components
    assert c["weights"] + c["grads"] + c["optimizer"] == pytest.approx(18 * 6.738e9, rel=1e-3)
    assert (c["weights"], c["grads"], c["optimizer"]) == pytest.approx(
        (2 * LLAMA2_7B_PARAMS, 4 * LLAMA2_7B_PARAMS, 12 * LLAMA2_7B_PARAMS)
    )
    assert c["other"] == 4 * 1024**3 and not rep.fits  # 121 GB of state alone
    assert "policy" in rep.reason and "parallel.use_distributed_optimizer=true" in rep.reason


def test_distributed_optimizer_shards_only_the_12_bytes_over_dp():
    # Megatron table, bf16 params + fp32 grads: 18 bytes replicated, 6 + 12/d distributed
    for d in (1, 2, 8, 64):
        per = state_bytes_per_param(True, True, d)
        assert sum(per.values()) == pytest.approx(6 + 12 / d)
        assert sum(state_bytes_per_param(True, False, d).values()) == 18
    assert sum(state_bytes_per_param(False, True, 8).values()) == 2  # frozen: bf16 weights only
    shape = SHAPES["llama2-7b"]
    sc = _train_scenario(shape, tp=2, dp=8, rows=64)
    rep = plan_memory(sc, MemoryOptions(distributed_optimizer=True))[0]
    per_gpu = 32 * (4 * 4096**2 + 3 * 4096 * 11008) / 2 + 32 * 2 * 4096 + 2 * 32000 * 4096 / 2 + 4096
    assert rep.components["optimizer"] == pytest.approx(12 * per_gpu / 8)
    assert rep.components["grads"] == pytest.approx(4 * per_gpu)


def test_activation_formula_is_korthikanti_table_2():
    s, b, h, a, t = 16, 2, 8, 2, 2  # GPT block: 4h GeLU MLP with dropout, unfused attention
    kw = dict(mlp_factor=4.0, dropout=True, flash=False)
    sbh = s * b * h
    assert layer_activation_bytes(s, b, h, a, 4 * h, 1, **kw) == sbh * (34 + 5 * a * s / h)
    assert layer_activation_bytes(s, b, h, a, 4 * h, t, **kw) == sbh * (10 + 24 / t + 5 * a * s / (h * t))
    assert layer_activation_bytes(s, b, h, a, 4 * h, t, sp=True, **kw) == sbh * (34 + 5 * a * s / h) / t
    assert layer_activation_bytes(s, b, h, a, 4 * h, t, recompute="selective", **kw) == sbh * (10 + 24 / t)
    sel = layer_activation_bytes(s, b, h, a, 4 * h, t, sp=True, recompute="selective", **kw)
    assert sel == sbh * 34 / t
    assert layer_activation_bytes(s, b, h, a, 4 * h, t, recompute="full", **kw) == 2 * sbh
    assert layer_activation_bytes(s, b, h, a, 4 * h, t, sp=True, recompute="full", **kw) == 2 * sbh / t
    # flash attention never stores the s x s scores: same as selective recompute
    assert layer_activation_bytes(s, b, h, a, 4 * h, t, mlp_factor=4.0, dropout=True) == sbh * (10 + 24 / t)
    # Llama block (no dropout, SwiGLU f): norms + QKV/MLP inputs 8, Q K V + attention out 8, 3 x 2 s b f
    f = 24
    assert layer_activation_bytes(s, b, h, a, f, t) == sbh * 8 + (sbh * 8 + 6 * s * b * f) / t


def test_pipeline_in_flight_micro_batches_and_logits():
    shape = ModelShape("toy", 8, 64, 256, 4, 4, 1000)
    seq, mbs = 32, 2
    layer = layer_activation_bytes(seq, mbs, 64, 4, 256, 1)
    vocab = 1024  # padded to a multiple of 128
    logits = 4 * seq * mbs * vocab
    one = plan_memory(_train_scenario(shape, seq=seq, rows=16, mbs=mbs), MemoryOptions())[0]
    assert one.components["activations"] == pytest.approx(8 * layer + logits)
    # pp = 4, 8 micro-batches: the first stage holds 4 micro-batches of its 2 layers
    first = plan_memory(_train_scenario(shape, pp=4, seq=seq, rows=16, mbs=mbs), MemoryOptions())[0]
    assert first.stage == "first" and first.components["activations"] == pytest.approx(2 * layer * 4)
    # only 2 micro-batches: at most 2 in flight
    sc = _train_scenario(shape, pp=4, seq=seq, rows=4, mbs=mbs)
    few = plan_memory(sc, MemoryOptions(overhead_gib=0))[0]
    assert few.components["activations"] == pytest.approx(max(2 * layer * 2, 2 * layer + logits))


def test_kv_cache_bytes_by_hand():
    # Llama-2-70B: 80 layers, 8 KV heads x 128 dims; K and V in bf16 = 2 * 8 * 128 * 2 = 4096 B/layer/token
    s = SHAPES["llama2-70b"]
    assert kv_cache_bytes(s, 1, 1, 4, 1024) == 80 * 4096 * 4 * 1024
    assert kv_cache_bytes(s, 8, 1, 4, 1024) == 80 * 4096 * 4 * 1024 / 8
    assert kv_cache_bytes(s, 8, 2, 4, 1024) == 40 * 4096 * 4 * 1024 / 8
    # TP beyond the KV heads replicates them: 1 head per rank, not 0.5
    assert kv_cache_bytes(s, 16, 1, 4, 1024) == kv_cache_bytes(s, 8, 1, 4, 1024)


def test_cache_reader_buffers():
    shape = ModelShape("toy", 2, 64, 256, 4, 4, 1000)
    sc = _train_scenario(shape, seq=128, rows=8, mbs=4)
    sc = replace(sc, workload=replace(sc.workload, topk=16))
    rep = plan_memory(sc, MemoryOptions(cache_reader=True))[0]
    # depth 2 prefetched + 1 in use, 4 x 128 tokens, 16 x (4 + 2) + 8 bytes per token
    assert rep.components["cache_buffers"] == 3 * 4 * 128 * (16 * 6 + 8)
    assert plan_memory(sc, MemoryOptions())[0].components["cache_buffers"] == 0


def test_70b_teacher_refused_at_tp1_and_fits_at_tp8():
    sc = PRESETS["70b-7b"]("H100-80GB")
    teacher = sc.roles["teacher"]
    refused = plan_memory(replace(sc, roles={**sc.roles, "teacher": replace(teacher, tp=1)}))[0]
    assert refused.role == "teacher" and not refused.fits
    assert refused.components["weights"] == pytest.approx(2 * 68.98e9, rel=2e-3)  # 2 bytes x 69.0B params
    assert refused.reason.startswith("teacher (tp=1")
    assert "placement.teacher.tp=" in refused.reason and "largest: weights" in refused.reason
    ok = plan_memory(sc)[0]
    assert ok.role == "teacher" and ok.fits and not ok.reason
    assert ok.components["weights"] == pytest.approx(2 * 68.98e9 / 8, rel=2e-3)
    assert ok.components["grads"] == ok.components["optimizer"] == 0  # frozen
    assert usable_bytes(GPUS["H200-141GB"]) > usable_bytes(GPUS["H100-80GB"]) > 79 * GIB


def test_colocated_adds_every_roles_state():
    sc = PRESETS["70b-7b-colocated"]("H100-80GB")
    reps = {r.role: r for r in plan_memory(sc)}
    assert set(reps) == {"teacher", "policy", "reward", "colocated"}
    assert reps["colocated"].components["weights"] == pytest.approx(
        sum(reps[r].components["weights"] for r in ("teacher", "policy", "reward"))
    )


# ---------------------------------------------------------------------------------------------
# rgkd-plan --memory (subprocess)


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rgkd_megatron.cli.plan", *args], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip


def _recipe(tmp_path) -> str:
    teacher = tmp_path / "teacher_model.yaml"
    teacher.write_text(
        "model:\n  num_layers: 80\n  hidden_size: 8192\n  ffn_hidden_size: 28672\n  num_attention_heads: 64\n"
        "  num_query_groups: 8\n  vocab_size: 32000\n  tie_word_embeddings: false\n"
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: {num_layers: 32, hidden_size: 4096, ffn_hidden_size: 11008, num_attention_heads: 32,\n"
        "        vocab_size: 32000, tie_word_embeddings: false, max_position_embeddings: 1024}\n"
        "data: {seq_length: 1024}\ntrain: {micro_batch_size: 4, global_batch_size: 64}\n"
        "parallel: {use_distributed_optimizer: true}\n"
        f"pbkd: {{method: mm_pbkd, teacher_load: {tmp_path}/ckpt, teacher_model_config: {teacher},\n"
        "       prompts_per_step: 64, samples_per_prompt: 4, pairs_per_round: 512, max_new_tokens: 512}\n"
        "placement:\n  mode: disaggregated\n  teacher: {first_rank: 0, num_ranks: 8, tp: 8}\n"
        "  policy: {first_rank: 8, num_ranks: 16, tp: 2}\n  reward: {first_rank: 24, num_ranks: 8, tp: 2}\n"
        "schedule: {overlap: true, staleness: 1}\n"
    )
    return str(recipe)


def test_cli_preset_memory_prints_every_role():
    res = _run("--preset", "70b-7b", "--memory")
    assert res.returncode == 0, res.stderr
    table = res.stdout.split("memory per GPU")[1]
    for role in ("teacher", "policy", "reward"):
        assert f"\n  {role} " in table
    assert "predicted iteration time:" in res.stdout  # the step-time report is unchanged


def test_cli_recipe_memory_json_and_refusal(tmp_path):
    recipe = _recipe(tmp_path)
    res = _run("--config", recipe, "--memory", "--gpu", "H100-80GB", "--gpus-per-node", "8", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    mem = out["memory"]
    assert mem["fits"] and set(mem["roles"]) == {"teacher", "policy", "reward"}
    teacher = mem["roles"]["teacher"]
    # 80 layers of (2 h^2 + 2 h kv + 3 h f) / 8 + norms, embedding and output (32000 padded to 32768)
    h, kv, f = 8192, 1024, 28672
    params = 80 * ((2 * h * h + 2 * h * kv + 3 * h * f) / 8 + 2 * h) + 2 * 32768 * h / 8 + h
    assert teacher["components"]["weights"] == pytest.approx(2 * params)
    # the same recipe with the teacher squeezed onto one GPU cannot fit: exit 3, the reason on stderr
    squeeze = ["placement.teacher.tp=1", "placement.teacher.num_ranks=1", "placement.policy.first_rank=1",
               "placement.reward.first_rank=17"]  # fmt: skip
    res = _run("--config", recipe, "--memory", *squeeze)
    assert res.returncode == 3
    assert "does not fit: teacher (tp=1 pp=1 dp=1" in res.stderr and "placement.teacher.tp=" in res.stderr
    assert "NO" in res.stdout.split("memory per GPU")[1]
    assert _run("--config", recipe, "--memory", "--overhead-gib", "-1").returncode == 2
