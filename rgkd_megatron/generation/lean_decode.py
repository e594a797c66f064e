"""A lean KV-cached forward for generation on CPU: megatron-core's GPT mathematics, over the model's
own parameters, with one Python call per operation.

Why: on a CPU a decode step of a small model is short enough for framework work to show. Through
``GPTModel.forward`` with megatron's ``StaticInferenceContext`` each step walks ~14 modules per layer
(and their autograd-free wrappers), recomputes the rotary cos/sin per layer for the query and for the
key, and, because the static cache keeps keys *before* rotary, rotates every cached key again at
every step of every layer (O(length) work per step). This forward keeps rotated keys in its own
cache ([b, groups, length, head] per layer, SDPA's layout), computes cos/sin once per call, rotates
query and key in one expression, and otherwise makes the calls megatron makes: the model's own norm
modules, ``x @ W^T (+ b)`` through ``cpu_shortcuts.no_grad_product`` (what the linear layers compute
without a graph), ``scaled_dot_product_attention`` as ``models.cpu_fastpath`` does, megatron's
gated activation and residual order. It agrees with megatron's forward to fp32 rounding
(``tests/unit/test_lean_decode.py`` compares logits and greedy tokens, prefill and decode steps).

Where it runs: ``generate`` uses it when ``lean_decode_unsupported`` returns None: no CUDA, one rank
for TP / PP / CP, fp32 parameters, and a model this module covers exactly (the local spec's
``TransformerLayer`` with ``SelfAttention`` and a dense ``MLP``, RoPE without interleaving, no MLA /
MoE / output gate / query-key norm / attention sinks / sliding window / MTP). Anything else, and every GPU run, goes
through megatron's inference path unchanged. Inference only (no autograd graph is built).

Calls: one prefill of positions [0, s), then one position per call (``start`` = the cached length).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_layer import TransformerLayer

from rgkd_megatron.parallel.cpu_shortcuts import no_grad_product

__all__ = ["LeanDecoder", "lean_decode_unsupported"]

_CONFIG_FLAGS_OFF = (
    "multi_latent_attention",
    "num_moe_experts",
    "attention_output_gate",
    "apply_residual_connection_post_layernorm",
    "fp32_residual_connection",
    "rotary_interleaved",
    "apply_query_key_layer_scaling",
    "mtp_num_layers",
    "window_size",
    "activation_func_clamp_value",
    "qk_layernorm",
)


def lean_decode_unsupported(gpt: torch.nn.Module, tp: int, pp: int) -> str | None:
    """Why ``LeanDecoder`` cannot run ``gpt`` (an unwrapped GPTModel), or None when it can."""
    if torch.cuda.is_available():
        return "CUDA is available (megatron's inference path runs there)"
    cp = getattr(gpt.config, "context_parallel_size", 1)
    if (tp, pp, cp) != (1, 1, 1):
        return f"model parallel layout tp={tp} pp={pp} cp={cp} (needs one rank)"
    if not (getattr(gpt, "pre_process", False) and getattr(gpt, "post_process", False)):
        return "not a whole model (pre_process and post_process needed)"
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in gpt.parameters()):
        return "parameters are not all fp32 on the CPU"
    config = gpt.config
    for flag in _CONFIG_FLAGS_OFF:
        if getattr(config, flag, None):
            return f"config.{flag} is set"
    if getattr(config, "softmax_type", "vanilla") != "vanilla":
        return f"config.softmax_type={config.softmax_type!r}"
    if float(getattr(config, "glu_linear_offset", 0.0) or 0.0) != 0.0:
        return "config.glu_linear_offset is set"
    if (
        getattr(gpt, "position_embedding_type", None) != "rope"
        or type(gpt.rotary_pos_emb) is not RotaryEmbedding
    ):
        return "position embedding is not plain RoPE"
    if getattr(gpt, "mtp_process", False):
        return "multi-token prediction"
    for layer in gpt.decoder.layers:
        reason = _layer_unsupported(layer)
        if reason:
            return f"decoder layer {layer.layer_number}: {reason}"
    return None


def _layer_unsupported(layer: torch.nn.Module) -> str | None:
    if type(layer) is not TransformerLayer:
        return f"{type(layer).__name__} is not megatron's TransformerLayer"
    attn, mlp = layer.self_attention, layer.mlp
    if not isinstance(attn, SelfAttention) or not isinstance(attn.core_attention, DotProductAttention):
        return "attention is not SelfAttention with DotProductAttention"
    core = attn.core_attention
    if getattr(core, "softmax_offset", None) is not None or core.scale_mask_softmax.window_size is not None:
        return "attention sinks or a sliding window"
    if type(mlp) is not MLP or getattr(mlp.config, "use_te_activation_func", False):
        return "the MLP is not megatron's dense MLP"
    linears = (attn.linear_qkv, attn.linear_proj, mlp.linear_fc1, mlp.linear_fc2)
    kinds = (ColumnParallelLinear, RowParallelLinear, ColumnParallelLinear, RowParallelLinear)
    if any(type(lin) is not kind for lin, kind in zip(linears, kinds)):
        return "a linear layer is not megatron's local Column/RowParallelLinear (Transformer Engine?)"
    if any(
        norm is not None and not isinstance(norm, IdentityOp) for norm in (attn.q_layernorm, attn.k_layernorm)
    ):
        return "query/key layernorm"
    for name in ("pre_cross_attn_layernorm", "cross_attention"):
        if not isinstance(getattr(layer, name), IdentityOp):
            return f"{name} is not the identity"
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        if isinstance(getattr(layer, name), IdentityOp):
            return f"{name} is fused into the next linear (Transformer Engine)"
    return None


def _linear(x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    """``x @ W^T (+ b)`` of a megatron linear layer without a graph (its bias added, as
    ``skip_bias_add`` defers it to the bias-dropout-add, where eval mode adds it the same way)."""
    out = no_grad_product(x, layer.weight)
    return out if layer.bias is None else out + layer.bias


class LeanDecoder:
    """KV-cached forward of a whole GPTModel for ``batch`` rows of up to ``max_length`` positions.

    ``forward(tokens_bs, start)`` returns the logits [b, 1, V_padded] of the last position: call it
    once with ``start = 0`` (the prefill, any s >= 1), then with s = 1 and ``start`` = the number of
    positions already fed. Check ``lean_decode_unsupported`` first.
    """

    def __init__(self, gpt: torch.nn.Module, batch: int, max_length: int) -> None:
        config = gpt.config
        attn = gpt.decoder.layers[0].self_attention
        self.gpt = gpt
        self.layers = list(gpt.decoder.layers)
        self.heads = attn.num_attention_heads_per_partition
        self.groups = attn.num_query_groups_per_partition
        self.head_dim = attn.hidden_size_per_attention_head
        self.scale = attn.core_attention.softmax_scale
        self.activation = config.activation_func
        self.gated = config.gated_linear_unit
        self.max_length = max_length
        self.word_embeddings = gpt.embedding.word_embeddings.weight
        self.output_weight = (
            gpt.shared_embedding_or_output_weight()
            if gpt.share_embeddings_and_output_weights
            else gpt.output_layer.weight
        )
        freqs = gpt.rotary_pos_emb(max_length)  # [L, 1, 1, rot] as megatron's forward gets them
        self.rot_dim = freqs.shape[-1]
        self.cos = torch.cos(freqs).to(torch.float32).view(max_length, 1, 1, self.rot_dim)
        self.sin = torch.sin(freqs).to(torch.float32).view(max_length, 1, 1, self.rot_dim)
        shape = (batch, self.groups, max_length, self.head_dim)
        self.keys = [torch.zeros(shape) for _ in self.layers]
        self.values = [torch.zeros(shape) for _ in self.layers]
        self.length = 0

    def _rotate(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """megatron's ``_apply_rotary_pos_emb_bshd`` on x [b, s, ..., head] at positions [start, end)."""
        cos, sin = self.cos[start:end], self.sin[start:end]  # [s, 1, 1, rot] against [b, s, g, n, hn]
        if self.rot_dim == self.head_dim:
            x1, x2 = torch.chunk(x, 2, dim=-1)
            return x * cos + torch.cat((-x2, x1), dim=-1) * sin
        rot, rest = x[..., : self.rot_dim], x[..., self.rot_dim :]
        x1, x2 = torch.chunk(rot, 2, dim=-1)
        return torch.cat((rot * cos + torch.cat((-x2, x1), dim=-1) * sin, rest), dim=-1)

    @torch.no_grad()
    def forward(self, tokens_bs: torch.Tensor, start: int) -> torch.Tensor:
        b, s = tokens_bs.shape
        if start != self.length or (s > 1 and start != 0) or start + s > self.max_length:
            raise ValueError(
                f"LeanDecoder.forward: positions [{start}, {start + s}) after {self.length} cached "
                f"(a prefill from 0, then one position per call, up to {self.max_length})"
            )
        end = start + s
        per_group = self.heads // self.groups
        hidden = F.embedding(tokens_bs, self.word_embeddings)  # [b, s, h]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attention
            qkv = _linear(layer.input_layernorm(hidden), attn.linear_qkv)
            qkv = qkv.view(b, s, self.groups, per_group + 2, self.head_dim)
            qk = self._rotate(qkv[:, :, :, : per_group + 1], start, end)
            self.keys[i][:b, :, start:end] = qk[:, :, :, per_group].transpose(1, 2)
            self.values[i][:b, :, start:end] = qkv[:, :, :, per_group + 1].transpose(1, 2)
            query = qk[:, :, :, :per_group].reshape(b, s, self.heads, self.head_dim).transpose(1, 2)
            context = F.scaled_dot_product_attention(
                query, self.keys[i][:b, :, :end], self.values[i][:b, :, :end],
                is_causal=s > 1, scale=self.scale, enable_gqa=per_group > 1,
            )  # fmt: skip
            context = context.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
            hidden = hidden + _linear(context, attn.linear_proj)
            mlp = layer.mlp
            inner = _linear(layer.pre_mlp_layernorm(hidden), mlp.linear_fc1)
            if self.gated:
                gate, linear = torch.chunk(inner, 2, dim=-1)
                inner = self.activation(gate) * linear
            else:
                inner = self.activation(inner)
            hidden = hidden + _linear(inner, mlp.linear_fc2)
        last = self.gpt.decoder.final_layernorm(hidden[:, -1:])
        logits = no_grad_product(last, self.output_weight)
        self.length = end
        return logits
