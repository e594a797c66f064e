"""Step overhead of our megatron-core policy against plain PyTorch (issue 2), CPU, fp32, TP=1.

One process, gloo world of size 1. Both sides start from the same weights (megatron's, copied
with ``plain_llama.load_from_mcore``), see the same batches and use AdamW with the same
hyper-parameters (no weight decay on 1-D params, global-norm clipping, constant LR):

- mcore: ``build_engine`` + ``train_step`` with ``make_sft_forward_step`` (megatron DDP grad buffer,
  forward_backward_no_pipelining, finalize_model_grads, Megatron optimizer, LR schedule);
- plain: ``plain_llama.PlainLlama`` (SDPA attention) + torch.optim.AdamW.

The two alternate step by step (order swapped every step) after warm-up; medians are reported.
``cpu_compat``'s process-wide TorchFunctionMode (CUDA->CPU rewriting) is needed by megatron-core on
CPU; the plain step runs with it suspended unless ``--plain-under-cpu-compat`` is given.
The LAST line printed is a JSON object.

    python benchmarks/step_overhead.py                # defaults below, well under 2 minutes
    python benchmarks/step_overhead.py --steps 20 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU benchmark, even on a GPU machine
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def add_adamw_args(p: argparse.ArgumentParser) -> None:
    """The AdamW settings both sides of a comparison share (betas and eps: OptimizerConfig defaults)."""
    p.add_argument("--lr", type=float, default=1e-4, help="constant learning rate")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decay (2-D params)")
    p.add_argument("--clip-grad", type=float, default=1.0, help="global grad-norm clip; 0 = off")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--num-layers", type=int, default=4, help="transformer layers")
    p.add_argument("--hidden-size", type=int, default=256, help="residual width")
    p.add_argument("--num-heads", type=int, default=8, help="query heads")
    p.add_argument("--num-query-groups", type=int, default=4, help="KV heads (GQA); 0 = MHA")
    p.add_argument("--ffn-hidden-size", type=int, default=704, help="SwiGLU inner width")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary (padded to a multiple of 128)")
    p.add_argument("--untied-embeddings", action="store_true", help="separate output layer")
    p.add_argument("--seq-length", type=int, default=256, help="tokens per sequence")
    p.add_argument("--micro-batch-size", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--num-microbatches", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps per implementation")
    p.add_argument("--steps", type=int, default=8, help="timed steps per implementation")
    add_adamw_args(p)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch default")
    p.add_argument("--seed", type=int, default=1234, help="weights and data seed")
    p.add_argument(
        "--plain-under-cpu-compat",
        action="store_true",
        help="run the plain step inside cpu_compat's TorchFunctionMode too (default: suspended)",
    )
    return p.parse_args(argv)


def init_single_process_world() -> None:
    """A gloo world of size 1 on a free local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)


