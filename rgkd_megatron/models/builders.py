"""Builders for the three roles' models on megatron-core ``GPTModel``.

- policy  (student): a Llama-style GPT (RMSNorm, SwiGLU, RoPE with configurable base/scaling, GQA,
  tied or untied embeddings) producing vocab-parallel logits;
- reward model: the same backbone spec with a TP-aware ``ScalarHead`` instead of the output layer;
  gives per-token values and, at the last response token, the sequence reward;
- teacher: the policy architecture in inference mode (eval, no grads).

Process groups come in explicitly (``RoleGroups``); nothing here reads a global of ours.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from rgkd_megatron.kernels.selection import fp8_kwargs, fusion_kwargs, model_selection, recompute_kwargs
from rgkd_megatron.models.cpu_fastpath import batch_major_output_layer
from rgkd_megatron.models.reward_head import ScalarHead
from rgkd_megatron.models.specs import gpt_layer_spec, resolve_spec_name
from rgkd_megatron.parallel.groups import RoleGroups

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_params_dtype(name: str) -> torch.dtype:
    """'auto' -> bf16 with CUDA, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"model.params_dtype: expected one of auto|fp32|bf16|fp16, got {name!r}")
    return _DTYPES[name]


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Smallest multiple of ``divisible_by * tp`` that is >= vocab_size (Megatron's rule)."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def transformer_config(model_cfg: Any, parallel_cfg: Any, **overrides: Any) -> TransformerConfig:
    """megatron-core TransformerConfig for our Llama-style architecture."""
    dtype = resolve_params_dtype(model_cfg.params_dtype)
    on_cpu = not torch.cuda.is_available()
    spec_name = resolve_spec_name(model_cfg.spec)
    recompute = recompute_kwargs(model_cfg.recompute)
    kwargs: dict[str, Any] = dict(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        kv_channels=model_cfg.hidden_size // model_cfg.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=model_cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model_cfg.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model_cfg.init_method_std,
        tensor_model_parallel_size=parallel_cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel_cfg.pipeline_model_parallel_size,
        sequence_parallel=parallel_cfg.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=on_cpu,
        calculate_per_token_loss=True,
        **recompute,
    )
    kwargs.update(fusion_kwargs(spec_name, on_cpu))  # fused kernels: GPU only, those that exist
    kwargs.update(fp8_kwargs(model_cfg, spec_name, dtype))  # {} unless model.fp8 is on
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _build_gpt(
    model_cfg: Any,
    parallel_cfg: Any,
    groups: RoleGroups,
    vocab_size: int,
    share_embeddings: bool,
    config_overrides: dict[str, Any] | None = None,
) -> GPTModel:
    if not groups.is_member:
        raise RuntimeError("cannot build a model on a rank outside the role's window")
    config = transformer_config(model_cfg, parallel_cfg, **(config_overrides or {}))
    padded = padded_vocab_size(vocab_size, model_cfg.make_vocab_size_divisible_by, groups.layout.tp)
    scaling = model_cfg.rotary_scaling_factor
    model = GPTModel(
        config=config,
        transformer_layer_spec=gpt_layer_spec(model_cfg.spec),
        vocab_size=padded,
        max_sequence_length=model_cfg.max_position_embeddings,
        pre_process=groups.is_first_stage,
        post_process=groups.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=share_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model_cfg.rotary_base),
        rope_scaling=scaling is not None,
        rope_scaling_factor=scaling if scaling is not None else 8.0,
        pg_collection=groups.pg_collection,
    )
    if not torch.cuda.is_available() and model.post_process:
        batch_major_output_layer(model)  # CPU only: no [s, b, V] logits copies (models/cpu_fastpath.py)
    # what runs (spec, dtype, fp8, recompute, fusions, kd kernel); build_engine completes and logs it
    model.kernel_selection = model_selection(model_cfg, config)
    return model


def build_policy(model_cfg: Any, parallel_cfg: Any, groups: RoleGroups, vocab_size: int) -> GPTModel:
    """Student policy: logits [b, s, V_padded / tp] (vocab-parallel) or per-token loss with labels."""
    return _build_gpt(model_cfg, parallel_cfg, groups, vocab_size, model_cfg.tie_word_embeddings)


def build_reward_model(model_cfg: Any, parallel_cfg: Any, groups: RoleGroups, vocab_size: int) -> GPTModel:
    """Reward model: the policy backbone with a scalar head; forward returns values [b, s, 1]."""
    model = _build_gpt(model_cfg, parallel_cfg, groups, vocab_size, share_embeddings=False)
    if model.post_process:
        model.output_layer = ScalarHead(model.config, groups.pg_collection.tp)
    return model


def build_teacher(model_cfg: Any, parallel_cfg: Any, groups: RoleGroups, vocab_size: int) -> GPTModel:
    """Teacher: the policy architecture in inference mode (no grads, eval)."""
    model = build_policy(model_cfg, parallel_cfg, groups, vocab_size)
    model.eval()
    model.requires_grad_(False)
    return model


def build_policy_skeleton(model_cfg: Any, parallel_cfg: Any, groups: RoleGroups, vocab_size: int) -> GPTModel:
    """The policy on the meta device (no memory, no initialisation): its ``sharded_state_dict()`` is
    the layout of the policy's checkpoint (keys, global shapes, dtypes), which the checkpoint
    converters (``rgkd_megatron.convert``) fill tensor by tensor. CPU initialisation is forced so
    that nothing is allocated on a GPU."""
    overrides = {"use_cpu_initialization": True, "perform_initialization": False}
    with torch.device("meta"):
        return _build_gpt(
            model_cfg, parallel_cfg, groups, vocab_size, model_cfg.tie_word_embeddings, overrides
        )


def sequence_rewards(values_bs: torch.Tensor, last_index_b: torch.Tensor) -> torch.Tensor:
    """Sequence reward = the value at each row's last response token. values [b, s] -> [b]."""
    return values_bs.gather(1, last_index_b.long().unsqueeze(1)).squeeze(1)
