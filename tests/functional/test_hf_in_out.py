"""Hugging Face in and out of rgkd-train, as a user runs it.

A tiny random Llama (GQA, untied, fp32) is built and saved with ``transformers`` (no download),
with the example tokenizer beside it. ``rgkd-train`` gets that folder as ``model.load`` and no
architecture at all: the run's resolved config must carry the folder's architecture, the run
writes ``RUN/student`` (megatron) and ``RUN/student_hf``; ``transformers`` loads the latter and its
logits equal those of our model loaded from the former (fp32, 1e-5). Training really happened
(the weights moved away from the input's). ``tools/convert_checkpoint.py --to hf`` converts
``RUN/student`` with no other flag to the same tensors. A recipe field that contradicts the
checkpoint is an error naming the field and both values.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from distributed_utils import run_distributed

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "examples" / "tokenizer"
SEQ = 10
TOL = 1e-5


def _cli(args: list[str], module: str = "rgkd_megatron.cli.train") -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    cmd = [sys.executable, "-m", module, *args] if module else [sys.executable, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def make_tiny_hf_llama(dst: Path) -> Path:
    """A random fp32 Llama with every tensor informative (norms too), saved with transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rgkd_megatron.data.tokenizer import load_tokenizer

    config = LlamaConfig(
        vocab_size=load_tokenizer(str(TOKENIZER)).vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale, shift = (0.1, 1.0) if name.endswith("norm.weight") else (0.08, 0.0)
            p.copy_(shift + scale * torch.randn(p.shape, generator=g))
    model.save_pretrained(dst, safe_serialization=True)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, dst / f.name)
    return dst


def _our_logits(rank, world_size, ckpt: str, tokenizer: str, tokens: torch.Tensor):
    """Our policy built from the checkpoint's own description (model.load only) and loaded from it."""
    from rgkd_megatron.config import load_config
    from rgkd_megatron.config.schema import ParallelConfig
    from rgkd_megatron.convert.hf_load import load_weights
    from rgkd_megatron.models.builders import build_policy
    from rgkd_megatron.parallel.groups import layout_for_world
    from rgkd_megatron.training.setup import init_role, teardown_roles

    cfg = load_config(None, [f"model.load={ckpt}", "model.spec=local", "model.params_dtype=fp32"])
    groups = init_role(layout_for_world(1, 1, 1), seed=0)
    model = build_policy(cfg.model, ParallelConfig(), groups, cfg.model.vocab_size).eval()
    load_weights(ckpt, model)
    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.shape[1]).expand(*tokens.shape), None)
    teardown_roles()
    return logits[..., : cfg.model.vocab_size].clone()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("hf_in_out")
    hf_in = make_tiny_hf_llama(work / "hf_in")
    run = work / "run"
    out = _cli([
        f"model.load={hf_in}", f"data.tokenizer={hf_in}", "data.train_path=examples/data/tiny_sft.jsonl",
        "model.spec=local", "model.params_dtype=fp32", "data.seq_length=64", "train.train_iters=3",
        "train.lr=1e-2", "train.lr_warmup_iters=0", f"logging.run_dir={run}", "logging.progress_bar=false",
    ])  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return hf_in, run


def test_architecture_comes_from_the_hf_folder(trained):
    hf_in, run = trained
    model = yaml.safe_load((run / "config.yaml").read_text())["model"]
    expected = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 4}
    expected.update(
        num_query_groups=2, tie_word_embeddings=False, norm_epsilon=1e-6, max_position_embeddings=128
    )
    assert {k: model[k] for k in expected} == expected
    student_fields = yaml.safe_load((run / "student" / "model_config.yaml").read_text())["model"]
    assert {k: student_fields[k] for k in expected} == expected


