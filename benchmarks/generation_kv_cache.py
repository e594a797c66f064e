"""Generation throughput with and without the KV cache (rgkd_megatron.generation.generate), CPU, TP=1.

One process, gloo world of size 1, a randomly initialised Llama-style policy (megatron-core GPTModel,
local spec, fp32). Both modes generate the same tokens from the same prompts and seed (greedy
tokens are compared); with the cache each step feeds one token through megatron-core's
StaticInferenceContext, without it each step recomputes the whole prefix. No stop id: every sample
runs to --new-tokens. Generated tokens per second (median over --repeats) and their ratio are
reported; the LAST line printed is a JSON object.

    python benchmarks/generation_kv_cache.py                  # defaults below, about a minute
    python benchmarks/generation_kv_cache.py --new-tokens 256 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU benchmark, even on a GPU machine

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--num-layers", type=int, default=4, help="transformer layers")
    p.add_argument("--hidden-size", type=int, default=256, help="residual width")
    p.add_argument("--num-heads", type=int, default=8, help="query heads")
    p.add_argument("--num-query-groups", type=int, default=4, help="KV heads (GQA)")
    p.add_argument("--ffn-hidden-size", type=int, default=704, help="SwiGLU inner width")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary (padded to a multiple of 128)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate() call")
    p.add_argument("--prompt-length", type=int, default=32, help="tokens per prompt (all equal)")
    p.add_argument("--new-tokens", type=int, default=128, help="generated tokens per prompt")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per mode (median reported)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch default")
    p.add_argument("--seed", type=int, default=1234, help="weights, prompts and sampling seed")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)

    from rgkd_megatron.config.schema import ModelConfig, ParallelConfig
    from rgkd_megatron.generation import generate
    from rgkd_megatron.models.builders import build_policy
    from rgkd_megatron.parallel.groups import layout_for_world
    from rgkd_megatron.training.setup import init_role

    groups = init_role(layout_for_world(1, 1, 1), seed=args.seed)
    model_cfg = ModelConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_heads,
        num_query_groups=args.num_query_groups,
        max_position_embeddings=args.prompt_length + args.new_tokens,
        params_dtype="fp32",
        spec="local",
    )
    model = build_policy(model_cfg, ParallelConfig(), groups, args.vocab_size)
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, args.vocab_size, (args.batch_size, args.prompt_length), generator=g).tolist()
    common = dict(
        max_new_tokens=args.new_tokens, eos_id=None, pad_id=0, seed=args.seed, vocab_size=args.vocab_size
    )

    def run(use_kv_cache: bool, temperature: float = 1.0):
        start = time.perf_counter()
        out = generate(model, groups, prompts, temperature=temperature, use_kv_cache=use_kv_cache, **common)
        return time.perf_counter() - start, out

    same = torch.equal(run(True, 0.0)[1].responses, run(False, 0.0)[1].responses)  # also warms up
    result = {"config": vars(args), "greedy_tokens_equal": same}
    generated = args.batch_size * args.new_tokens
    for name, cache in (("with_cache", True), ("without_cache", False)):
        seconds = statistics.median(run(cache)[0] for _ in range(args.repeats))
        result[f"{name}_tokens_per_s"] = round(generated / seconds, 1)
    result["speedup"] = round(result["with_cache_tokens_per_s"] / result["without_cache_tokens_per_s"], 2)
    print(f"generated {generated} tokens per call ({args.batch_size} x {args.new_tokens})")
    for name in ("with_cache", "without_cache"):
        print(f"{name:>14}: {result[f'{name}_tokens_per_s']:>9.1f} tokens/s")
    print(f"{'speedup':>14}: {result['speedup']:.2f}x   greedy tokens equal: {same}")
    print(json.dumps(result))
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
