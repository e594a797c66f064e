"""Cost model: phase times of a plan from FLOP / bandwidth estimates, fed to the plan simulator.

Predicts, for cluster placements that cannot run here, the seconds of each (role, action) of the
plan and, through ``plan.simulate``, the iteration time and every role's idle fraction. With
measured phase times instead (``plan.predict_from_measurements``) the same simulator applies.

Model (every constant below is a field, so a user can replace it):
- FLOPs of a Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA): a forward over T tokens costs
  2 * N_mm * T, N_mm the parameters used in matmuls (the layers' linear weights plus the output
  layer; the input embedding is a lookup), plus attention scores and values: 4 * s^2 * h per layer
  per sequence of length s, halved for causal masking (what flash attention computes). Backward is
  twice the forward, so a training step is 3 forwards (no recomputation). This lands within a few
  percent of the 6 * N * D rule at 7B/70B shapes and 2k context (tested).
- Compute-bound phases (training, scoring, prefill): FLOPs / (GPUs * bf16 dense peak * MFU).
  Default MFU 0.40: Megatron-Core reports up to 47% on H100 for large GPT models; 7B-class steps
  with short sequences run lower, so 0.40 is a round middle estimate.
- Generation: prefill as a forward; then per new token a decode step per model replica, the slower
  of its matmul FLOPs at MFU and its memory traffic (every weight once, plus the KV cache read,
  bf16) at ``hbm_efficiency`` (default 0.70) of the HBM bandwidth. PP does not shorten a decode step
  (stages run one after another), TP divides it. Batches are split evenly over the DP replicas.
- Communication: TP all-reduces of activations (2 per layer forward, 2 more backward) over NVLink
  (InfiniBand if TP spans nodes); the DP gradient all-reduce (fp32 gradients, not overlapped) over
  InfiniBand when the DP group spans nodes, else NVLink; PP fill/drain activation sends; ring
  all-reduce time = latency + 2 (n-1)/n * bytes / (link bandwidth * ``comm_efficiency``).
  Teacher top-k (k ids int32 + k log-probs bf16 per token) crossing to the policy window over IB.
- Pipeline bubble (1F1B): (pp - 1) / micro-batches on top of the compute.
Not modelled here: memory capacity (see ``memory.py``, ``rgkd-plan --memory``), kernel launch
overheads, straggling.

GPU specs (dense bf16 peak, HBM, per-GPU one-direction link bandwidth): H100 SXM 80GB: 989 TFLOP/s,
3.35 TB/s, NVLink 4 450 GB/s; H200 SXM 141GB: 989 TFLOP/s, 4.8 TB/s, NVLink 450 GB/s; both with one
400 Gb/s (50 GB/s) InfiniBand NDR NIC per GPU.

Usage::

    scenario = PRESETS["70b-7b"]()
    times = phase_times(scenario)                         # {"policy/rollout": s, ...}
    out = predict(scenario)                               # plan summary, phase times, per-role idle
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from rgkd_megatron.config.pbkd import live_kd_topk
from rgkd_megatron.methods import POLICY, REWARD, TEACHER, get_method
from rgkd_megatron.schedule.plan import EVALUATE, Plan, PlanSpec, build_plan, simulate

BF16_BYTES = 2
GRAD_BYTES = 4  # fp32 main gradients, reduced over DP


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_gb: float
    bf16_tflops: float
    """Dense bf16 peak, TFLOP/s."""
    hbm_tb_s: float
    """HBM bandwidth, TB/s."""
    nvlink_gb_s: float
    """NVLink bandwidth per GPU, one direction, GB/s."""
    ib_gb_s: float
    """InfiniBand bandwidth per GPU, one direction, GB/s."""


GPUS: dict[str, GPUSpec] = {
    "H100-80GB": GPUSpec("H100 SXM 80GB", 80, 989.0, 3.35, 450.0, 50.0),
    "H200-141GB": GPUSpec("H200 SXM 141GB", 141, 989.0, 4.8, 450.0, 50.0),
}


@dataclass(frozen=True)
class Efficiency:
    """Assumed fractions of peak (see the module docstring)."""

    mfu: float = 0.40
    """Fraction of the bf16 dense peak reached by training, scoring and prefill matmuls."""
    hbm_efficiency: float = 0.70
    """Fraction of the HBM bandwidth reached by decode steps."""
    comm_efficiency: float = 0.70
    """Fraction of the link bandwidth reached by NCCL collectives."""
    collective_latency_s: float = 10e-6
    """Fixed cost of one collective call."""


@dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder's shape."""

    name: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    tie_word_embeddings: bool = False

    @property
    def kv_dim(self) -> int:
        return self.num_query_groups * (self.hidden_size // self.num_attention_heads)

    @classmethod
    def from_model_config(cls, name: str, model: Any, vocab_size: int) -> ModelShape:
        """From a ``ModelConfig`` (``vocab_size`` unpadded, e.g. the tokenizer's)."""
        return cls(
            name, model.num_layers, model.hidden_size, model.ffn_hidden_size, model.num_attention_heads,
            model.num_query_groups or model.num_attention_heads, vocab_size, model.tie_word_embeddings,
        )  # fmt: skip


SHAPES: dict[str, ModelShape] = {
    "llama2-7b": ModelShape("llama2-7b", 32, 4096, 11008, 32, 32, 32000),
    "llama2-70b": ModelShape("llama2-70b", 80, 8192, 28672, 64, 8, 32000),
    "llama3-8b": ModelShape("llama3-8b", 32, 4096, 14336, 32, 8, 128256),
    "llama3-70b": ModelShape("llama3-70b", 80, 8192, 28672, 64, 8, 128256),
}


# ---------------------------------------------------------------------------------------------
# Parameters and FLOPs


def layer_matmul_params(s: ModelShape) -> int:
    """Linear weights of one layer: Q and O (h x h), K and V (h x kv_dim), SwiGLU (3 h x f)."""
    h = s.hidden_size
    return 2 * h * h + 2 * h * s.kv_dim + 3 * h * s.ffn_hidden_size


def matmul_params(s: ModelShape) -> int:
    """Parameters used in matmuls per token: all layers plus the output layer (tied or not)."""
    return s.num_layers * layer_matmul_params(s) + s.vocab_size * s.hidden_size


def param_count(s: ModelShape) -> int:
    """All parameters: layers, two RMSNorms per layer, final norm, embedding (+ output if untied)."""
    embeddings = s.vocab_size * s.hidden_size * (1 if s.tie_word_embeddings else 2)
    norms = (2 * s.num_layers + 1) * s.hidden_size
    return s.num_layers * layer_matmul_params(s) + embeddings + norms


def attention_flops(s: ModelShape, num_seqs: int, seq_len: int, causal: bool = True) -> float:
    """Scores (Q K^T) and values (A V): 2 matmuls x 2 s^2 h per layer per sequence; causal halves it."""
    full = 4.0 * seq_len * seq_len * s.hidden_size * s.num_layers * num_seqs
    return full / 2 if causal else full


def forward_flops(s: ModelShape, num_seqs: int, seq_len: int, causal: bool = True) -> float:
    """One forward over ``num_seqs`` sequences of ``seq_len`` tokens."""
    return 2.0 * matmul_params(s) * num_seqs * seq_len + attention_flops(s, num_seqs, seq_len, causal)


def training_flops(s: ModelShape, num_seqs: int, seq_len: int) -> float:
    """Forward + backward (2x forward), no recomputation."""
    return 3.0 * forward_flops(s, num_seqs, seq_len)


def decode_step_cost(s: ModelShape, batch: int, context: int) -> tuple[float, float]:
    """(FLOPs, HBM bytes) of one decode step of ``batch`` sequences attending to ``context`` tokens:
    every weight read once, plus K and V of the context (bf16)."""
    flops = 2.0 * matmul_params(s) * batch + 4.0 * context * s.hidden_size * s.num_layers * batch
    kv_bytes = 2 * s.num_layers * s.kv_dim * context * batch * BF16_BYTES
    return flops, float(param_count(s) * BF16_BYTES + kv_bytes)


# ---------------------------------------------------------------------------------------------
# A role's window on the cluster


@dataclass(frozen=True)
class RoleSetup:
    """One role's model and layout on the cluster."""

    shape: ModelShape
    tp: int = 1
    pp: int = 1
    dp: int = 1
    first_rank: int = 0

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass(frozen=True)
class Workload:
    """Sizes of each phase's batch (rows = sequences)."""

    prompt_len: int = 512
    response_len: int = 512
    seq_length: int = 1024
    """Training / scoring rows are padded to this."""
    pairs_per_round: int = 512
    """Sequences generated (and judged) by ``collect``."""
    rollout_rows: int = 256
    """Sequences generated per policy step (prompts_per_step x samples_per_prompt)."""
    policy_rows: int = 256
    """Rows of a policy step (MM-PbKD: on- and off-policy)."""
    reward_score_rows: int = 256
    """Rows the reward model scores per policy step."""
    rm_rows: int = 1024
    """Rows of an RM step (PbKD: teacher, student, chosen, rejected)."""
    teacher_rows: int = 256
    """Rows the teacher scores per policy step."""
    micro_batch_size: int = 4
    reference_forward: bool = True
    """The policy step also runs the frozen reference (KL term)."""
    topk: int = 64
    """Teacher top-k ids per token sent to the policy."""

    @classmethod
    def from_config(cls, cfg: Any) -> Workload:
        """From an ``RGKDConfig``: row counts as the PbKD / MM-PbKD / KD trainers build them (a Q-function
        adversary, ``MethodSpec.reward_head == "q"``, scores and trains on- and off-policy rows)."""
        p = cfg.pbkd
        rollouts = p.prompts_per_step * p.samples_per_prompt
        mm = get_method(p.method).reward_head == "q"
        return cls(
            prompt_len=max(1, cfg.data.seq_length - p.max_new_tokens),
            response_len=p.max_new_tokens,
            seq_length=cfg.data.seq_length,
            pairs_per_round=p.pairs_per_round,
            rollout_rows=rollouts,
            policy_rows=2 * rollouts if mm else rollouts + (p.prompts_per_step if p.seqkd_alpha > 0 else 0),
            reward_score_rows=2 * rollouts if mm else rollouts,
            rm_rows=3 * rollouts if mm else 4 * p.prompts_per_step,
            teacher_rows=2 * rollouts if mm else rollouts,
            micro_batch_size=cfg.train.micro_batch_size,
            reference_forward=p.kl_beta > 0,
            topk=live_kd_topk(p),
        )


@dataclass(frozen=True)
class Scenario:
    """A cluster placement, its plan spec and workload: everything ``predict`` needs."""

    name: str
    description: str
    gpu: GPUSpec
    gpus_per_node: int
    roles: dict[str, RoleSetup]
    spec: PlanSpec
    workload: Workload = field(default_factory=Workload)
    efficiency: Efficiency = field(default_factory=Efficiency)

    @property
    def world_size(self) -> int:
        return max(r.first_rank + r.gpus for r in self.roles.values())


# ---------------------------------------------------------------------------------------------
# Phase times


def allreduce_time(nbytes: float, n: int, bandwidth_gb_s: float, eff: Efficiency) -> float:
    """Ring all-reduce of ``nbytes`` over ``n`` ranks."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return eff.collective_latency_s + 2 * (n - 1) / n * nbytes / (bandwidth_gb_s * 1e9 * eff.comm_efficiency)


def _bandwidths(sc: Scenario, r: RoleSetup) -> tuple[float, float, float]:
    """(TP, DP, PP) link bandwidths: NVLink inside a node, InfiniBand across (rank order tp-dp-pp)."""
    node = sc.gpus_per_node
    tp_bw = sc.gpu.nvlink_gb_s if r.tp <= node else sc.gpu.ib_gb_s
    dp_bw = sc.gpu.nvlink_gb_s if r.tp * r.dp <= node else sc.gpu.ib_gb_s
    pp_bw = sc.gpu.nvlink_gb_s if r.gpus <= node else sc.gpu.ib_gb_s
    return tp_bw, dp_bw, pp_bw


def _pass_time(sc: Scenario, r: RoleSetup, rows: int, passes: float, train: bool) -> dict[str, float]:
    """Seconds of ``passes`` forwards (3 for a training step) over ``rows`` sequences of seq_length
    on the role's window: compute with the pipeline bubble, TP all-reduces, PP sends, DP grad sync."""
    wl, eff, s = sc.workload, sc.efficiency, r.shape
    seq = wl.seq_length
    rows_per_replica = math.ceil(rows / r.dp)
    micro = max(1, math.ceil(rows_per_replica / wl.micro_batch_size))
    flops = passes * forward_flops(s, rows_per_replica, seq)
    compute = flops / (r.tp * r.pp * sc.gpu.bf16_tflops * 1e12 * eff.mfu)
    bubble = compute * (r.pp - 1) / micro
    tp_bw, dp_bw, pp_bw = _bandwidths(sc, r)
    act_bytes = rows_per_replica * seq * s.hidden_size * BF16_BYTES
    per_layer = 2 * (2 if train else 1)  # all-reduces per layer: 2 forward, 2 more backward
    tp = per_layer * s.num_layers / r.pp * allreduce_time(act_bytes, r.tp, tp_bw, eff)
    pp_bytes = wl.micro_batch_size * seq * s.hidden_size * BF16_BYTES
    pp = (2 if train else 1) * (r.pp - 1) * pp_bytes / (pp_bw * 1e9 * eff.comm_efficiency)
    dp = allreduce_time(param_count(s) / (r.tp * r.pp) * GRAD_BYTES, r.dp, dp_bw, eff) if train else 0.0
    return {"flops": flops * r.dp, "compute": compute + bubble, "comm": tp + pp + dp}


def _generation_time(sc: Scenario, r: RoleSetup, rows: int) -> dict[str, float]:
    """Prefill of the prompts, then one decode step per response token, per DP replica."""
    wl, eff, s = sc.workload, sc.efficiency, r.shape
    batch = math.ceil(rows / r.dp)
    # One batch flows through the PP stages one after another, so a stage's share (1/pp of the work
    # on tp GPUs) times pp stages: the time of the whole model on tp GPUs.
    peak = r.tp * sc.gpu.bf16_tflops * 1e12 * eff.mfu
    prefill_flops = forward_flops(s, batch, wl.prompt_len)
    compute = prefill_flops / peak
    tp_bw = _bandwidths(sc, r)[0]
    comm = (
        2
        * s.num_layers
        * allreduce_time(batch * wl.prompt_len * s.hidden_size * BF16_BYTES, r.tp, tp_bw, eff)
    )
    flops = prefill_flops
    bandwidth = r.tp * sc.gpu.hbm_tb_s * 1e12 * eff.hbm_efficiency
    step_comm = 2 * s.num_layers * allreduce_time(batch * s.hidden_size * BF16_BYTES, r.tp, tp_bw, eff)
    for k in range(wl.response_len):
        step_flops, step_bytes = decode_step_cost(s, batch, wl.prompt_len + k)
        compute += max(step_flops / peak, step_bytes / bandwidth)
        comm += step_comm
        flops += step_flops
    return {"flops": flops * r.dp, "compute": compute, "comm": comm}


def _combine(*parts: dict[str, float]) -> dict[str, float]:
    out = {"flops": 0.0, "compute": 0.0, "comm": 0.0}
    for part in parts:
        for k in out:
            out[k] += part[k]
    out["seconds"] = out["compute"] + out["comm"]
    return out


def phase_breakdown(sc: Scenario) -> dict[str, dict[str, float]]:
    """Per "role/action" of the plan: FLOPs, compute seconds, communication seconds, total seconds."""
    wl = sc.workload
    plan = build_plan(sc.spec)
    out: dict[str, dict[str, float]] = {}
    for key in sorted({e.key for e in plan.events}):
        role, action = key.split("/")
        if role not in sc.roles:
            raise ValueError(f"scenario {sc.name}: the plan has {key} events but no {role} role is placed")
        r = sc.roles[role]
        if action in ("collect", "rollout"):
            rows = wl.pairs_per_round if action == "collect" else wl.rollout_rows
            out[key] = _combine(_generation_time(sc, r, rows))
        elif action == "policy_update":
            parts = [_pass_time(sc, r, wl.policy_rows, 3, train=True)]
            if wl.reference_forward:
                parts.append(_pass_time(sc, r, wl.policy_rows, 1, train=False))
            out[key] = _combine(*parts)
        elif action == "rm_update":
            out[key] = _combine(_pass_time(sc, r, wl.rm_rows, 3, train=True))
        elif action == "score":
            out[key] = _combine(_pass_time(sc, r, wl.reward_score_rows, 1, train=False))
        elif action == "judge":
            out[key] = _combine(_pass_time(sc, r, wl.pairs_per_round, 1, train=False))
        elif action == "teacher_score":
            part = _pass_time(sc, r, wl.teacher_rows, 1, train=False)
            if sc.spec.placement == "disaggregated":  # top-k crosses to the policy window
                nbytes = wl.teacher_rows * wl.seq_length * wl.topk * (4 + BF16_BYTES)
                links = min(r.gpus, sc.roles[POLICY].gpus)
                part["comm"] += nbytes / (links * sc.gpu.ib_gb_s * 1e9 * sc.efficiency.comm_efficiency)
            out[key] = _combine(part)
        elif action == EVALUATE:  # held-out evaluation: not part of the iteration time predicted here
            out[key] = _combine()
        else:  # pragma: no cover - an action this model does not know
            raise ValueError(f"no cost estimate for {key}")
    return out


def phase_times(sc: Scenario) -> dict[str, float]:
    """Seconds per "role/action" of the scenario's plan (FLOP / bandwidth estimate)."""
    return {k: v["seconds"] for k, v in phase_breakdown(sc).items()}


def predict(sc: Scenario, measured: Mapping[Any, float] | None = None) -> dict[str, Any]:
    """Plan summary, phase times (estimated, or ``measured``) and the per-iteration prediction."""
    plan: Plan = build_plan(sc.spec)
    breakdown = phase_breakdown(sc) if measured is None else None
    times = {k: v["seconds"] for k, v in breakdown.items()} if breakdown else dict(measured or {})
    sim = simulate(plan, times, roles=sc.roles)
    return {
        "scenario": sc.name,
        "description": sc.description,
        "gpu": sc.gpu.name,
        "gpus_per_node": sc.gpus_per_node,
        "world_size": sc.world_size,
        "placement": {
            role: {
                "model": r.shape.name,
                "params_b": round(param_count(r.shape) / 1e9, 2),
                "first_rank": r.first_rank,
                "num_ranks": r.gpus,
                "tp": r.tp,
                "pp": r.pp,
                "dp": r.dp,
            }
            for role, r in sc.roles.items()
        },  # fmt: skip
        "plan": plan.summary(),
        "phase_times_source": "flop_estimate" if breakdown else "measured",
        "phase_times": {str(k) if not isinstance(k, tuple) else "/".join(k): v for k, v in times.items()},
        "phase_breakdown": breakdown,
        "efficiency": asdict(sc.efficiency),
        "workload": asdict(sc.workload),
        "prediction": sim.per_iteration(),
    }


# ---------------------------------------------------------------------------------------------
# Presets


def _preset_70b_7b(mode: str = "disaggregated", overlap: bool = True, gpu: str = "H100-80GB") -> Scenario:
    """Online white-box MM-PbKD, Llama-2-70B -> Llama-2-7B on 4 nodes x 8 GPUs."""
    teacher, student = SHAPES["llama2-70b"], SHAPES["llama2-7b"]
    spec = PlanSpec(
        rounds=2, iterations_per_round=8, k_r=1, k_p=1, placement="colocated" if mode == "colocated" else "disaggregated",
        overlap=overlap and mode != "colocated",
        staleness=1, collect=True, reward_model=True, rollouts=True, teacher_scores=True,
    )  # fmt: skip
    n = 64 * 4  # prompts_per_step x samples_per_prompt
    workload = Workload(
        prompt_len=512, response_len=512, seq_length=1024, pairs_per_round=512, rollout_rows=n,
        policy_rows=2 * n, reward_score_rows=2 * n, rm_rows=3 * n, teacher_rows=2 * n, micro_batch_size=4,
    )  # fmt: skip
    if mode == "balanced":
        roles = {
            TEACHER: RoleSetup(teacher, tp=8, dp=2, first_rank=0),
            POLICY: RoleSetup(student, tp=2, dp=4, first_rank=16),
            REWARD: RoleSetup(student, tp=2, dp=4, first_rank=24),
        }
        where = "teacher TP=8 x DP=2 on nodes 0-1, student TP=2 x DP=4 on node 2, Q-function TP=2 x DP=4 on node 3"
    elif mode == "colocated":
        roles = {
            POLICY: RoleSetup(student, 8, 1, 4),
            REWARD: RoleSetup(student, 8, 1, 4),
            TEACHER: RoleSetup(teacher, 8, 1, 4),
        }
        where = "all three roles time-sliced on 32 GPUs at TP=8 x DP=4"
    else:
        roles = {
            TEACHER: RoleSetup(teacher, tp=8, dp=1, first_rank=0),
            POLICY: RoleSetup(student, tp=2, dp=8, first_rank=8),
            REWARD: RoleSetup(student, tp=2, dp=4, first_rank=24),
        }
        where = "teacher TP=8 on node 0, student TP=2 x DP=8 on nodes 1-2, Q-function TP=2 x DP=4 on node 3"
    name = {
        "colocated": "70b-7b-colocated",
        "balanced": "70b-7b-teacher-2-nodes",
        "disaggregated": "70b-7b" if overlap else "70b-7b-serial",
    }[mode]
    overlap_text = "overlap, staleness 1" if spec.overlap else "no overlap"
    return Scenario(
        name, f"MM-PbKD Llama-2-70B -> 7B, {where}; {overlap_text}", GPUS[gpu], 8, roles, spec, workload
    )


PRESETS = {
    "70b-7b": lambda gpu="H100-80GB": _preset_70b_7b("disaggregated", True, gpu),
    "70b-7b-serial": lambda gpu="H100-80GB": _preset_70b_7b("disaggregated", False, gpu),
    "70b-7b-colocated": lambda gpu="H100-80GB": _preset_70b_7b("colocated", False, gpu),
    "70b-7b-teacher-2-nodes": lambda gpu="H100-80GB": _preset_70b_7b("balanced", True, gpu),
}
"""Built-in scenarios: name -> factory(gpu name)."""
