"""Layer-selection probe (rgkd_megatron/convert/layer_probe.py, tools/prune_teacher.py --probe).

References are independent of the probe's code path: the NLL of a candidate is recomputed on the
checkpoint that prune_checkpoint writes to disk (loaded by transformers, one unpadded sample at a
time, log-softmax written out by hand in float64); the angular distances and Block Influence are
recomputed with numpy from the per-sample hidden states.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from rgkd_megatron.convert.layer_probe import (  # noqa: E402
    best_layer_set,
    encode_pairs,
    pruned_view,
    run_probe,
)
from rgkd_megatron.convert.prune import prune_checkpoint  # noqa: E402
from rgkd_megatron.data.tokenizer import load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LAYERS = 6
PAIRS = [
    {"prompt": "What is the capital of France?", "response": "The capital of France is Paris."},
    {"prompt": "Add 2 and 3.", "response": "2 plus 3 is 5."},
    {"prompt": "Name a colour.", "response": "Blue is a colour of the sky."},
    {"prompt": "Say hello in a friendly way, please.", "response": "Hello there, nice to meet you!"},
    {"prompt": "Why?", "response": "Because it is so."},
]


def _load_tool():
    from rgkd_megatron.cli import prune_teacher

    return prune_teacher


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(directory, model, tokenizer): a tiny random Llama saved with the example tokenizer."""
    root = tmp_path_factory.mktemp("probe")
    tok_dir = REPO / "examples" / "tokenizer"
    tokenizer = load_tokenizer(str(tok_dir))
    cfg = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(root / "teacher")
    for f in tok_dir.iterdir():
        shutil.copy(f, root / "teacher" / f.name)
    probe = root / "pairs.jsonl"
    probe.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return root, model, tokenizer


def _samples(tokenizer):
    out = []
    for p in PAIRS:
        prompt = tokenizer.encode(tokenizer.apply_prompt_template(p["prompt"]))
        out.append((prompt + tokenizer.encode(p["response"]) + [tokenizer.eos_id], len(prompt)))
    return out


def _reference_nll(model_dir, samples) -> float:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, prompt_len in samples:
            z = model(torch.tensor([ids])).logits[0].double()
            m = z.max(dim=-1, keepdim=True).values
            logp = z - m - torch.log(torch.exp(z - m).sum(dim=-1, keepdim=True))
            for t in range(prompt_len, len(ids)):  # token t predicted at position t - 1
                total -= float(logp[t - 1, ids[t]])
                count += 1
    return total / count


def test_candidate_nll_equals_pruned_checkpoint(teacher, tmp_path):
    root, model, tokenizer = teacher
    samples = _samples(tokenizer)
    assert encode_pairs(tokenizer, PAIRS) == samples
    report = run_probe(model, tokenizer, PAIRS, keep=3, batch_size=2, progress=False)
    assert len(model.model.layers) == LAYERS and model.config.num_hidden_layers == LAYERS  # restored
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(LAYERS))
    names = {c["name"] for c in report.candidates}
    assert names == {"evenly_spaced", "drop_deep_block", "angular_block", "block_influence"}
    assert [c["nll"] for c in report.candidates] == sorted(c["nll"] for c in report.candidates)
    assert report.best == best_layer_set(report.candidates) == report.candidates[0]
    by_layers = {tuple(c["layers"]): c["nll"] for c in report.candidates}
    assert (0, 1, 5) in by_layers  # drop_deep_block
    for k, (layers, nll) in enumerate(by_layers.items()):
        prune_checkpoint(root / "teacher", tmp_path / f"s{k}", keep_layers=list(layers))
        assert nll == pytest.approx(_reference_nll(tmp_path / f"s{k}", samples), rel=1e-5)
    assert report.stats.teacher_nll == pytest.approx(_reference_nll(root / "teacher", samples), rel=1e-5)
    with pruned_view(model, [0, 2]):
        assert len(model.model.layers) == 2 and model.model.layers[1].self_attn.layer_idx == 1


