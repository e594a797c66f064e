"""HF <-> megatron-core conversion checked against Hugging Face transformers, at TP x PP.

Tiny random models (LlamaForCausalLM untied with llama3 RoPE scaling, Llama tied, Mistral GQA,
Qwen2 GQA with q/k/v bias and tied embeddings, a bf16 Llama) are built with transformers from a
config (no download) and saved. One 4-process spawn: rank 0 first converts them (single-process
group), then the 4 ranks form TP=2 x PP=2, load each checkpoint into our policy builder (model
fields from the written ``model_config.yaml``) and compare the logits with transformers' on the
same batch. Also: HF -> mcore -> HF is bit-exact for every tensor; the ``--dry-run`` per-rank sizes
equal the parameters each rank really holds; a conversion that fails midway leaves nothing behind.

SmolLM2-135M-Instruct (``scripts/fetch_smollm2.sh``): our GGUF import vs transformers' own GGUF
loader (every tensor, logits), then our megatron model at TP=3 and at TP=1 x PP=3 vs transformers on
the imported checkpoint: logits, and (TP=3) a 12-token greedy continuation of a chat prompt.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from distributed_utils import run_distributed

REPO = Path(__file__).resolve().parents[2]
SMOLLM2_GGUF = REPO / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = 250
SEQ = 12
TOL = 1e-4
GREEDY_TOKENS = 12
SMOLLM2_VOCAB = 49152


def _tiny_configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        max_position_embeddings=64,
    )
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    return {
        "llama_untied_rope_scaling": LlamaConfig(
            **common,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=False,
            rope_scaling={**llama3, "original_max_position_embeddings": 8192, "rope_theta": 50000.0},
            rope_theta=50000.0,
        ),
        "llama_tied": LlamaConfig(
            **common, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True
        ),
        "mistral_gqa": MistralConfig(
            **common,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=None,
            tie_word_embeddings=False,
        ),
        "qwen2_gqa_bias_tied": Qwen2Config(
            **common, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6
        ),
        "llama_bf16_gqa": LlamaConfig(
            **common, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False
        ),
    }


# converted with tp=1 and no vocab padding, loaded at TP=2 with 256 rows: layout independence
UNPADDED = "mistral_gqa"
LOGIT_CHECKS = ["llama_untied_rope_scaling", "llama_tied", "mistral_gqa", "qwen2_gqa_bias_tied"]


def _randomize(model) -> None:
    """transformers initialises norms to 1 and biases to 0: make every tensor informative."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------------ workers
def _tp_gather_logits(logits_bsv, tp_group):
    import torch.distributed as dist

    parts = [torch.empty_like(logits_bsv) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, logits_bsv.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)


def _pipeline_logits(model, groups, tokens_bs):
    """Full-vocab logits on the last stage (None elsewhere); stage-to-stage hidden states by p2p."""
    import torch.distributed as dist

    pg = groups.pg_collection
    pp_ranks = dist.get_process_group_ranks(pg.pp)
    b, s = tokens_bs.shape
    positions = torch.arange(s).expand(b, s)
    with torch.no_grad():
        if not groups.is_first_stage:
            hidden = torch.empty(s, b, model.config.hidden_size)
            dist.recv(hidden, src=pp_ranks[groups.pp_rank - 1])
            model.set_input_tensor(hidden)
        out = model(tokens_bs, positions, None)
        if not groups.is_last_stage:
            dist.send(out.contiguous(), dst=pp_ranks[groups.pp_rank + 1])
            return None
        return _tp_gather_logits(out, pg.tp)


def _build_and_load(ckpt: str, tp: int, pp: int, groups, make_vocab_size_divisible_by: int | None = None):
    import yaml

    from rgkd_megatron.checkpoint.dist_ckpt import load_model_weights
    from rgkd_megatron.config.schema import ModelConfig, ParallelConfig
    from rgkd_megatron.models.builders import build_policy

    fields = yaml.safe_load(Path(ckpt, "model_config.yaml").read_text())["model"]
    assert fields.pop("load") == str(Path(ckpt).resolve())
    if make_vocab_size_divisible_by is not None:
        fields["make_vocab_size_divisible_by"] = make_vocab_size_divisible_by
    model_cfg = ModelConfig(**fields, spec="local", params_dtype="fp32")
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model = build_policy(model_cfg, parallel, groups, fields["vocab_size"])
    load_model_weights(ckpt, model)
    return model.eval()


