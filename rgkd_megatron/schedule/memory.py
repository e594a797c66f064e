"""GPU memory planner: bytes per GPU of every role of a placement, and whether each fits.

Pure functions over the cost model's ``Scenario`` (no torch). For each placed role, per GPU of its
window (the most loaded pipeline stage):

- **weights**: bf16 parameters, 2 bytes each. The policy also holds its frozen reference copy when
  the KL term is on (``Workload.reference_forward``).
- **grads** and **optimizer** (trained roles: policy, reward): Megatron mixed precision keeps fp32
  main gradients (4 bytes) and fp32 master weights + Adam m, v (12 bytes): 2 + 4 + 12 = 18 bytes per
  parameter; the distributed optimizer shards the 12 bytes over DP: 6 + 12/d. This is the
  "bf16/fp16 param, fp32 grads" row of the Megatron Core distributed optimizer table
  (https://docs.nvidia.com/megatron-core/developer-guide/latest/distrib_optimizer.html).
- **activations** (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models", Table 2), per layer and micro-batch of s tokens x b sequences, width h, a heads, TP t:
  no SP: s b h (10 + 24/t + 5 a s / (h t)); SP: s b h (34 + 5 a s / h) / t; selective recompute (or
  flash attention, which never stores the s x s scores) drops the 5 a s / h term; full recompute
  keeps the layer input, 2 s b h (/ t with SP), plus one layer recomputed at a time. The "24" is
  8 + 16, the 16 being the 4h GeLU MLP (4 f / h with f = 4h); a SwiGLU MLP stores its gate, up and
  product outputs (3 x 2 s b f bytes), so ``mlp_factor`` = 6 for Llama shapes (4 = the paper's GPT).
  Without dropout (our models) the two s b h dropout masks drop out of the 10 and the scores term is
  2 a s / h (softmax output only). 1F1B keeps min(pp, micro-batches) micro-batches in flight on the
  first stage, so its activations are (layers / pp) x that count (Korthikanti s.4.2.3). The last
  stage adds the loss's fp32 logits, 4 s b V / t bytes.
- **kv_cache** (generation: policy rollouts and collection): 2 (K and V) x layers/pp x
  ceil(kv_heads/t) x head_dim x 2 bytes x batch x context, plus the prefill's bf16 logits
  (2 x batch x prompt x V / t) and the sampling step's fp32 logits.
- **cache_buffers**: teacher top-k per token, k x (4-byte id + 2-byte log-prob) + 8 bytes (fp32 lse
  and tail mass, ``rgkd_megatron.cache``): the off-policy cache reader's prefetched micro-batches
  (``TeacherCacheReader.prefetch`` default depth 2, plus the one in use; no config field) when
  ``pbkd.cache_path`` is set, and the live teacher's top-k of one step's rows on both the teacher
  and the policy when the teacher role is placed.
- **other**: CUDA context, NCCL buffers and allocator fragmentation: a flat ``overhead_gib``
  (default 4 GiB: ~0.5-1 GiB context, 1-2 GiB NCCL communicators and workspaces, the rest slack).

Frozen roles (teacher, reference): weights, and the forward working set of one layer plus logits.
Training and generation do not run at the same time on a rank, so the peak is
``weights + grads + optimizer + cache_buffers + other + max(activations, kv_cache)``. Colocated
placement time-slices every role on every rank: one more row adds all roles' resident state and the
largest transient. Not modelled: context parallelism, interleaved PP, FP8 weight copies, the
embedding's s b h per in-flight micro-batch, CPU offload.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from rgkd_megatron.methods import POLICY, REWARD, TEACHER, get_method
from rgkd_megatron.schedule.cost_model import (
    GPUSpec,
    ModelShape,
    RoleSetup,
    Scenario,
    layer_matmul_params,
)

GIB = 1024**3
USABLE_GIB = {"H100 SXM 80GB": 79.1, "H200 SXM 141GB": 139.8}
"""Memory a process can allocate (``torch.cuda.get_device_properties().total_memory``; H100 SXM:
85.0e9 bytes = 79.1 GiB). Other GPUs: 98% of ``memory_gb`` GiB."""
COMPONENTS = ("weights", "grads", "optimizer", "activations", "kv_cache", "cache_buffers", "other")
TRAINED = (POLICY, REWARD)


@dataclass(frozen=True)
class MemoryOptions:
    """What changes the footprint besides the layout (``from_config`` reads them from a recipe)."""

    distributed_optimizer: bool = True
    sequence_parallel: bool = False
    recompute: str = "none"
    """none | selective | full (``model.recompute``)."""
    flash_attention: bool = True
    """TE / flash attention: the s x s scores are never stored (``model.spec`` te or auto on GPU)."""
    overhead_gib: float = 4.0
    prefetch_depth: int = 2
    cache_reader: bool = False
    """The off-policy teacher cache is read (``pbkd.cache_path`` set)."""
    reward_head: str = "scalar"
    """scalar (PbKD reward model) | q (MM-PbKD Q-function: a vocab-wide output)."""
    vocab_divisible_by: int = 128
    mlp_factor: float = 6.0
    dropout: bool = False

    @classmethod
    def from_config(cls, cfg: Any, **kw: Any) -> MemoryOptions:
        """From an ``RGKDConfig``: parallel.use_distributed_optimizer, parallel.sequence_parallel,
        model.recompute, model.spec, pbkd.cache_path, the reward head of pbkd.method's ``MethodSpec``,
        model.make_vocab_size_divisible_by."""
        return cls(
            distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            sequence_parallel=cfg.parallel.sequence_parallel,
            recompute=cfg.model.recompute,
            flash_attention=cfg.model.spec != "local",
            cache_reader=bool(cfg.pbkd.cache_path),
            reward_head=get_method(cfg.pbkd.method).reward_head or "scalar",
            vocab_divisible_by=cfg.model.make_vocab_size_divisible_by,
            **kw,
        )


@dataclass
class MemoryReport:
    """One role's bytes per GPU (its most loaded stage) against the GPU's usable memory."""

    role: str
    layout: str
    stage: str
    components: dict[str, float]
    total: float
    capacity: float
    fits: bool
    reason: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["components_gib"] = {k: round(v / GIB, 3) for k, v in self.components.items()}
        out["total_gib"], out["capacity_gib"] = round(self.total / GIB, 3), round(self.capacity / GIB, 3)
        return out


# ---------------------------------------------------------------------------------------------
# Formulas


def usable_bytes(gpu: GPUSpec) -> float:
    """Allocatable bytes of one GPU (``USABLE_GIB``, else 0.98 x memory_gb GiB)."""
    return USABLE_GIB.get(gpu.name, 0.98 * gpu.memory_gb) * GIB


def padded_vocab(vocab: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron pads the vocabulary to a multiple of ``divisible_by * tp``."""
    m = divisible_by * tp
    return math.ceil(vocab / m) * m


