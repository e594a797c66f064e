"""Export of a trained student (``save_model_weights`` output) to a complete Hugging Face checkpoint.

One spawned gloo process (world of one, like rank 0 of ``rgkd-distill``) builds a tiny Llama student
(GQA, untied, RoPE base 5e5, vocabulary from ``examples/tokenizer``) with our builder, records its
logits, saves it with ``save_model_weights``, writes the sidecar and calls ``export_hf`` (which runs
in a child process there, torch.distributed being initialised). Then transformers loads the export:
logits equal ours, the tokenizer and chat template reproduce our prompt encoding, ``generate`` runs;
``tools/convert_checkpoint.py --to hf`` with no other flag gives the same tensors; an in-process
export replaces an existing destination only on success.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_utils import run_distributed

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "examples" / "tokenizer"
SEQ = 10
TOL = 1e-4
OVERRIDES = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.ffn_hidden_size=96",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.tie_word_embeddings=false",
    "model.rotary_base=500000",
    "model.max_position_embeddings=128",
    "model.init_method_std=0.1",
    "model.spec=local",
    "model.params_dtype=fp32",
    f"data.tokenizer={TOKENIZER}",
]


def _student_body(rank, world_size, run_dir: Path):
    from rgkd_megatron.checkpoint.dist_ckpt import save_model_weights
    from rgkd_megatron.config import config_to_dict, load_config
    from rgkd_megatron.config.schema import ParallelConfig
    from rgkd_megatron.convert.export import export_hf, write_checkpoint_sidecar
    from rgkd_megatron.data.tokenizer import load_tokenizer
    from rgkd_megatron.models.builders import build_policy
    from rgkd_megatron.parallel.groups import layout_for_world
    from rgkd_megatron.training.setup import init_role, teardown_roles

    cfg = load_config(None, OVERRIDES)
    assert cfg.model.vocab_size is None  # resolved from the tokenizer, as in the run
    groups = init_role(layout_for_world(1, 1, 1), seed=0)
    vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
    model = build_policy(cfg.model, ParallelConfig(), groups, vocab).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norms start at 1: make them informative
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        tokens = torch.randint(0, vocab, (2, SEQ), generator=g)
        logits = model(tokens, torch.arange(SEQ).expand(2, SEQ), None)
    save_model_weights(run_dir / "student", model)
    teardown_roles()
    section = config_to_dict(cfg)["model"]
    write_checkpoint_sidecar(run_dir / "student", section, cfg.data.tokenizer)
    export_hf(run_dir / "student", section, cfg.data.tokenizer, run_dir / "student_hf")
    return {"tokens": tokens, "logits": logits[..., :vocab].clone(), "vocab": vocab, "section": section}


def _in_process_body(rank, world_size, run_dir: Path, section: dict):
    """export_hf with no process group (the conversion makes its own): replace, then a failure."""
    from rgkd_megatron.convert.common import ConversionError
    from rgkd_megatron.convert.export import export_hf

    dst = run_dir / "again_hf"
    dst.mkdir()
    (dst / "stale.txt").write_text("old export")
    out = {"returned": export_hf(run_dir / "student", section, str(TOKENIZER), dst, dtype="bf16")}
    out["files"] = sorted(p.name for p in dst.iterdir())
    (dst / "keep.txt").write_text("complete export")
    try:
        export_hf(run_dir / "student", {**section, "num_layers": 3}, str(TOKENIZER), dst)
        out["error"] = None
    except ConversionError as exc:
        out["error"] = str(exc)
    out["after_failure"] = sorted(p.name for p in dst.iterdir())
    out["siblings"] = sorted(p.name for p in run_dir.iterdir())
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    (result,) = run_distributed(_student_body, world_size=1, args=(run_dir,), timeout=300)
    return run_dir, result


def test_export_loads_in_transformers_with_the_same_logits(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rgkd_megatron.data.tokenizer import load_tokenizer

    run_dir, res = exported
    dst = run_dir / "student_hf"
    files = {p.name for p in dst.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= files
    assert {"tokenizer_config.json", "chat_template.jinja"} <= files
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporaries left
    config = json.loads((dst / "config.json").read_text())
    ours = load_tokenizer(str(TOKENIZER))
    assert config["vocab_size"] == res["vocab"] == ours.vocab_size
    assert (config["eos_token_id"], config["num_key_value_heads"], config["tie_word_embeddings"]) == (
        ours.eos_id,
        2,
        False,
    )

    hf = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf(res["tokens"]).logits
    assert hf_logits.shape == res["logits"].shape
    err = (hf_logits - res["logits"]).abs().max().item()
    assert err < TOL, f"max abs logit difference {err}"
    assert res["logits"].abs().max().item() > 0.5  # the comparison is not trivial

    tok = AutoTokenizer.from_pretrained(dst)
    text = ours.apply_prompt_template("What is 2 plus 3?")
    assert tok.encode(text, add_special_tokens=False) == ours.encode(text)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 3?"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == text
    assert tok.eos_token_id == ours.eos_id
    prompt = torch.tensor([ours.encode(text)])
    with torch.no_grad():
        out = hf.generate(prompt, max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(prompt))
        first = hf(prompt).logits[0, -1].argmax().item()
    assert out.shape[0] == 1 and prompt.shape[1] < out.shape[1] <= prompt.shape[1] + 5
    assert out[0, prompt.shape[1]].item() == first  # greedy


def test_sidecar_makes_the_cli_work_without_flags(exported, tmp_path):
    import yaml
    from safetensors.torch import load_file

    from rgkd_megatron.config.schema import ModelConfig

    run_dir, res = exported
    student = run_dir / "student"
    fields = yaml.safe_load((student / "model_config.yaml").read_text())["model"]
    assert fields.pop("load") == str(student.resolve())
    model_cfg = ModelConfig(**fields)  # the --to mcore format: loads as our model section
    assert (model_cfg.vocab_size, model_cfg.num_query_groups, model_cfg.num_layers) == (res["vocab"], 2, 2)
    assert (student / "tokenizer.json").is_file() and (student / "hf_config.json").is_file()

    out = tmp_path / "cli_hf"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "--to", "hf", "--input", str(student)]
        + ["--output", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported_files = {p.name for p in (run_dir / "student_hf").iterdir()}
    assert {p.name for p in out.iterdir()} == exported_files
    a, b = load_file(out / "model.safetensors"), load_file(run_dir / "student_hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (run_dir / "student_hf" / "config.json").read_text()
    )


def test_in_process_export_replaces_only_on_success(exported):
    from safetensors import safe_open

    run_dir, res = exported
    (out,) = run_distributed(
        _in_process_body, world_size=1, args=(run_dir, res["section"]), timeout=300, init_process_group=False
    )
    dst = run_dir / "again_hf"
    assert out["returned"] == dst
    assert "stale.txt" not in out["files"] and "model.safetensors" in out["files"]
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert out["error"] and "decoder.layers" in out["error"]  # 3 layers asked, 2 stored
    assert "keep.txt" in out["after_failure"]  # the complete export is untouched
    assert not [n for n in out["siblings"] if n.startswith(".")]


def test_chat_template_from_prompt_template():
    import jinja2

    from rgkd_megatron.convert.export import chat_template_from_prompt_template

    template = chat_template_from_prompt_template('Q {{x}} "{prompt}"\nA:')
    env = jinja2.Environment()
    env.globals["raise_exception"] = lambda m: (_ for _ in ()).throw(ValueError(m))
    render = env.from_string(template).render
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " yo"}]
    assert render(messages=msgs[:1]) == 'Q {x} "hi"\nA:'
    assert render(messages=msgs, eos_token="</s>") == 'Q {x} "hi"\nA: yo</s>'
    with pytest.raises(ValueError, match="user and assistant"):
        render(messages=[{"role": "system", "content": "s"}])
    assert chat_template_from_prompt_template("{prompt!r}") is None
