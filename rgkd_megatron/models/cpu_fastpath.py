"""CPU fast paths for megatron-core GPT models: the same mathematics as megatron's local spec,
without the work that costs a CPU step most. Only used without CUDA; the GPU path is untouched.

1. ``SdpaDotProductAttention`` (the local spec's core attention on CPU, ``models.specs``):
   megatron-core's ``DotProductAttention`` materialises the [b, np, sq, sk] scores (baddbmm, a masked
   fill with the causal mask, softmax, bmm); torch's ``scaled_dot_product_attention`` runs a fused
   flash kernel on CPU. The subclass keeps megatron's module (same parameters and state dicts) and
   hands every case it does not cover to megatron's implementation. Covered: fp32 inputs, no
   attention mask tensor, no attention bias, no packed sequences, vanilla softmax, no sliding
   window, no query-key layer scaling, no attention dropout in training, and a causal mask with
   sq == sk (training, prefill) or sq == 1 (a KV-cache decode step, no mask: as megatron's softmax
   does), or no mask at all.
2. ``batch_major_output_layer`` (hooks on ``GPTModel.output_layer``, installed by the builders):
   ``GPTModel`` computes logits [s, b, V] and returns ``logits.transpose(0, 1).contiguous()``; the
   backward then copies the [s, b, V] gradient twice more (``matmul`` and megatron's wgrad
   preparation each make the non-contiguous gradient contiguous). Feeding the output layer the
   hidden states batch-major ([b, s, h], a copy V/h times smaller) gives [b, s, V] logits whose
   transpose back is free, and a contiguous gradient. Skipped under sequence parallelism (the
   output layer then gathers along the sequence dimension) and when the forward is given ``labels``
   (megatron's own loss then reads the [s, b, V] logits).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


def sdpa_is_causal(mask_type: AttnMaskType, sq: int, sk: int) -> bool | None:
    """``is_causal`` for SDPA, or None when SDPA cannot reproduce megatron's masking."""
    if mask_type == AttnMaskType.no_mask:
        return False
    if mask_type == AttnMaskType.causal:
        if sq == sk:
            return sq > 1
        if sq == 1:
            return False  # a decode step attends to the whole cache (megatron: no mask for sq == 1)
    return None


class SdpaDotProductAttention(DotProductAttention):
    """``DotProductAttention`` through ``F.scaled_dot_product_attention`` where it is exact."""

    def _sdpa_supported(self, query: torch.Tensor, attention_mask, attention_bias, packed_seq_params) -> bool:
        config = self.config
        return (
            query.dtype == torch.float32
            and attention_mask is None
            and attention_bias is None
            and packed_seq_params is None
            and self.softmax_offset is None
            and self.scale_mask_softmax.window_size is None
            and not config.apply_query_key_layer_scaling
            and (self.attention_dropout.p == 0.0 or not self.training)
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] -> context [sq, b, np * hn]."""
        sq, b, sk = query.shape[0], query.shape[1], key.shape[0]
        # megatron's softmax masks by the construction-time type (the argument is unused there too)
        is_causal = sdpa_is_causal(self.attn_mask_type, sq, sk)
        if is_causal is None or not self._sdpa_supported(
            query, attention_mask, attention_bias, packed_seq_params
        ):
            return super().forward(
                query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params
            )
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        # [s, b, n, hn] -> [b, n, s, hn]; query head i reads kv head i // groups (as megatron's
        # repeat_interleave; SDPA's enable_gqa reads them in place, no [b, n, sk, hn] copies)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        context = F.scaled_dot_product_attention(
            q, k, v, is_causal=is_causal, scale=self.softmax_scale, enable_gqa=groups > 1
        )
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)


_LABELS_ARG = 4  # GPTModel.forward(input_ids, position_ids, attention_mask, decoder_input, labels, ...)


def _note_labels(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    labels = kwargs.get("labels", args[_LABELS_ARG] if len(args) > _LABELS_ARG else None)
    model.output_layer._rgkd_logits_returned = labels is None  # with labels megatron needs [s, b, V]


def _to_batch_major(layer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    layer._rgkd_batch_major = bool(
        layer._rgkd_logits_returned and not layer.sequence_parallel and args and args[0].dim() == 3
    )
    if not layer._rgkd_batch_major:
        return None
    hidden_bsh = args[0].transpose(0, 1).contiguous()
    # strides recomputed from the shape: ``contiguous`` keeps the transposed stride of a size-1
    # dimension ([b, 1, h] at a decode step), on which ``torch.matmul`` with a frozen weight does
    # not fold into one GEMM (it broadcasts the weight into a batched product)
    return (hidden_bsh.view(hidden_bsh.shape), *args[1:]), kwargs


def _back_to_sequence_major(layer: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    if not layer._rgkd_batch_major:
        return None
    logits_bsv, bias = output
    return logits_bsv.transpose(0, 1), bias  # [s, b, V] view of batch-major memory


def batch_major_output_layer(model: torch.nn.Module) -> None:
    """Install the batch-major output-layer hooks on a ``GPTModel`` that has an output layer (only
    when the forward returns logits: with ``labels`` megatron's loss reads [s, b, V] memory)."""
    layer = getattr(model, "output_layer", None)
    if layer is None:
        return
    layer._rgkd_logits_returned = False
    model.register_forward_pre_hook(_note_labels, with_kwargs=True)
    layer.register_forward_pre_hook(_to_batch_major, with_kwargs=True)
    layer.register_forward_hook(_back_to_sequence_major, with_kwargs=True)