def _reward_model_backbone(ckpt: Path, groups) -> bool:
    """A reward model initialised from the converted checkpoint: backbone = the policy's weights."""
    import yaml

    from rgkd_megatron.checkpoint.dist_ckpt import load_backbone_weights, load_model_weights
    from rgkd_megatron.config.schema import ModelConfig, ParallelConfig
    from rgkd_megatron.models.builders import build_policy, build_reward_model

    fields = yaml.safe_load((ckpt / "model_config.yaml").read_text())["model"]
    fields.pop("load")
    parallel = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    model_cfg = ModelConfig(**fields, spec="local", params_dtype="fp32")
    reward = build_reward_model(model_cfg, parallel, groups, fields["vocab_size"])
    load_backbone_weights(ckpt, reward)
    policy = build_policy(model_cfg, parallel, groups, fields["vocab_size"])
    load_model_weights(ckpt, policy)
    policy_params = dict(policy.named_parameters())
    shared = [n for n, _ in reward.named_parameters() if not n.startswith("output_layer.")]
    return bool(shared) and all(
        torch.equal(p, policy_params[n]) for n, p in reward.named_parameters() if n in shared
    )


def _no_leftovers(parent: Path, name: str) -> bool:
    return not (parent / name).exists() and not any(
        p.name.startswith(f".{name}.tmp") for p in parent.iterdir()
    )


def _convert_tiny(workdir: Path, names: list[str]) -> dict:
    from rgkd_megatron.convert import hf_io
    from rgkd_megatron.convert import mcore_to_hf as m2h
    from rgkd_megatron.convert.hf_to_mcore import convert_hf_to_mcore
    from rgkd_megatron.convert.mcore_to_hf import convert_mcore_to_hf

    out = {"plans": {}}
    for name in names:
        hf, mc, rt = workdir / "hf" / name, workdir / "mc" / name, workdir / "rt" / name
        if name == UNPADDED:
            convert_hf_to_mcore(hf, mc, tp=1, pp=1, make_vocab_size_divisible_by=1)
        else:
            out["plans"][name] = convert_hf_to_mcore(hf, mc, tp=2, pp=2)
        convert_mcore_to_hf(mc, rt, max_shard_size="60KB")  # several shards + index
    # a failure midway (the 5th tensor read) leaves no destination and no temporary directory
    real_get, calls = hf_io.HFCheckpoint.get, {"n": 0}

    def failing_get(self, name):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("injected read failure")
        return real_get(self, name)

    hf_io.HFCheckpoint.get = failing_get
    try:
        convert_hf_to_mcore(workdir / "hf" / names[0], workdir / "mc" / "broken", tp=2, pp=2)
        out["hf_to_mcore_failure_raised"] = False
    except RuntimeError:
        out["hf_to_mcore_failure_raised"] = True
    finally:
        hf_io.HFCheckpoint.get = real_get
    out["hf_to_mcore_clean"] = _no_leftovers(workdir / "mc", "broken")
    real_load = m2h._load_slices
    m2h._load_slices = lambda *args: (_ for _ in ()).throw(RuntimeError("injected load failure"))
    try:
        convert_mcore_to_hf(workdir / "mc" / names[0], workdir / "rt" / "broken")
        out["mcore_to_hf_failure_raised"] = False
    except RuntimeError:
        out["mcore_to_hf_failure_raised"] = True
    finally:
        m2h._load_slices = real_load
    out["mcore_to_hf_clean"] = _no_leftovers(workdir / "rt", "broken")
    return out