def stage_params(s: ModelShape, tp: int, pp: int, stage: str, divisible_by: int = 128) -> float:
    """Parameters on one GPU of ``stage`` ("first" or "last"): layers/pp x (matmul weights / tp + two
    RMSNorms), the input embedding V h / tp on the first stage; the final norm and the output layer on
    the last (tied embeddings: the last stage still keeps a copy when pp > 1). pp = 1: both."""
    h, v = s.hidden_size, padded_vocab(s.vocab_size, tp, divisible_by)
    n = s.num_layers / pp * (layer_matmul_params(s) / tp + 2 * h)
    emb = v * h / tp
    if stage == "first" or pp == 1:
        n += emb
    if stage == "last" or pp == 1:
        n += h + (emb if (pp > 1 or not s.tie_word_embeddings) else 0)
    return n


def state_bytes_per_param(trained: bool, distributed_optimizer: bool, dp: int) -> dict[str, float]:
    """Bytes per parameter: weights 2 (bf16); trained: grads 4 (fp32 main grads), optimizer 12 (fp32
    master + Adam m + v), divided by dp with the distributed optimizer (Megatron: 18 or 6 + 12/d)."""
    if not trained:
        return {"weights": 2.0, "grads": 0.0, "optimizer": 0.0}
    return {"weights": 2.0, "grads": 4.0, "optimizer": 12.0 / dp if distributed_optimizer else 12.0}