def sft_batches(
    seed: int, micro_batch_size: int, seq_length: int, num_microbatches: int, vocab: int, n_steps: int
) -> list[list[dict]]:
    """Per step, ``num_microbatches`` SFT micro-batches; the first quarter of each row is 'prompt'."""
    g = torch.Generator().manual_seed(seed + 1)
    b, s = micro_batch_size, seq_length
    mask = torch.ones(b, s)
    mask[:, : s // 4] = 0.0
    out = []
    for _ in range(n_steps):
        step = []
        for _ in range(num_microbatches):
            tokens = torch.randint(0, vocab, (b, s + 1), generator=g)
            step.append(
                {
                    "tokens": tokens[:, :-1].contiguous(),
                    "labels": tokens[:, 1:].contiguous(),
                    "loss_mask": mask,
                    "position_ids": torch.arange(s).expand(b, s),
                }
            )
        out.append(step)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from rgkd_megatron.parallel import cpu_compat

    cpu_compat.apply()
    init_single_process_world()

    from plain_llama import PlainConfig, PlainLlama, adamw_param_groups, load_from_mcore, plain_train_step

    from rgkd_megatron.config.schema import ModelConfig, OptimizerConfig, ParallelConfig
    from rgkd_megatron.models.builders import build_policy
    from rgkd_megatron.parallel.groups import layout_for_world
    from rgkd_megatron.training.engine import build_engine, train_step
    from rgkd_megatron.training.objectives import make_sft_forward_step
    from rgkd_megatron.training.setup import init_role, teardown_roles

    model_cfg = ModelConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_heads,
        num_query_groups=args.num_query_groups or None,
        max_position_embeddings=args.seq_length,
        tie_word_embeddings=not args.untied_embeddings,
        spec="local",
        params_dtype="fp32",
    )
    parallel_cfg = ParallelConfig()
    opt_cfg = OptimizerConfig(name="adam", weight_decay=args.weight_decay, clip_grad=args.clip_grad)
    groups = init_role(layout_for_world(1, 1, 1), seed=args.seed)
    model = build_policy(model_cfg, parallel_cfg, groups, args.vocab_size)
    engine = build_engine(model, groups, opt_cfg, parallel_cfg, args.lr, args.lr, 0, 1, "constant")

    padded = model.embedding.word_embeddings.weight.shape[0]
    plain = PlainLlama(PlainConfig.from_model_config(model_cfg, padded))
    load_from_mcore(plain, engine.unwrapped().state_dict())
    optimizer = torch.optim.AdamW(
        adamw_param_groups(plain, opt_cfg.weight_decay),
        lr=args.lr,
        betas=(opt_cfg.adam_beta1, opt_cfg.adam_beta2),
        eps=opt_cfg.adam_eps,
    )
    n_params = {
        "mcore": sum(p.numel() for p in model.parameters()),
        "plain": sum(p.numel() for p in plain.parameters()),
    }

    total = args.warmup_steps + args.steps
    batches = sft_batches(
        args.seed, args.micro_batch_size, args.seq_length, args.num_microbatches, args.vocab_size, total
    )
    plain_ctx = contextlib.nullcontext if args.plain_under_cpu_compat else torch._C.DisableTorchFunction

    def mcore_step(mbs):
        metrics = train_step(
            engine,
            make_sft_forward_step(engine.groups.pg_collection.tp),
            iter(mbs),
            len(mbs),
            args.seq_length,
            args.micro_batch_size,
        )
        return metrics["lm_loss"]

    def plain_step(mbs):
        with plain_ctx():
            return plain_train_step(plain, optimizer, mbs, args.clip_grad)

    steps = {"mcore": mcore_step, "plain": plain_step}
    times: dict[str, list[float]] = {"mcore": [], "plain": []}
    losses: dict[str, list[float]] = {"mcore": [], "plain": []}
    for i in range(total):
        for name in ("mcore", "plain") if i % 2 == 0 else ("plain", "mcore"):
            t0 = time.perf_counter()
            loss = steps[name](batches[i])
            dt = time.perf_counter() - t0
            losses[name].append(loss)
            if i >= args.warmup_steps:
                times[name].append(dt)
    teardown_roles()
    dist.destroy_process_group()

    tokens = args.micro_batch_size * args.seq_length * args.num_microbatches
    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: tokens / v for k, v in med.items()}
    diffs = [abs(a - b) for a, b in zip(losses["mcore"], losses["plain"])]
    print(
        f"step overhead, CPU fp32, TP=1: {args.num_layers} layers, hidden {args.hidden_size}, "
        f"{args.num_heads} heads / {args.num_query_groups or args.num_heads} KV, ffn {args.ffn_hidden_size}, "
        f"vocab {padded}, seq {args.seq_length} x micro-batch {args.micro_batch_size} x "
        f"{args.num_microbatches}; {args.warmup_steps} warm-up + {args.steps} timed steps; "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"{'impl':<8}{'params':>12}{'median s':>11}{'min s':>9}{'max s':>9}{'tokens/s':>11}")
    for k in ("mcore", "plain"):
        print(
            f"{k:<8}{n_params[k]:>12,}{med[k]:>11.4f}{min(times[k]):>9.4f}"
            f"{max(times[k]):>9.4f}{tps[k]:>11.1f}"
        )
    ratio_min = min(times["plain"]) / min(times["mcore"])
    print(
        f"throughput mcore / plain: {tps['mcore'] / tps['plain']:.3f} (medians), {ratio_min:.3f} (min step "
        f"times, less sensitive to other load on the machine)"
    )
    print(
        f"first-step loss: mcore {losses['mcore'][0]:.7f}  plain {losses['plain'][0]:.7f}  "
        f"|diff| {diffs[0]:.2e} ({'agree' if diffs[0] <= 1e-5 else 'DISAGREE'}); "
        f"max |diff| over all {total} steps {max(diffs):.2e}"
    )
    result = {
        "mcore_tokens_per_s": round(tps["mcore"], 1),
        "plain_tokens_per_s": round(tps["plain"], 1),
        "ratio_mcore_over_plain": round(tps["mcore"] / tps["plain"], 4),
        "config": {
            "num_layers": args.num_layers,
            "hidden_size": args.hidden_size,
            "num_heads": args.num_heads,
            "num_query_groups": args.num_query_groups or None,
            "ffn_hidden_size": args.ffn_hidden_size,
            "vocab_size": args.vocab_size,
            "padded_vocab_size": padded,
            "tied_embeddings": not args.untied_embeddings,
            "seq_length": args.seq_length,
            "micro_batch_size": args.micro_batch_size,
            "num_microbatches": args.num_microbatches,
            "warmup_steps": args.warmup_steps,
            "steps": args.steps,
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "clip_grad": args.clip_grad,
            "plain_under_cpu_compat": args.plain_under_cpu_compat,
            "mcore_median_step_s": round(med["mcore"], 5),
            "plain_median_step_s": round(med["plain"], 5),
            "mcore_min_step_s": round(min(times["mcore"]), 5),
            "plain_min_step_s": round(min(times["plain"]), 5),
            "ratio_mcore_over_plain_from_min": round(ratio_min, 4),
            "first_step_loss_abs_diff": diffs[0],
            "max_loss_abs_diff": max(diffs),
        },
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
