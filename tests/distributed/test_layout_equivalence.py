"""TP=2, PP=2 and TP=2 x PP=2 (and DP, and the distributed optimizer) against one unsharded model.

Reference: a single process, TP=1/PP=1, the same initial weights (loaded from one checkpoint, since
PP stages consume the RNG differently), the same global batch. For each layout we compare
(a) the loss, (b) every gradient (the reference gradients are saved as a checkpoint and loaded,
resharded by megatron-core dist_checkpointing, into a model of the tested layout, then compared
shard by shard), (c) the weights after one Adam step (same route). Policy and reward model both.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
from distributed_utils import run_distributed

VOCAB = 250
SEQ = 16
GLOBAL_BATCH = 4
LAYOUTS = [  # (tp, pp, distributed_optimizer, sequence_parallel) on 4 ranks
    (2, 1, False, False),
    (1, 2, False, False),
    (2, 2, False, False),
    (2, 1, False, True),
    (2, 1, True, True),
]


def _cfgs(tp: int, pp: int, distopt: bool, sp: bool):
    from rgkd_megatron.config.schema import ModelConfig, OptimizerConfig, ParallelConfig

    model = ModelConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        num_query_groups=2,
        max_position_embeddings=SEQ,
        make_vocab_size_divisible_by=64,
        tie_word_embeddings=True,
    )
    parallel = ParallelConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        use_distributed_optimizer=distopt,
        sequence_parallel=sp,
    )
    # adam_eps well above float noise: Adam would turn a 1e-9 gradient difference into a full step
    return model, parallel, OptimizerConfig(weight_decay=0.0, clip_grad=0.0, adam_eps=1e-4)


def _batches(kind: str, dp_rank: int, dp: int):
    """The global batch, split over DP ranks, one sequence (or pair) per micro-batch."""
    g = torch.Generator().manual_seed(7)
    rows = GLOBAL_BATCH * (2 if kind == "reward" else 1)
    tokens = torch.randint(0, VOCAB, (rows, SEQ + 1), generator=g)
    loss_mask = (torch.rand(rows, SEQ, generator=g) > 0.3).float()
    last_index = torch.randint(SEQ // 2, SEQ, (rows,), generator=g)
    step = 2 if kind == "reward" else 1
    out = []
    for i in range(0, rows, step):
        if (i // step) % dp != dp_rank:
            continue
        sl = slice(i, i + step)
        out.append(
            {
                "tokens": tokens[sl, :-1],
                "labels": tokens[sl, 1:],
                "loss_mask": loss_mask[sl],
                "position_ids": torch.arange(SEQ).expand(step, SEQ),
                "last_index": last_index[sl],
            }
        )
    return out


@contextlib.contextmanager
def _params_hold_grads(model):
    backup = [(p, p.data.clone()) for p in model.parameters()]
    for p in model.parameters():
        p.data.copy_(p.main_grad)
    try:
        yield
    finally:
        for p, data in backup:
            p.data.copy_(data)


def _step(kind, tp, pp, distopt, sp, workdir, save_init):
    import torch.distributed as dist

    from rgkd_megatron.checkpoint.dist_ckpt import load_model_weights, save_model_weights
    from rgkd_megatron.models.builders import build_policy, build_reward_model
    from rgkd_megatron.parallel.groups import layout_for_world
    from rgkd_megatron.training.engine import build_engine, run_forward_backward
    from rgkd_megatron.training.objectives import make_sft_forward_step, reward_forward_step
    from rgkd_megatron.training.setup import init_role, teardown_roles

    model_cfg, parallel_cfg, opt_cfg = _cfgs(tp, pp, distopt, sp)
    groups = init_role(layout_for_world(tp, pp, dist.get_world_size()), seed=11)
    build = build_reward_model if kind == "reward" else build_policy
    model = build(model_cfg, parallel_cfg, groups, VOCAB)
    if save_init:
        save_model_weights(f"{workdir}/{kind}_init", model)
    load_model_weights(f"{workdir}/{kind}_init", model)
    engine = build_engine(
        model,
        groups,
        opt_cfg,
        parallel_cfg,
        lr=1e-2,
        min_lr=1e-2,
        warmup_iters=0,
        decay_iters=10,
        decay_style="constant",
    )
    batches = _batches(kind, groups.dp_rank, groups.layout.dp)
    fwd = reward_forward_step if kind == "reward" else make_sft_forward_step(groups.pg_collection.tp)
    for chunk in engine.model:
        chunk.zero_grad_buffer()
    engine.optimizer.zero_grad()
    rows = 2 if kind == "reward" else 1
    metrics = run_forward_backward(engine, fwd, iter(batches), len(batches), SEQ, rows)
    result = SimpleNamespace(metrics=metrics)
    if save_init:  # the reference: publish its gradients and post-step weights
        with _params_hold_grads(model):
            save_model_weights(f"{workdir}/{kind}_grads", model)
    elif not distopt:  # main_grad is only complete without the distributed optimizer
        expected = build(model_cfg, parallel_cfg, groups, VOCAB)
        load_model_weights(f"{workdir}/{kind}_grads", expected)
        result.grad_err = max(
            (p.main_grad - q.data).abs().max().item()
            for p, q in zip(model.parameters(), expected.parameters())
        )
    engine.optimizer.step()
    if save_init:
        save_model_weights(f"{workdir}/{kind}_after", model)
    else:
        expected = build(model_cfg, parallel_cfg, groups, VOCAB)
        load_model_weights(f"{workdir}/{kind}_after", expected)
        result.weight_err = max(
            (p.data - q.data).abs().max().item() for p, q in zip(model.parameters(), expected.parameters())
        )
        result.weight_change = max(
            (p.data - q.data).abs().max().item()
            for p, q in zip(
                model.parameters(), _initial(build, model_cfg, parallel_cfg, groups, workdir, kind)
            )
        )
    teardown_roles()
    return result


def _initial(build, model_cfg, parallel_cfg, groups, workdir, kind):
    from rgkd_megatron.checkpoint.dist_ckpt import load_model_weights

    init = build(model_cfg, parallel_cfg, groups, VOCAB)
    load_model_weights(f"{workdir}/{kind}_init", init)
    return list(init.parameters())


def _reference(rank, world_size, workdir):
    return {
        kind: _step(kind, 1, 1, False, False, workdir, save_init=True).metrics
        for kind in ("policy", "reward")
    }


def _layouts(rank, world_size, workdir):
    return {
        (kind, layout): _step(kind, *layout, workdir, save_init=False)
        for layout in LAYOUTS
        for kind in ("policy", "reward")
    }


def test_layouts_match_unsharded_reference(tmp_path):
    reference = run_distributed(_reference, 1, args=(str(tmp_path),))[0]
    per_rank = run_distributed(_layouts, 4, args=(str(tmp_path),), timeout=600)
    loss_name = {"policy": "lm_loss", "reward": "rm_loss"}
    for (kind, layout), result in per_rank[0].items():
        expected = reference[kind][loss_name[kind]]
        got = result.metrics[loss_name[kind]]
        assert abs(got - expected) < 1e-5 * max(1.0, abs(expected)), (kind, layout, got, expected)
    for rank_results in per_rank:
        for (kind, layout), result in rank_results.items():
            if hasattr(result, "grad_err"):
                assert result.grad_err < 1e-5, (kind, layout, "grad", result.grad_err)
            assert result.weight_change > 1e-4, (kind, layout, "the step did not move the weights")
            assert result.weight_err < 1e-5, (kind, layout, "weights after step", result.weight_err)
