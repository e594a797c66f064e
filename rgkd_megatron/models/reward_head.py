"""TP-aware scalar head that turns a GPT backbone into a reward model (or a value model).

The head replaces GPTModel's ``output_layer`` and keeps its call contract
``head(hidden_sbh, weight=None, runtime_gather_output=None) -> (values_sb1, None)``, so the reward
model is the policy's spec with another head, not a forked model class.

The weight [1, hidden] is split over TP along hidden (a ``RowParallelLinear``: each rank multiplies
its slice of the hidden state, the partial sums are all-reduced), so it shards and reshards in
dist_checkpointing like every other TP weight. Under sequence parallelism the hidden states arrive
split along the sequence and are gathered first; the row-parallel input scatter already all-gathers
the gradient over TP, so the gather's backward is a plain split (``tensor_parallel_output_grad=False``).
"""

from __future__ import annotations

import copy

import torch
from megatron.core.tensor_parallel import RowParallelLinear
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.transformer_config import TransformerConfig


class ScalarHead(RowParallelLinear):
    """hidden [s, b, h] -> values [s, b, 1]. Parameters keep the output layer's names
    (``output_layer.weight`` / ``.bias``) so GPTModel's sharded_state_dict handles them."""

    def __init__(self, config: TransformerConfig, tp_group: torch.distributed.ProcessGroup):
        head_config = copy.copy(config)
        head_config.sequence_parallel = False  # we gather the sequence ourselves
        super().__init__(
            config.hidden_size,
            1,
            config=head_config,
            init_method=config.init_method,
            bias=True,
            input_is_parallel=False,
            skip_bias_add=False,
            tp_group=tp_group,
        )
        self.gather_sequence = config.sequence_parallel

    def forward(self, hidden_sbh: torch.Tensor, weight=None, runtime_gather_output=None):
        if self.gather_sequence:
            hidden_sbh = gather_from_sequence_parallel_region(
                hidden_sbh, tensor_parallel_output_grad=False, group=self.tp_group
            )
        values_sb1, _ = super().forward(hidden_sbh)
        return values_sb1, None
