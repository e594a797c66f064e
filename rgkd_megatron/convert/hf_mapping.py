"""Hugging Face Llama-family <-> megatron-core GPTModel: the architecture and the tensor mapping.

Supported families (one decoder block type: RMSNorm, SwiGLU, RoPE, GQA): ``LlamaForCausalLM``,
``MistralForCausalLM`` and ``Qwen2ForCausalLM`` (bias on q/k/v). Anything our builders cannot run
exactly (an o_proj/MLP bias, a head_dim other than hidden/heads, sliding-window attention, RoPE
types other than default and llama3, another activation) is refused with the config field named.

Megatron side: the keys of megatron-core's *distributed checkpoint* (not the module state dict).
These are layout-independent: per-layer tensors are stacked on a leading layer axis
(``decoder.layers.X`` has global shape [L, ...]) and the local spec maps its norm names onto the
Transformer Engine ones (``input_layernorm`` -> ``linear_qkv.layer_norm_weight``), so a checkpoint
loads at any TP/PP, local or TE spec. Row layouts (verified against megatron-core by the tests):

- ``linear_qkv``: per query group g (in order): its nh/ng query heads, then its key head, then its
  value head, each ``head_dim`` rows. HF has q, k and v as separate matrices; both use the same
  (non-interleaved, rotate-half) RoPE convention, so no permutation is needed.
- ``linear_fc1``: [gate; up] (SwiGLU), HF ``gate_proj`` and ``up_proj`` stacked.
- embedding / output layer: ``vocab_size`` rows padded with zeros to a multiple of
  ``make_vocab_size_divisible_by * TP`` (megatron's rule); the padding is dropped on the way back.

Everything here is pure (dicts and tensors in, dicts and tensors out); reading and writing files is
in ``hf_to_mcore`` / ``mcore_to_hf``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from rgkd_megatron.convert.common import ConversionError

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "LlamaFamily",
    "Rule",
    "hf_config_from_model_fields",
    "hf_shapes",
    "mapping_rules",
    "model_config_fields",
    "pack",
    "parse_hf_config",
    "unpack",
    "validate_layout",
]

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 32768, "qwen2": 32768}
# megatron-core's RotaryEmbedding._apply_scaling uses these fixed llama3 constants
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

EMBED = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
QKV_NORM = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
QKV = "decoder.layers.self_attention.linear_qkv.weight"
QKV_BIAS = "decoder.layers.self_attention.linear_qkv.bias"
PROJ = "decoder.layers.self_attention.linear_proj.weight"
FC1_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
FC1 = "decoder.layers.mlp.linear_fc1.weight"
FC2 = "decoder.layers.mlp.linear_fc2.weight"

IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)
"""Buffers some older checkpoints carry; recomputed from the config, so skipped."""


@dataclass(frozen=True)
class LlamaFamily:
    """The architecture of a supported HF checkpoint, in our terms."""

    architecture: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rope_scaling_factor: float | None
    norm_epsilon: float
    tie_word_embeddings: bool
    qkv_bias: bool
    init_std: float
    dtype: str | None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def summary(self) -> str:
        return (
            f"{self.architecture}: {self.num_layers} layers, hidden {self.hidden_size}, ffn "
            f"{self.ffn_hidden_size}, heads {self.num_heads} (kv {self.num_kv_heads}), vocab "
            f"{self.vocab_size}, {'tied' if self.tie_word_embeddings else 'untied'} embeddings"
            f"{', qkv bias' if self.qkv_bias else ''}, rope theta {self.rope_theta:g}"
            f"{f' (llama3 scaling x{self.rope_scaling_factor:g})' if self.rope_scaling_factor else ''}"
        )


def _positive_int(cfg: dict, name: str, default: Any = None) -> int:
    value = cfg.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConversionError(f"config.json: {name}: expected a positive integer, got {value!r}")
    return value


def _rope(cfg: dict, family: str) -> tuple[float, float | None]:
    params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ConversionError(f"config.json: rope_theta: expected a positive number, got {theta!r}")
    if float(theta) != int(theta):
        raise ConversionError(f"config.json: rope_theta={theta}: only integer RoPE bases are supported")
    scaling = cfg.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    field = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError("config.json: partial_rotary_factor: only 1.0 (full rotary) is supported")
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise ConversionError(
            f"config.json: {field}.rope_type={rope_type!r}: not supported (default or llama3 only)"
        )
    for name, expected in _LLAMA3_FIXED.items():
        if float(scaling.get(name, expected)) != expected:
            raise ConversionError(
                f"config.json: {field}.{name}={scaling.get(name)}: megatron-core's llama3 RoPE scaling "
                f"is fixed at {expected:g}"
            )
    factor = scaling.get("factor")
    if not isinstance(factor, (int, float)) or factor <= 0:
        raise ConversionError(f"config.json: {field}.factor: expected a positive number, got {factor!r}")
    return float(theta), float(factor)


def parse_hf_config(cfg: dict, ignore_sliding_window: bool = False) -> LlamaFamily:
    """Validate an HF ``config.json`` dict and return its architecture; errors name the field."""
    archs = cfg.get("architectures")
    if archs is None and cfg.get("model_type") in SUPPORTED_ARCHITECTURES.values():
        archs = [k for k, v in SUPPORTED_ARCHITECTURES.items() if v == cfg["model_type"]]
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"config.json: architectures={archs!r}: unsupported architecture (supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    arch = archs[0]
    family = SUPPORTED_ARCHITECTURES[arch]
    hidden = _positive_int(cfg, "hidden_size")
    heads = _positive_int(cfg, "num_attention_heads")
    kv_heads = _positive_int(cfg, "num_key_value_heads", heads) if cfg.get("num_key_value_heads") else heads
    if hidden % heads:
        raise ConversionError(
            f"config.json: hidden_size={hidden} is not divisible by num_attention_heads={heads}"
        )
    if heads % kv_heads:
        raise ConversionError(
            f"config.json: num_attention_heads={heads} is not divisible by num_key_value_heads={kv_heads}"
        )
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim != hidden // heads:
        raise ConversionError(
            f"config.json: head_dim={head_dim}: only hidden_size / num_attention_heads = {hidden // heads} "
            "is supported by our model builders"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"config.json: hidden_act={act!r}: only 'silu' (SwiGLU) is supported")
    if family == "llama":
        for name, what in (("attention_bias", "bias on q/k/v/o"), ("mlp_bias", "MLP biases")):
            if cfg.get(name, False):
                raise ConversionError(f"config.json: {name}=true: {what} not supported by our builders")
    window = cfg.get("sliding_window")
    uses_window = cfg.get("use_sliding_window", False) if family == "qwen2" else True
    if window is not None and uses_window and family in ("mistral", "qwen2") and not ignore_sliding_window:
        raise ConversionError(
            f"config.json: sliding_window={window}: sliding-window attention is not supported by our "
            "builders (full attention); pass --ignore-sliding-window to convert anyway (identical for "
            f"sequences of at most {window} tokens)"
        )
    theta, factor = _rope(cfg, family)
    eps = cfg.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, (int, float)) or eps <= 0:
        raise ConversionError(f"config.json: rms_norm_eps: expected a positive number, got {eps!r}")
    tied = cfg.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise ConversionError(f"config.json: tie_word_embeddings: expected true/false, got {tied!r}")
    return LlamaFamily(
        architecture=arch,
        num_layers=_positive_int(cfg, "num_hidden_layers"),
        hidden_size=hidden,
        ffn_hidden_size=_positive_int(cfg, "intermediate_size"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        vocab_size=_positive_int(cfg, "vocab_size"),
        max_position_embeddings=_positive_int(cfg, "max_position_embeddings", _DEFAULT_MAX_POSITIONS[family]),
        rope_theta=theta,
        rope_scaling_factor=factor,
        norm_epsilon=float(eps),
        tie_word_embeddings=tied,
        qkv_bias=family == "qwen2",
        init_std=float(cfg.get("initializer_range", 0.02)),
        dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
    )


def validate_layout(arch: LlamaFamily, tp: int, pp: int) -> None:
    """TP must divide heads, query groups and the FFN width; PP must divide the layers."""
    for name, value in (("--tp", tp), ("--pp", pp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConversionError(f"{name}: expected a positive integer, got {value!r}")
    problems = []
    for field, value in (
        ("num_attention_heads", arch.num_heads),
        ("num_key_value_heads", arch.num_kv_heads),
        ("intermediate_size", arch.ffn_hidden_size),
    ):
        if value % tp:
            problems.append(f"config.json: {field}={value} is not divisible by --tp {tp}")
    if arch.num_layers % pp:
        problems.append(f"config.json: num_hidden_layers={arch.num_layers} is not divisible by --pp {pp}")
    if problems:
        raise ConversionError("; ".join(problems))


def padded_vocab(arch: LlamaFamily, make_vocab_size_divisible_by: int, tp: int) -> int:
    multiple = make_vocab_size_divisible_by * tp
    return int(math.ceil(arch.vocab_size / multiple) * multiple)


def model_config_fields(arch: LlamaFamily, make_vocab_size_divisible_by: int) -> dict[str, Any]:
    """The ``model`` section (``rgkd_megatron.config.schema.ModelConfig`` fields) for this architecture."""
    return {
        "num_layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "ffn_hidden_size": arch.ffn_hidden_size,
        "num_attention_heads": arch.num_heads,
        "num_query_groups": arch.num_kv_heads if arch.num_kv_heads != arch.num_heads else None,
        "vocab_size": arch.vocab_size,
        "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
        "max_position_embeddings": arch.max_position_embeddings,
        "rotary_base": arch.rope_theta,
        "rotary_scaling_factor": arch.rope_scaling_factor,
        "norm_epsilon": arch.norm_epsilon,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "add_qkv_bias": arch.qkv_bias,
        "init_method_std": arch.init_std,
    }


def hf_config_from_model_fields(fields: dict[str, Any], dtype: str | None) -> dict[str, Any]:
    """An HF ``config.json`` (Llama, or Qwen2 when ``add_qkv_bias``) for a ``model`` section."""
    if fields.get("vocab_size") is None:
        raise ConversionError("model.vocab_size is null: pass --vocab-size (the tokenizer's vocabulary size)")
    qwen = bool(fields.get("add_qkv_bias"))
    heads = fields["num_attention_heads"]
    factor = fields.get("rotary_scaling_factor")
    cfg = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "hidden_size": fields["hidden_size"],
        "intermediate_size": fields["ffn_hidden_size"],
        "num_hidden_layers": fields["num_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": fields.get("num_query_groups") or heads,
        "vocab_size": fields["vocab_size"],
        "max_position_embeddings": fields["max_position_embeddings"],
        "rms_norm_eps": fields["norm_epsilon"],
        "rope_theta": float(fields["rotary_base"]),
        "rope_scaling": None
        if factor is None
        else {"rope_type": "llama3", "factor": factor, **_LLAMA3_FIXED},
        "tie_word_embeddings": fields["tie_word_embeddings"],
        "hidden_act": "silu",
        "initializer_range": fields.get("init_method_std", 0.02),
        "torch_dtype": dtype,
    }
    if not qwen:
        cfg.update(attention_bias=False, mlp_bias=False)
    return cfg


@dataclass(frozen=True)
class Rule:
    """One megatron dist-checkpoint tensor and the HF tensors it is made of."""

    key: str
    per_layer: bool
    hf: tuple[str, ...]
    kind: str  # copy | vocab | qkv | fc1
    tp_axis: int | None  # axis (of the per-layer tensor) split over TP; None = replicated

    def hf_names(self, layer: int | None = None) -> list[str]:
        return [t.format(i=layer) for t in self.hf]


def mapping_rules(arch: LlamaFamily) -> list[Rule]:
    p = "model.layers.{i}."
    rules = [
        Rule(EMBED, False, ("model.embed_tokens.weight",), "vocab", 0),
        Rule(QKV_NORM, True, (p + "input_layernorm.weight",), "copy", None),
        Rule(QKV, True, tuple(p + f"self_attn.{x}_proj.weight" for x in "qkv"), "qkv", 0),
    ]
    if arch.qkv_bias:
        rules.append(Rule(QKV_BIAS, True, tuple(p + f"self_attn.{x}_proj.bias" for x in "qkv"), "qkv", 0))
    rules += [
        Rule(PROJ, True, (p + "self_attn.o_proj.weight",), "copy", 1),
        Rule(FC1_NORM, True, (p + "post_attention_layernorm.weight",), "copy", None),
        Rule(FC1, True, (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"), "fc1", 0),
        Rule(FC2, True, (p + "mlp.down_proj.weight",), "copy", 1),
        Rule(FINAL_NORM, False, ("model.norm.weight",), "copy", None),
    ]
    if not arch.tie_word_embeddings:
        rules.append(Rule(OUTPUT, False, ("lm_head.weight",), "vocab", 0))
    return rules


def hf_shapes(arch: LlamaFamily) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the architecture has, with its shape."""
    h, f, hd = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    q, kv = arch.num_heads * hd, arch.num_kv_heads * hd
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    if arch.qkv_bias:
        per_layer.update(
            {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
        )
    shapes = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for i in range(arch.num_layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def mcore_shape(rule: Rule, arch: LlamaFamily, padded: int) -> tuple[int, ...]:
    """Shape of one megatron tensor (per layer, without the layer axis, for per-layer rules)."""
    h, f, hd = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    qkv_rows = (arch.num_heads + 2 * arch.num_kv_heads) * hd
    return {
        EMBED: (padded, h),
        OUTPUT: (padded, h),
        FINAL_NORM: (h,),
        QKV_NORM: (h,),
        QKV: (qkv_rows, h),
        QKV_BIAS: (qkv_rows,),
        PROJ: (h, arch.num_heads * hd),
        FC1_NORM: (h,),
        FC1: (2 * f, h),
        FC2: (h, f),
    }[rule.key]


def pack(rule: Rule, arch: LlamaFamily, tensors: list[torch.Tensor], padded: int) -> torch.Tensor:
    """HF tensors (in ``rule.hf`` order) -> the megatron tensor (one layer's slice for per-layer rules)."""
    if rule.kind == "copy":
        return tensors[0]
    if rule.kind == "vocab":
        t = tensors[0]
        pad = t.new_zeros((padded - t.shape[0], *t.shape[1:]))
        return torch.cat([t, pad]) if pad.numel() else t
    if rule.kind == "fc1":
        return torch.cat(tensors, dim=0)
    if rule.kind == "qkv":
        q, k, v = tensors
        ng, hd = arch.num_kv_heads, arch.head_dim
        per = arch.num_heads // ng
        rest = q.shape[1:]
        groups = [q.reshape(ng, per * hd, *rest), k.reshape(ng, hd, *rest), v.reshape(ng, hd, *rest)]
        return torch.cat(groups, dim=1).reshape(ng * (per + 2) * hd, *rest)
    raise AssertionError(rule.kind)


def unpack(rule: Rule, arch: LlamaFamily, tensor: torch.Tensor) -> list[torch.Tensor]:
    """The inverse of ``pack``: one megatron tensor -> its HF tensors (in ``rule.hf`` order)."""
    if rule.kind == "copy":
        return [tensor]
    if rule.kind == "vocab":
        return [tensor[: arch.vocab_size]]
    if rule.kind == "fc1":
        return list(tensor.chunk(2, dim=0))
    if rule.kind == "qkv":
        ng, hd = arch.num_kv_heads, arch.head_dim
        per = arch.num_heads // ng
        rest = tensor.shape[1:]
        grouped = tensor.reshape(ng, (per + 2) * hd, *rest)
        q, k, v = grouped.split([per * hd, hd, hd], dim=1)
        return [q.reshape(ng * per * hd, *rest), k.reshape(ng * hd, *rest), v.reshape(ng * hd, *rest)]
    raise AssertionError(rule.kind)