def _tiny_worker(rank, world_size, workdir, names, tokens):
    import torch.distributed as dist

    from rgkd_megatron.parallel.groups import layout_for_world
    from rgkd_megatron.training.setup import init_role, teardown_roles

    workdir = Path(workdir)
    result = _convert_tiny(workdir, names) if rank == 0 else {}
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    groups = init_role(layout_for_world(2, 2, world_size), seed=0)
    result.update(pp_rank=groups.pp_rank, tp_rank=groups.tp_rank, logits={}, params={})
    for name in LOGIT_CHECKS:
        vocab_multiple = 128 if name == UNPADDED else None
        model = _build_and_load(str(workdir / "mc" / name), 2, 2, groups, vocab_multiple)
        result["params"][name] = sum(p.numel() for p in model.parameters())
        logits = _pipeline_logits(model, groups, tokens)
        if logits is not None and groups.tp_rank == 0:
            result["logits"][name] = logits
    result["reward_backbone_equal"] = _reward_model_backbone(workdir / "mc" / LOGIT_CHECKS[0], groups)
    teardown_roles()
    return result


def _smollm2_worker(rank, world_size, hf_dir, mc_dir, tokens, prompt_ids):
    """Rank 0 converts (tp=3); then TP=3 (logits + greedy) and TP=1 x PP=3 (logits) on 3 ranks."""
    import time

    import torch.distributed as dist

    from rgkd_megatron.parallel.groups import layout_for_world
    from rgkd_megatron.training.setup import init_role, teardown_roles

    result = {"logits": {}}
    if rank == 0:
        from rgkd_megatron.convert.hf_to_mcore import convert_hf_to_mcore

        start = time.perf_counter()
        convert_hf_to_mcore(hf_dir, mc_dir, tp=3, pp=1)
        result["convert_seconds"] = time.perf_counter() - start
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    for tp, pp in ((3, 1), (1, 3)):
        groups = init_role(layout_for_world(tp, pp, world_size), seed=0)
        model = _build_and_load(mc_dir, tp, pp, groups)
        logits = _pipeline_logits(model, groups, tokens)
        if logits is not None and groups.tp_rank == 0:
            result["logits"][(tp, pp)] = logits
        if tp == 3:  # greedy continuation, no KV cache: every rank holds the whole sequence
            seq = prompt_ids.clone()
            for _ in range(GREEDY_TOKENS):
                step = _pipeline_logits(model, groups, seq)
                nxt = step[:, -1, :SMOLLM2_VOCAB].argmax(dim=-1, keepdim=True)
                dist.broadcast(nxt, src=0)  # TP ranks hold identical gathered logits; rank 0 decides
                seq = torch.cat([seq, nxt], dim=1)
            result["greedy"] = seq[0, prompt_ids.shape[1] :].tolist()
        teardown_roles()
    return result


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    workdir = tmp_path_factory.mktemp("convert")
    for sub in ("hf", "mc", "rt"):
        (workdir / sub).mkdir()
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    hf_logits = {}
    configs = _tiny_configs()
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        _randomize(model)
        with torch.no_grad():
            hf_logits[name] = model(tokens).logits
        if name == "llama_bf16_gqa":
            model = model.to(torch.bfloat16)
        model.save_pretrained(workdir / "hf" / name)
    per_rank = run_distributed(
        _tiny_worker, 4, args=(str(workdir), list(configs), tokens), init_process_group=False
    )
    return {"workdir": workdir, "names": list(configs), "hf_logits": hf_logits, "per_rank": per_rank}


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", LOGIT_CHECKS)
def test_tp2_pp2_logits_match_transformers(tiny, name):
    got = [r["logits"][name] for r in tiny["per_rank"] if name in r["logits"]]
    assert len(got) == 1  # the last stage's TP rank 0
    diff = (got[0][..., :VOCAB] - tiny["hf_logits"][name]).abs().max().item()
    print(f"{name} tp=2 pp=2: max |logit diff| {diff:.2e}")
    assert diff <= TOL, (name, diff)


