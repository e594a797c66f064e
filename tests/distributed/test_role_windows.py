"""Two roles on disjoint rank windows with their own layouts, in one 4-process job.

Role P owns ranks {0, 1} with TP=2; role Q owns ranks {2, 3} with TP=1 x DP=2. megatron-core's
global parallel_state is never initialised, so everything the models do must go through the
role's explicit process groups. With CPU initialisation both roles get the same weights, so P's
TP-gathered logits must equal Q's, and a training step's loss must agree too.
"""

from __future__ import annotations

import torch
from distributed_utils import run_distributed

VOCAB, SEQ = 192, 12  # a multiple of 8 * 2: same padded vocab (same CPU init draws) at TP=1 and TP=2


def _body(rank, world_size):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from rgkd_megatron.config.schema import ModelConfig, OptimizerConfig, ParallelConfig
    from rgkd_megatron.models.builders import build_policy, build_teacher
    from rgkd_megatron.parallel.groups import RoleLayout
    from rgkd_megatron.training.engine import build_engine, train_step
    from rgkd_megatron.training.objectives import make_sft_forward_step
    from rgkd_megatron.training.setup import init_role

    layouts = {
        "P": RoleLayout(tp=2, pp=1, dp=1, rank_offset=0),
        "Q": RoleLayout(tp=1, pp=1, dp=2, rank_offset=2),
    }
    groups = {name: init_role(layout, seed=5) for name, layout in layouts.items()}  # collective on all ranks
    assert not parallel_state.model_parallel_is_initialized()
    mine = "P" if rank < 2 else "Q"
    assert groups[mine].is_member and not groups["Q" if mine == "P" else "P"].is_member
    model_cfg = ModelConfig(
        num_layers=2,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        max_position_embeddings=SEQ,
        make_vocab_size_divisible_by=8,
    )
    parallel_cfg = ParallelConfig(tensor_model_parallel_size=layouts[mine].tp)
    torch.manual_seed(5)  # the CPU initialisation draws the full weights from this generator
    model = build_policy(model_cfg, parallel_cfg, groups[mine], VOCAB)
    teacher = build_teacher(model_cfg, parallel_cfg, groups[mine], VOCAB)
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(SEQ).expand(2, SEQ)
    with torch.no_grad():
        logits = model(tokens[:, :-1], positions, None)
        logits = gather_from_tensor_model_parallel_region(logits, group=groups[mine].pg_collection.tp)
    out = {"role": mine, "tp_size": dist.get_world_size(groups[mine].pg_collection.tp)}
    out["teacher_frozen"] = not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    if rank == 0:
        dist.send(logits.contiguous(), dst=2)
    if rank == 2:
        from_p = torch.empty_like(logits)
        dist.recv(from_p, src=0)
        out["max_logit_diff"] = (from_p - logits).abs().max().item()
        out["logit_scale"] = logits.abs().max().item()
    batch = {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": torch.ones(2, SEQ),
        "position_ids": positions,
    }
    engine = build_engine(model, groups[mine], OptimizerConfig(), parallel_cfg, 1e-3, 1e-3, 0, 10, "constant")
    dp = groups[mine].layout.dp
    micro = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(2) if i % dp == groups[mine].dp_rank]
    out["loss"] = train_step(
        engine, make_sft_forward_step(groups[mine].pg_collection.tp), iter(micro), len(micro), SEQ, 1
    )["lm_loss"]
    return out


def test_roles_on_rank_windows_use_their_own_groups():
    results = run_distributed(_body, 4)
    assert [r["role"] for r in results] == ["P", "P", "Q", "Q"]
    assert [r["tp_size"] for r in results] == [2, 2, 1, 1]
    assert all(r["teacher_frozen"] for r in results)
    assert results[2]["logit_scale"] > 1e-3
    assert results[2]["max_logit_diff"] < 1e-5, results[2]
    losses = [r["loss"] for r in results]
    assert max(losses) - min(losses) < 1e-5, losses
