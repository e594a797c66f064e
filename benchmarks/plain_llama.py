"""A plain PyTorch Llama-style decoder (no megatron) with the architecture of our policy.

RMSNorm, SwiGLU, non-interleaved RoPE, GQA, no biases, tied or untied embeddings; attention through
``F.scaled_dot_product_attention(is_causal=True)``. ``load_from_mcore`` copies the weights of a
megatron-core ``GPTModel`` (TP=1, PP=1, local or TE spec) into it, so the two can be compared
(``tests/unit/test_plain_reference.py``) and timed against each other (``step_overhead.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PlainConfig:
    vocab_size: int  # the PADDED vocabulary (same rows as the megatron embedding)
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True

    @classmethod
    def from_model_config(cls, model_cfg, padded_vocab: int) -> PlainConfig:
        """From our ``rgkd_megatron.config.schema.ModelConfig`` (RoPE scaling is not implemented here)."""
        if model_cfg.rotary_scaling_factor is not None or model_cfg.add_qkv_bias:
            raise ValueError("plain_llama: rotary scaling and QKV bias are not implemented")
        return cls(
            vocab_size=padded_vocab,
            hidden_size=model_cfg.hidden_size,
            ffn_hidden_size=model_cfg.ffn_hidden_size,
            num_layers=model_cfg.num_layers,
            num_heads=model_cfg.num_attention_heads,
            num_kv_heads=model_cfg.num_query_groups or model_cfg.num_attention_heads,
            rotary_base=model_cfg.rotary_base,
            norm_epsilon=model_cfg.norm_epsilon,
            tie_word_embeddings=model_cfg.tie_word_embeddings,
        )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Block(nn.Module):
    def __init__(self, cfg: PlainConfig) -> None:
        super().__init__()
        h, self.hd = cfg.hidden_size, cfg.hidden_size // cfg.num_heads
        self.nh, self.nkv = cfg.num_heads, cfg.num_kv_heads
        self.attn_norm = nn.RMSNorm(h, eps=cfg.norm_epsilon)
        self.q_proj = nn.Linear(h, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(h, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(h, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, h, bias=False)
        self.mlp_norm = nn.RMSNorm(h, eps=cfg.norm_epsilon)
        self.gate_proj = nn.Linear(h, cfg.ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(h, cfg.ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden_size, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        y = self.attn_norm(x)
        q = self.q_proj(y).view(b, s, self.nh, self.hd).transpose(1, 2)  # [b, nh, s, hd]
        k = self.k_proj(y).view(b, s, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(y).view(b, s, self.nkv, self.hd).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if self.nkv != self.nh:  # query head i reads kv head i // (nh / nkv)
            k = k.repeat_interleave(self.nh // self.nkv, dim=1)
            v = v.repeat_interleave(self.nh // self.nkv, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, s, self.nh * self.hd))
        y = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))


class PlainLlama(nn.Module):
    def __init__(self, cfg: PlainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_epsilon)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        hd = cfg.hidden_size // cfg.num_heads
        inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, tokens_bs: torch.Tensor) -> torch.Tensor:
        """Logits [b, s, vocab] (positions 0..s-1, causal)."""
        freqs = torch.outer(torch.arange(tokens_bs.shape[1], dtype=self.inv_freq.dtype), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        x = self.embed(tokens_bs)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.final_norm(x))


def load_from_mcore(model: PlainLlama, state_dict: dict) -> None:
    """Copy a megatron-core GPTModel state dict (TP=1, PP=1; a DDP ``module.`` prefix is fine) into
    ``model``. linear_qkv rows are [q (nh/ng heads), k, v] per query group; linear_fc1 is [gate; up]."""
    sd = {k.removeprefix("module."): v for k, v in state_dict.items() if not k.endswith("_extra_state")}
    cfg, used = model.cfg, set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return sd[name]

    hd, ng = cfg.hidden_size // cfg.num_heads, cfg.num_kv_heads
    per = cfg.num_heads // ng
    with torch.no_grad():
        model.embed.weight.copy_(take("embedding.word_embeddings.weight"))
        if not cfg.tie_word_embeddings:
            model.lm_head.weight.copy_(take("output_layer.weight"))
        model.final_norm.weight.copy_(take("decoder.final_layernorm.weight"))
        for i, blk in enumerate(model.layers):
            p = f"decoder.layers.{i}."
            blk.attn_norm.weight.copy_(take(p + "input_layernorm.weight"))
            qkv = take(p + "self_attention.linear_qkv.weight").view(ng, per + 2, hd, cfg.hidden_size)
            blk.q_proj.weight.copy_(qkv[:, :per].reshape(-1, cfg.hidden_size))
            blk.k_proj.weight.copy_(qkv[:, per].reshape(-1, cfg.hidden_size))
            blk.v_proj.weight.copy_(qkv[:, per + 1].reshape(-1, cfg.hidden_size))
            blk.o_proj.weight.copy_(take(p + "self_attention.linear_proj.weight"))
            blk.mlp_norm.weight.copy_(take(p + "pre_mlp_layernorm.weight"))
            gate, up = take(p + "mlp.linear_fc1.weight").chunk(2, dim=0)
            blk.gate_proj.weight.copy_(gate)
            blk.up_proj.weight.copy_(up)
            blk.down_proj.weight.copy_(take(p + "mlp.linear_fc2.weight"))
    ignored = {"output_layer.weight"} if cfg.tie_word_embeddings else set()  # tied: a copy if present
    unused = sorted(set(sd) - used - ignored)
    if unused:
        raise KeyError(f"load_from_mcore: megatron weights not mapped: {unused}")


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """megatron-core's default grouping: no weight decay on 1-D params (norm weights, biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


def plain_train_step(model, optimizer, micro_batches: list[dict], clip_grad: float) -> float:
    """Token-mean masked next-token CE over all micro-batches (as megatron with per-token loss),
    backward, global-norm clipping, optimizer step. Returns the mean loss."""
    optimizer.zero_grad(set_to_none=True)
    count = sum(mb["loss_mask"].sum() for mb in micro_batches).clamp(min=1)
    total = 0.0
    for mb in micro_batches:
        logits = model(mb["tokens"])
        ce = F.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten(), reduction="none")
        loss = (ce * mb["loss_mask"].flatten()).sum() / count
        loss.backward()
        total += loss.item()
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    return total