def layer_activation_bytes(
    seq: int, mbs: int, hidden: int, heads: int, ffn: int, tp: int = 1, sp: bool = False,
    recompute: str = "none", flash: bool = True, mlp_factor: float = 6.0, dropout: bool = False,
) -> float:  # fmt: skip
    """Activation bytes one transformer layer keeps for backward, one micro-batch (Korthikanti Table 2).

    With ``mlp_factor=4, ffn=4*hidden, dropout=True, flash=False``: s b h (10 + 24/t + 5 a s/(h t))
    without SP, s b h (34 + 5 a s / h) / t with SP; selective recompute or flash: no 5 a s / h term;
    full recompute: 2 s b h (/ t with SP)."""
    sbh = seq * mbs * hidden
    if recompute == "full":
        return 2.0 * sbh / (tp if sp else 1)
    replicated = 10.0 if dropout else 8.0  # 2 norm inputs, QKV and MLP inputs (+ 2 dropout masks)
    scores = 0.0 if (flash or recompute == "selective") else (5.0 if dropout else 2.0) * heads * seq / hidden
    sharded = 8.0 + mlp_factor * ffn / hidden + scores  # Q K V, attention out, MLP
    if sp:
        return sbh * (replicated + sharded) / tp
    return sbh * (replicated + sharded / tp)


def kv_cache_bytes(s: ModelShape, tp: int, pp: int, batch: int, context: int) -> float:
    """2 (K, V) x layers/pp x ceil(kv_heads/tp) x head_dim x 2 bytes (bf16) x batch x context."""
    head_dim = s.hidden_size // s.num_attention_heads
    return 2.0 * s.num_layers / pp * math.ceil(s.num_query_groups / tp) * head_dim * 2 * batch * context


def topk_bytes_per_token(k: int, logprob_bytes: int = 2) -> int:
    """Teacher top-k per token: k ids (int32) + k log-probs (bf16) + lse and tail mass (fp32)."""
    return k * (4 + logprob_bytes) + 8


# ---------------------------------------------------------------------------------------------
# Per role


def _layout(r: RoleSetup) -> str:
    return f"tp={r.tp} pp={r.pp} dp={r.dp}"


def _role_stage(
    sc: Scenario, role: str, opts: MemoryOptions, stage: str
) -> tuple[dict[str, float], list[str]]:
    r, wl, s = sc.roles[role], sc.workload, sc.roles[role].shape
    trained = role in TRAINED
    tp, pp, h = r.tp, r.pp, s.hidden_size
    sp = opts.sequence_parallel and tp > 1
    vocab = padded_vocab(s.vocab_size, tp, opts.vocab_divisible_by)
    notes: list[str] = []
    params = stage_params(s, tp, pp, stage, opts.vocab_divisible_by)
    vocab_out = not (role == REWARD and opts.reward_head == "scalar")  # scalar RM: no output layer
    if role == REWARD and (stage == "last" or pp == 1):
        out_emb = vocab * h / tp if (pp > 1 or not s.tie_word_embeddings) else 0
        params += -out_emb + (h if opts.reward_head == "scalar" else h * h + vocab / tp)
    per = state_bytes_per_param(trained, opts.distributed_optimizer, r.dp)
    comp = {k: per[k] * params for k in ("weights", "grads", "optimizer")}
    if role == POLICY and wl.reference_forward:
        comp["weights"] += 2.0 * params
        notes.append("weights include the frozen reference copy (KL term)")
    seq, mbs = wl.seq_length, wl.micro_batch_size
    layer = layer_activation_bytes(
        seq, mbs, h, s.num_attention_heads, s.ffn_hidden_size, tp, sp, opts.recompute,
        opts.flash_attention, opts.mlp_factor, opts.dropout,
    )  # fmt: skip
    logits = 4.0 * seq * mbs * vocab / tp if (stage == "last" or pp == 1) and vocab_out else 0.0
    if trained:
        rows = {POLICY: wl.policy_rows, REWARD: wl.rm_rows}[role]
        micro = max(1, math.ceil(math.ceil(rows / r.dp) / mbs))
        in_flight = min(pp, micro) if stage == "first" else 1
        acts = s.num_layers / pp * layer * in_flight + logits
        if opts.recompute == "full":  # one layer recomputed at a time during backward
            acts += layer_activation_bytes(seq, mbs, h, s.num_attention_heads, s.ffn_hidden_size, tp, sp,
                                           "none", opts.flash_attention, opts.mlp_factor, opts.dropout)  # fmt: skip
        if pp > 1 and stage == "first":
            notes.append(f"1F1B: {in_flight} micro-batches in flight on the first stage")
    else:  # forward only: one layer's working set plus the logits
        acts = layer_activation_bytes(seq, mbs, h, s.num_attention_heads, s.ffn_hidden_size, tp, sp,
                                      "none", opts.flash_attention, opts.mlp_factor, opts.dropout) + logits  # fmt: skip
    comp["activations"] = acts
    kv = 0.0
    if role == POLICY and (sc.spec.rollouts or sc.spec.collect):
        batch = math.ceil(max(wl.rollout_rows if sc.spec.rollouts else 0,
                              wl.pairs_per_round if sc.spec.collect else 0) / r.dp)  # fmt: skip
        kv = kv_cache_bytes(s, tp, pp, batch, wl.prompt_len + wl.response_len)
        if stage == "last" or pp == 1:
            kv += 2.0 * batch * wl.prompt_len * vocab / tp + 4.0 * batch * vocab / tp
    comp["kv_cache"] = kv
    buffers = 0.0
    per_token = topk_bytes_per_token(wl.topk)
    if TEACHER in sc.roles and sc.spec.teacher_scores and role in (POLICY, TEACHER):
        buffers += math.ceil(wl.teacher_rows / r.dp) * seq * per_token
    if role == POLICY and opts.cache_reader:
        buffers += (opts.prefetch_depth + 1) * mbs * seq * per_token
    comp["cache_buffers"] = buffers
    comp["other"] = opts.overhead_gib * GIB
    return comp, notes