def test_angular_and_block_influence_match_numpy(teacher):
    _, model, tokenizer = teacher
    keep = 4
    n = LAYERS - keep
    report = run_probe(model, tokenizer, PAIRS, keep=keep, batch_size=3, progress=False)
    # brute force: states[l] = input of layer l, states[L] = last layer's output (before the final norm)
    per_layer = [[] for _ in range(LAYERS + 1)]
    last = []
    handle = model.model.layers[-1].register_forward_hook(lambda m, a, o: last.append(o))
    with torch.no_grad():
        for ids, _ in _samples(tokenizer):
            hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            for i in range(LAYERS):
                per_layer[i].append(hs[i][0].numpy())
            per_layer[LAYERS].append(last[-1][0].numpy())
    handle.remove()
    states = [np.concatenate(s).astype(np.float64) for s in per_layer]

    def cos(a, b):
        return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

    ang = [
        np.mean(np.arccos(np.clip(cos(states[i], states[i + n]), -1, 1)) / np.pi)
        for i in range(LAYERS - n + 1)
    ]
    bi = [1 - np.mean(cos(states[i], states[i + 1])) for i in range(LAYERS)]
    np.testing.assert_allclose(report.stats.angular, ang, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(report.stats.block_influence, bi, rtol=1e-5, atol=1e-7)
    starts = list(range(1, LAYERS - n))  # blocks keeping layer 0 and the last layer
    best = starts[int(np.argmin([ang[i] for i in starts]))]
    gaps = sorted(ang[i] for i in starts)
    assert gaps[1] - gaps[0] > 1e-6  # a clear winner, so float noise cannot flip it
    expected = [i for i in range(LAYERS) if not best <= i < best + n]
    got = {c["name"]: c["layers"] for c in report.candidates}
    assert got["angular_block"] == expected
    assert got["block_influence"] == sorted(np.argsort(-np.array(bi), kind="stable")[:keep].tolist())
    assert got["drop_deep_block"] == [0, 1, 2, 5]


def test_tool_probe_writes_chosen_argmin(teacher, tmp_path, capsys):
    root, _, _ = teacher
    tool = _load_tool()
    probe = root / "pairs.jsonl"
    argv = [
        "--teacher",
        str(root / "teacher"),
        "--num-layers",
        "3",
        "--probe",
        str(probe),
        "--probe-samples",
        "4",
    ]
    assert tool.main(argv + ["--output", str(tmp_path / "only"), "--probe-only"]) == 0
    assert not (tmp_path / "only").exists()
    table = capsys.readouterr().out
    assert "teacher (all)" in table and "angular_block" in table and "chosen:" in table

    assert tool.main(argv + ["--output", str(tmp_path / "student")]) == 0
    meta = json.loads((tmp_path / "student" / "prune_metadata.json").read_text())
    probe_meta = meta["probe"]
    cands = probe_meta["candidates"]
    best = min(cands, key=lambda c: c["nll"])
    assert probe_meta["chosen"] == best["name"] and probe_meta["chosen_layers"] == best["layers"]
    assert meta["kept_layers"] == best["layers"]
    assert probe_meta["samples"] == 4
    assert probe_meta["sha256"] == hashlib.sha256(probe.read_bytes()).hexdigest()
    cfg = json.loads((tmp_path / "student" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3


@pytest.mark.parametrize(
    "lines, message",
    [
        (None, "no such file"),
        ([json.dumps(PAIRS[0]), "{not json"], "pairs.jsonl:2: not valid JSON"),
        ([json.dumps({"prompt": "hi"})], "pairs.jsonl:1: field 'response' missing"),
        (["", json.dumps({"prompt": 3, "response": "x"})], "pairs.jsonl:2: field 'prompt' not a string"),
        (["[1, 2]"], "pairs.jsonl:1: expected a JSON object"),
        ([""], "no records"),
    ],
)
def test_tool_probe_bad_file(teacher, tmp_path, capsys, lines, message):
    root, _, _ = teacher
    probe = tmp_path / "pairs.jsonl"
    if lines is not None:
        probe.write_text("\n".join(lines) + "\n")
    argv = ["--teacher", str(root / "teacher"), "--output", str(tmp_path / "out"), "--num-layers", "3"]
    assert _load_tool().main(argv + ["--probe", str(probe)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tool_probe_bad_flags(teacher, tmp_path, capsys):
    root, _, _ = teacher
    tool = _load_tool()
    base = ["--teacher", str(root / "teacher"), "--output", str(tmp_path / "out")]
    probe = ["--probe", str(root / "pairs.jsonl")]
    for argv in (base + ["--keep-layers", "0,5"] + probe, base + ["--num-layers", "3", "--probe-only"]):
        with pytest.raises(SystemExit) as exc:
            tool.main(argv)
        assert exc.value.code == 2
    assert tool.main(base + ["--num-layers", str(LAYERS)] + probe) == 2  # nothing to prune
    assert "--num-layers must be" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    assert tool.main(base + ["--num-layers", "3"] + probe) == 2  # checked before the probe runs
    assert "not empty" in capsys.readouterr().err