def test_hf_out_logits_equal_ours_and_training_moved_the_weights(trained):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_in, run = trained
    dst = run / "student_hf"
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in dst.iterdir()
    }
    hf = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    tokens = torch.randint(0, hf.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hf_logits = hf(tokens).logits
    (ours,) = run_distributed(_our_logits, 1, args=(str(run / "student"), str(hf_in), tokens), timeout=300)
    err = (hf_logits - ours).abs().max().item()
    assert err < TOL, f"max abs logit difference {err}"
    assert ours.abs().max().item() > 0.5  # not a trivial comparison
    before, after = load_file(hf_in / "model.safetensors"), load_file(dst / "model.safetensors")
    assert set(before) == set(after)
    moved = max((after[k] - before[k]).abs().max().item() for k in before)
    assert moved > 1e-3  # three steps at lr 1e-2 changed the weights: the export is the trained student
    assert AutoTokenizer.from_pretrained(dst).chat_template


def test_convert_checkpoint_needs_no_extra_flags(trained, tmp_path):
    from safetensors.torch import load_file

    _, run = trained
    out = _cli(
        [
            "tools/convert_checkpoint.py",
            "--to",
            "hf",
            "--input",
            str(run / "student"),
            "--output",
            str(tmp_path / "o"),
        ],
        "",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ours, exported = (
        load_file(tmp_path / "o" / "model.safetensors"),
        load_file(run / "student_hf" / "model.safetensors"),
    )
    assert set(ours) == set(exported) and all(torch.equal(ours[k], exported[k]) for k in ours)
    ckpt = sorted((run / "checkpoints").glob("iter_*"))[-1]
    assert (ckpt / "model_config.yaml").is_file() and (ckpt / "tokenizer.json").is_file()


def test_recipe_contradicting_the_checkpoint_names_both_values(trained):
    hf_in, _ = trained
    out = _cli(["--dry-run", f"model.load={hf_in}", "model.num_layers=3", f"data.tokenizer={hf_in}"])
    assert out.returncode == 2
    assert "model.num_layers" in out.stderr and "has 3" in out.stderr and "has 2" in out.stderr


def _save_role_checkpoint(rank, world_size, run: Path, tokenizer: str):
    """A tiny policy saved plain and, with a reward model, as a multi-role loop checkpoint's keys
    (``policy.*``, ``reward.*``) in ``run/checkpoints/iter_0000001``; the run's config.yaml beside."""
    from megatron.core import dist_checkpointing

    from rgkd_megatron.checkpoint.dist_ckpt import model_sharded_state_dict, save_model_weights
    from rgkd_megatron.config import load_config, save_resolved_config
    from rgkd_megatron.config.schema import ParallelConfig
    from rgkd_megatron.models.builders import build_policy, build_reward_model
    from rgkd_megatron.parallel.groups import layout_for_world
    from rgkd_megatron.training.setup import init_role, teardown_roles

    cfg = load_config(None, ["model.spec=local", "model.params_dtype=fp32", f"data.tokenizer={tokenizer}"])
    save_resolved_config(cfg, str(run))
    groups = init_role(layout_for_world(1, 1, 1), seed=0)
    vocab = 512
    policy = build_policy(cfg.model, ParallelConfig(), groups, vocab)
    reward = build_reward_model(cfg.model, ParallelConfig(), groups, vocab)
    save_model_weights(run / "plain", policy)
    ckpt = run / "checkpoints" / "iter_0000001"
    ckpt.mkdir(parents=True)
    state = {
        "policy": model_sharded_state_dict(policy, prefix="policy."),
        "reward": model_sharded_state_dict(reward, prefix="reward."),
    }
    dist_checkpointing.save(state, str(ckpt))
    teardown_roles()
    return str(ckpt)


def test_convert_one_role_of_a_loop_checkpoint(tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    (ckpt,) = run_distributed(_save_role_checkpoint, 1, args=(run, str(TOKENIZER)), timeout=300)
    convert = ["tools/convert_checkpoint.py", "--to", "hf", "--input", ckpt]
    out = _cli([*convert, "--output", str(tmp_path / "x")], "")
    assert (
        out.returncode == 2
        and "multi-role loop checkpoint (roles: policy, reward): pass --role" in out.stderr
    )
    out = _cli([*convert, "--output", str(tmp_path / "policy"), "--role", "policy"], "")
    assert out.returncode == 0, out.stderr[-3000:]
    plain = ["tools/convert_checkpoint.py", "--to", "hf", "--input", str(run / "plain"), "--model-config"]
    out = _cli(
        [*plain, str(run / "config.yaml"), "--vocab-size", "512", "--output", str(tmp_path / "ref")], ""
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ours, ref = (
        load_file(tmp_path / "policy" / "model.safetensors"),
        load_file(tmp_path / "ref" / "model.safetensors"),
    )
    assert set(ours) == set(ref) and all(torch.equal(ours[k], ref[k]) for k in ours)
    assert (tmp_path / "policy" / "tokenizer.json").is_file()  # the run's data.tokenizer