def peak_bytes(comp: dict[str, float]) -> float:
    """Resident state + the larger of the training/forward and the generation transients."""
    resident = sum(v for k, v in comp.items() if k not in ("activations", "kv_cache"))
    return resident + max(comp.get("activations", 0.0), comp.get("kv_cache", 0.0))


def _role_report(sc: Scenario, role: str, opts: MemoryOptions) -> MemoryReport:
    """The role's most loaded stage (first or last when pp > 1)."""
    r = sc.roles[role]
    best: tuple[str, dict[str, float], list[str]] | None = None
    for stage in ("first", "last") if r.pp > 1 else ("all",):
        comp, notes = _role_stage(sc, role, opts, stage)
        if best is None or peak_bytes(comp) > peak_bytes(best[1]):
            best = (stage, comp, notes)
    stage, comp, notes = best  # type: ignore[misc]
    total, capacity = peak_bytes(comp), usable_bytes(sc.gpu)
    return MemoryReport(role, _layout(r), stage, comp, total, capacity, total <= capacity, notes=notes)


def _fitting_layout(sc: Scenario, role: str, opts: MemoryOptions, field_tp: str, field_pp: str) -> str:
    """The smallest larger TP (within a node, dividing heads and query groups), else PP, that fits."""
    r = sc.roles[role]
    s = r.shape
    tps = [t for t in (2, 4, 8, 16) if r.tp < t <= sc.gpus_per_node]
    tps = [t for t in tps if s.num_attention_heads % t == 0 and s.num_query_groups % t == 0]
    for tp in tps:
        rep = _role_report(replace(sc, roles={**sc.roles, role: replace(r, tp=tp)}), role, opts)
        if rep.fits:
            return f"{field_tp}={tp} ({rep.total / GIB:.1f} GiB)"
    tp = tps[-1] if tps else r.tp
    for pp in (2, 4, 8, 16):
        if pp > r.pp and s.num_layers % pp == 0:
            rep = _role_report(replace(sc, roles={**sc.roles, role: replace(r, tp=tp, pp=pp)}), role, opts)
            if rep.fits:
                return f"{field_tp}={tp} {field_pp}={pp} ({rep.total / GIB:.1f} GiB)"
    return f"{field_tp}={tp} with a larger {field_pp}"


def _suggest(sc: Scenario, role: str, rep: MemoryReport, opts: MemoryOptions) -> str:
    colocated = sc.spec.placement == "colocated"
    r, comp = sc.roles[role], rep.components
    tp_f = "parallel.tensor_model_parallel_size" if colocated else f"placement.{role}.tp"
    pp_f = "parallel.pipeline_model_parallel_size" if colocated else f"placement.{role}.pp"
    largest = max(comp, key=lambda k: comp[k])
    ideas = []
    if largest == "kv_cache":
        ideas.append("fewer rollouts per DP replica (pbkd.prompts_per_step, pbkd.pairs_per_round)")
    if largest == "activations":
        if opts.recompute != "full":
            ideas.append(f"model.recompute={'full' if opts.recompute == 'selective' else 'selective'}")
        if not opts.sequence_parallel and r.tp > 1:
            ideas.append("parallel.sequence_parallel=true")
        ideas.append("a smaller train.micro_batch_size")
    if role in TRAINED and not opts.distributed_optimizer:
        ideas.append("parallel.use_distributed_optimizer=true")
    ideas.append(_fitting_layout(sc, role, opts, tp_f, pp_f))
    return "; ".join(ideas)