def test_roundtrip_bit_exact(tiny):
    from safetensors.torch import load_file

    for name in tiny["names"]:
        src, back = tiny["workdir"] / "hf" / name, tiny["workdir"] / "rt" / name
        original = load_file(src / "model.safetensors")
        index = json.loads((back / "model.safetensors.index.json").read_text())["weight_map"]
        restored = {}
        for f in sorted(set(index.values())):
            restored.update(load_file(back / f))
        assert sorted(restored) == sorted(original), name
        for key, tensor in original.items():
            assert restored[key].dtype == tensor.dtype, (name, key)
            assert torch.equal(restored[key], tensor), (name, key)
        assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert original["model.embed_tokens.weight"].dtype == torch.bfloat16  # the bf16 model round-trips too


def test_dry_run_sizes_match_real_ranks(tiny):
    for r in tiny["per_rank"]:
        for name, plan in tiny["per_rank"][0]["plans"].items():
            if name in r["params"]:
                assert r["params"][name] == plan["ranks"][r["pp_rank"]]["params"], (name, r["pp_rank"])


def test_reward_model_initialises_from_converted_checkpoint(tiny):
    assert all(r["reward_backbone_equal"] for r in tiny["per_rank"])


def test_failed_conversion_leaves_nothing(tiny):
    r0 = tiny["per_rank"][0]
    assert r0["hf_to_mcore_failure_raised"] and r0["hf_to_mcore_clean"]
    assert r0["mcore_to_hf_failure_raised"] and r0["mcore_to_hf_clean"]


def test_smollm2_import_and_megatron_match_transformers(tmp_path):
    if not SMOLLM2_GGUF.is_file():
        pytest.fail(f"{SMOLLM2_GGUF} missing: run `bash scripts/fetch_smollm2.sh` (test setup) first")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rgkd_megatron.convert.gguf_import import import_gguf

    ref_dir, gguf_name = str(SMOLLM2_GGUF.parent), SMOLLM2_GGUF.name
    reference = AutoModelForCausalLM.from_pretrained(ref_dir, gguf_file=gguf_name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(ref_dir, gguf_file=gguf_name)
    hf_dir = tmp_path / "smollm2_hf"
    import_gguf(SMOLLM2_GGUF, hf_dir)
    ours = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    # the import equals transformers' own GGUF loader, tensor for tensor (q/k permutation undone)
    ref_sd, our_sd = reference.state_dict(), ours.state_dict()
    assert sorted(ref_sd) == sorted(our_sd)
    for key in ref_sd:
        assert torch.equal(ref_sd[key], our_sd[key]), key
    text = "The quick brown fox jumps over the lazy dog. Knowledge distillation trains a small student."
    assert tok(text).input_ids == ref_tok(text).input_ids
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    tokens = torch.tensor([tok(text).input_ids])
    prompt_ids = torch.tensor([tok(prompt).input_ids])
    with torch.no_grad():
        hf_logits = ours(tokens).logits
        assert (reference(tokens).logits - hf_logits).abs().max().item() == 0.0
        hf_greedy = ours.generate(prompt_ids, max_new_tokens=GREEDY_TOKENS, do_sample=False)
    hf_greedy = hf_greedy[0, prompt_ids.shape[1] :].tolist()  # may end early, at the EOS token
    assert "Paris" in tok.decode(hf_greedy)
    del reference, ours, ref_sd, our_sd
    gc.collect()
    per_rank = run_distributed(
        _smollm2_worker,
        3,
        args=(str(hf_dir), str(tmp_path / "smollm2_mc"), tokens, prompt_ids),
        init_process_group=False,
        timeout=400,
    )
    for layout in ((3, 1), (1, 3)):
        got = [r["logits"][layout] for r in per_rank if layout in r["logits"]]
        assert len(got) == 1
        diff = (got[0][..., : hf_logits.shape[-1]] - hf_logits).abs().max().item()
        print(f"smollm2 tp={layout[0]} pp={layout[1]}: max |logit diff| {diff:.2e}")
        assert diff <= 1e-3, (layout, diff)
    r0 = per_rank[0]
    print(f"smollm2 hf->mcore: {r0['convert_seconds']:.1f} s")
    for r in per_rank:  # our loop does not stop at EOS: compare HF's (possibly shorter) continuation
        assert r["greedy"][: len(hf_greedy)] == hf_greedy, (tok.decode(r["greedy"]), tok.decode(hf_greedy))
