"""Q-function backbone for MM-PbKD: the reward role's GPT with its output layer replaced by the
identity (forward returns hidden states [b, s, h]) and a bilinear Q head as a submodule (so DDP, the
optimizer and gradient clipping see its parameters)."""

from __future__ import annotations

from torch import nn

from rgkd_megatron.losses.mm_pbkd import BilinearQHead


class HiddenStatesOut(nn.Module):
    """Stands in for GPTModel's output layer: returns the final hidden states."""

    def forward(self, hidden_sbh, weight=None, runtime_gather_output=None):
        return hidden_sbh, None


def attach_q_head(model: nn.Module, bound: float) -> BilinearQHead:
    """Q(s, a) = B tanh((W h_s) . e_a / sqrt(d) + b_a), e = the model's own (detached) input embedding.
    The head's vocab-sharded bias is tagged like megatron's TP weights (grad norm, clipping)."""
    if not model.pre_process or not model.post_process:
        raise ValueError(
            "the Q head needs the input embedding and the final hidden states on one stage (PP = 1)"
        )
    embedding = model.embedding.word_embeddings.weight
    model.output_layer = HiddenStatesOut()
    head = BilinearQHead(
        model.config.hidden_size, embedding.shape[1], embedding.shape[0], bound=bound, ghost=True
    )
    head.action_bias.tensor_model_parallel = True
    head.action_bias.partition_dim = 0
    head.action_bias.partition_stride = 1
    model.q_head = head
    return head