def plan_memory(sc: Scenario, opts: MemoryOptions | None = None) -> list[MemoryReport]:
    """A ``MemoryReport`` per placed role (its most loaded stage), plus one for colocated placement."""
    opts = opts or MemoryOptions()
    reports = [_role_report(sc, role, opts) for role in (TEACHER, POLICY, REWARD) if role in sc.roles]
    for rep in reports:
        if not rep.fits:
            largest = max(rep.components, key=lambda k: rep.components[k])
            rep.reason = (
                f"{rep.role} ({rep.layout}, {sc.roles[rep.role].shape.name}) needs {rep.total / GIB:.1f} GiB "
                f"per GPU, more than the {rep.capacity / GIB:.1f} GiB usable on {sc.gpu.name}; largest: "
                f"{largest} {rep.components[largest] / GIB:.1f} GiB; try {_suggest(sc, rep.role, rep, opts)}"
            )
    if sc.spec.placement == "colocated" and len(reports) > 1:
        comp = {k: 0.0 for k in COMPONENTS}
        for rep in reports:
            for k in ("weights", "grads", "optimizer", "cache_buffers"):
                comp[k] += rep.components[k]
            comp["activations"] = max(comp["activations"], rep.components["activations"])
            comp["kv_cache"] = max(comp["kv_cache"], rep.components["kv_cache"])
        comp["other"] = opts.overhead_gib * GIB
        total, capacity = peak_bytes(comp), usable_bytes(sc.gpu)
        rep = MemoryReport("colocated", reports[0].layout, "all", comp, total, capacity, total <= capacity,
                           notes=["every role's state resident on every rank, plus the largest transient"])  # fmt: skip
        if not rep.fits:
            rep.reason = (
                f"colocated roles ({rep.layout}) together need {total / GIB:.1f} GiB per GPU, more than the "
                f"{capacity / GIB:.1f} GiB usable on {sc.gpu.name}; largest: weights {comp['weights'] / GIB:.1f} "
                "GiB (all roles); try a larger parallel.tensor_model_parallel_size / "
                "parallel.pipeline_model_parallel_size, parallel.use_distributed_optimizer=true, or "
                "placement.mode=disaggregated"
            )
        reports.append(rep)
    return reports


def memory_summary(sc: Scenario, opts: MemoryOptions, reports: list[MemoryReport]) -> dict[str, Any]:
    """The ``memory`` key of ``rgkd-plan --json``."""
    return {
        "gpu": sc.gpu.name,
        "usable_gib": round(usable_bytes(sc.gpu) / GIB, 2),
        "options": asdict(opts),
        "fits": all(r.fits for r in reports),
        "roles": {r.role: r.to_dict() for r in reports},
    }


def render_memory(sc: Scenario, opts: MemoryOptions, reports: list[MemoryReport]) -> str:
    """The text table of ``rgkd-plan --memory`` (GiB per GPU)."""
    recompute = opts.recompute if opts.recompute != "none" else "no recompute"
    lines = [
        f"memory per GPU (GiB, {sc.gpu.name}, {usable_bytes(sc.gpu) / GIB:.1f} usable; "
        f"{'distributed' if opts.distributed_optimizer else 'replicated'} optimizer, "
        f"{'SP' if opts.sequence_parallel else 'no SP'}, {recompute}, "
        f"{'flash' if opts.flash_attention else 'unfused'} attention, {opts.overhead_gib:g} GiB overhead):",
        "  total = weights + grads + optimizer + cache buffers + other + max(activations, KV cache)",
        f"  {'role':<10} {'layout':<16} {'weights':>8} {'grads':>7} {'optim':>7} {'activ':>7} {'KV':>7} "
        f"{'cache':>6} {'other':>6} {'total':>7} {'capac':>7}  fits",
    ]
    for rep in reports:
        c = {k: rep.components[k] / GIB for k in COMPONENTS}
        lines.append(
            f"  {rep.role:<10} {rep.layout:<16} {c['weights']:8.1f} {c['grads']:7.1f} {c['optimizer']:7.1f} "
            f"{c['activations']:7.1f} {c['kv_cache']:7.1f} {c['cache_buffers']:6.2f} {c['other']:6.1f} "
            f"{rep.total / GIB:7.1f} {rep.capacity / GIB:7.1f}  {'yes' if rep.fits else 'NO'}"
        )
    for rep in reports:
        for note in rep.notes:
            lines.append(f"  note: {rep.role}: {note}")
    return "\n".join(lines)
