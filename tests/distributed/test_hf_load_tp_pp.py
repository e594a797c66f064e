"""A Hugging Face folder loaded straight into a TP=2 x PP=2 model (no converted checkpoint).

Tiny random models saved with transformers (untied Llama with llama3 RoPE scaling; Qwen2 with GQA,
q/k/v bias and tied embeddings: the last stage's output layer comes from the embedding). Four
gloo processes build our policy with the architecture read from the folder
(``load_config(None, ['model.load=DIR'])``), fill their shards with ``load_weights`` and compare
the full-vocabulary logits with transformers' on the same batch. A reward model initialised from
the folder (``load_backbone``) must hold the policy's backbone weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from distributed_utils import run_distributed
from test_convert_tp_pp import SEQ, TOL, VOCAB, _pipeline_logits, _randomize, _tiny_configs

NAMES = ["llama_untied_rope_scaling", "qwen2_gqa_bias_tied"]


def _load_and_compare(rank, world_size, workdir: Path, tokens: torch.Tensor):
    from rgkd_megatron.config import load_config
    from rgkd_megatron.config.schema import ParallelConfig
    from rgkd_megatron.convert.hf_load import load_backbone, load_weights
    from rgkd_megatron.models.builders import build_policy, build_reward_model
    from rgkd_megatron.parallel.groups import layout_for_world
    from rgkd_megatron.training.setup import init_role, teardown_roles

    groups = init_role(layout_for_world(2, 2, world_size), seed=0)
    parallel = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    out = {}
    for name in NAMES:
        src = workdir / name
        cfg = load_config(
            None, [f"model.load={src}", "model.spec=local", "model.params_dtype=fp32", "data.seq_length=32"]
        )
        model = build_policy(cfg.model, parallel, groups, VOCAB).eval()
        load_weights(src, model)
        logits = _pipeline_logits(model, groups, tokens)
        out[name] = None if logits is None else logits[..., :VOCAB].clone()
        reward = build_reward_model(cfg.model, parallel, groups, VOCAB)
        load_backbone(src, reward)
        params = dict(model.named_parameters())
        shared = [n for n, _ in reward.named_parameters() if not n.startswith("output_layer.")]
        out[f"{name}_reward_backbone"] = bool(shared) and all(
            torch.equal(p, params[n]) for n, p in reward.named_parameters() if n in shared
        )
    teardown_roles()
    return out


def test_hf_folder_loads_into_tp_pp_model(tmp_path):
    from transformers import AutoModelForCausalLM

    configs = _tiny_configs()
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
    expected = {}
    for name in NAMES:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(configs[name]).float().eval()
        _randomize(model)
        model.save_pretrained(tmp_path / name, safe_serialization=True)
        with torch.no_grad():
            expected[name] = model(tokens).logits
    results = run_distributed(_load_and_compare, 4, args=(tmp_path, tokens), timeout=500)
    for name in NAMES:
        last_stage = [r[name] for r in results if r[name] is not None]
        assert len(last_stage) == 2  # the two TP ranks of the last stage
        for logits in last_stage:
            err = (logits - expected[name]).abs().max().item()
            assert err < TOL, f"{name}: max abs logit difference {err}"
        assert all(r[f"{name}_reward_backbone"] for r in results), name
