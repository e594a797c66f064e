"""Depth + FFN-width pruning, checked with Hugging Face transformers.

Reference for the pruned student: the *teacher* model object, edited in memory: its layer list cut
to the kept layers, and in each kept layer the dropped SwiGLU neurons switched off by zeroing their
gate rows (silu(0) * up = 0, so the neuron contributes nothing). The pruned checkpoint, loaded by
transformers, must give the same logits.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rgkd_megatron.convert.prune import evenly_spaced_layers, prune_checkpoint  # noqa: E402

VOCAB = 120


def _teacher(tmp_path, qwen: bool = False):
    cfg_cls = transformers.Qwen2Config if qwen else transformers.LlamaConfig
    cfg = cfg_cls(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=qwen,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "teacher")
    return model


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_evenly_spaced_layers():
    assert evenly_spaced_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert evenly_spaced_layers(5, 5) == [0, 1, 2, 3, 4]
    assert evenly_spaced_layers(5, 1) == [0]


@pytest.mark.parametrize("qwen", [False, True])
def test_pruned_student_equals_edited_teacher(tmp_path, qwen):
    teacher = _teacher(tmp_path, qwen)
    keep, width = [0, 2, 4], 40
    meta = prune_checkpoint(
        tmp_path / "teacher", tmp_path / "student", keep_layers=keep, ffn_hidden_size=width
    )
    student = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "student", dtype=torch.float32
    ).eval()
    assert student.config.num_hidden_layers == 3 and student.config.intermediate_size == width

    # reference: edit the teacher itself
    with torch.no_grad():
        for new, old in enumerate(keep):
            mlp = teacher.model.layers[old].mlp
            score = (
                mlp.gate_proj.weight.norm(dim=1)
                * mlp.up_proj.weight.norm(dim=1)
                * mlp.down_proj.weight.norm(dim=0)
            )
            kept = sorted(score.argsort(descending=True)[:width].tolist())
            assert meta["ffn_kept_neurons"][str(new)] == kept
            dropped = sorted(set(range(64)) - set(kept))
            mlp.gate_proj.weight[dropped] = 0.0
    teacher.model.layers = torch.nn.ModuleList(teacher.model.layers[i] for i in keep)
    teacher.config.num_hidden_layers = len(keep)
    if getattr(teacher.config, "layer_types", None):
        teacher.config.layer_types = [teacher.config.layer_types[i] for i in keep]
    for i, layer in enumerate(teacher.model.layers):
        layer.self_attn.layer_idx = i
    tokens = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    diff = (_logits(student, tokens) - _logits(teacher, tokens)).abs().max().item()
    assert diff < 1e-5, diff

    recorded = json.loads((tmp_path / "student" / "prune_metadata.json").read_text())
    assert recorded["kept_layers"] == keep and recorded["source_num_layers"] == 5
    assert recorded["ffn_hidden_size"] == width and recorded["source_ffn_hidden_size"] == 64
    from safetensors import safe_open

    with safe_open(str(tmp_path / "student" / "model.safetensors"), "pt") as f:
        assert f.metadata()["rgkd_prune_kept_layers"] == "0,2,4"


def test_depth_only_copies_layers_exactly(tmp_path):
    _teacher(tmp_path)
    prune_checkpoint(tmp_path / "teacher", tmp_path / "student", num_layers=2)
    from safetensors.torch import load_file

    t = load_file(tmp_path / "teacher" / "model.safetensors")
    s = load_file(tmp_path / "student" / "model.safetensors")
    assert json.loads((tmp_path / "student" / "prune_metadata.json").read_text())["kept_layers"] == [0, 4]
    for name, tensor in s.items():
        src = name.replace("model.layers.1.", "model.layers.4.")
        assert torch.equal(tensor, t[src]), name
    assert len(s) == len(t) - 3 * 9


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    from rgkd_megatron.convert import prune

    _teacher(tmp_path)
    calls = {"n": 0}
    real = prune.ffn_neuron_scores

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected")
        return real(*args)

    monkeypatch.setattr(prune, "ffn_neuron_scores", failing)
    with pytest.raises(RuntimeError, match="injected"):
        prune_checkpoint(tmp_path / "teacher", tmp_path / "student", num_layers=3, ffn_hidden_size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]
