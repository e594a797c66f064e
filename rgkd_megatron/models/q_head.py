"""Q-function backbone for MM-PbKD: the reward role's GPT with its output layer replaced by the
identity (forward returns hidden states [b, s, h]) and a bilinear Q head as a submodule (so DDP, the
optimizer and gradient clipping see its parameters)."""

from __future__ import annotations

import types

from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from torch import nn

from rgkd_megatron.losses.mm_pbkd import BilinearQHead


class HiddenStatesOut(nn.Module):
    """Stands in for GPTModel's output layer: returns the final hidden states."""

    def forward(self, hidden_sbh, weight=None, runtime_gather_output=None):
        return hidden_sbh, None


def attach_q_head(model: nn.Module, bound: float) -> BilinearQHead:
    """Q(s, a) = B tanh((W h_s) . e_a / sqrt(d) + b_a), e = the model's own (detached) input embedding,
    starting at Q = 0 (W = 0, b = 0). The head's vocab-sharded bias is tagged like megatron's TP weights (grad norm, clipping)."""
    if not model.pre_process or not model.post_process:
        raise ValueError(
            "the Q head needs the input embedding and the final hidden states on one stage (PP = 1)"
        )
    embedding = model.embedding.word_embeddings.weight
    model.output_layer = HiddenStatesOut()
    head = BilinearQHead(
        model.config.hidden_size,
        embedding.shape[1],
        embedding.shape[0],
        bound=bound,
        ghost=True,
        zero_init=True,
    ).to(embedding.dtype)  # the model's params dtype: megatron's mixed-precision optimizer numbers its
    # fp32 master copies over the float16 params only, so an fp32 head in a bf16 model breaks its checkpoint
    head.action_bias.tensor_model_parallel = True
    head.action_bias.partition_dim = 0
    head.action_bias.partition_stride = 1
    model.q_head = head
    model.sharded_state_dict = types.MethodType(_q_model_sharded_state_dict, model)
    return head


def _q_model_sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
    """The backbone's sharded state dict plus the Q head's (``action_bias`` sharded over TP like the
    vocabulary, the rest replicated). megatron-core's GPTModel expects an output-layer weight on the
    last stage; the Q model has none (``HiddenStatesOut``), so the backbone is dumped as a non-last
    stage (which skips only that output-layer handling) and the head is added explicitly."""
    post_process = self.post_process
    self.post_process = False
    try:
        backbone = type(self).sharded_state_dict(self, prefix, sharded_offsets, metadata)
    finally:
        self.post_process = post_process
    backbone = {k: v for k, v in backbone.items() if not k.startswith(f"{prefix}q_head.")}
    head_prefix = f"{prefix}q_head."
    groups = self.pg_collection
    head = make_sharded_tensors_for_checkpoint(
        self.q_head.state_dict(keep_vars=True), head_prefix, {"action_bias": 0}, sharded_offsets,
        tp_group=groups.tp, dp_cp_group=groups.dp_cp,
    )  # fmt: skip
    return {**backbone, **head}
