"""Every bad input to the checkpoint tools: exit status 2, a message naming the tensor / field, and
no destination left behind. The tools' ``main`` runs in-process (all checks happen before anything
is written, so no process group is needed); one subprocess run checks the real exit status.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rgkd_megatron.convert.hf_mapping import hf_shapes, parse_hf_config

REPO = Path(__file__).resolve().parents[2]
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 50,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}


def _tool(name: str):
    return importlib.import_module(f"rgkd_megatron.cli.{name}")


def _hf_dir(path: Path, config: dict | None = None, edit=None) -> Path:
    """A random HF checkpoint for ``config``; ``edit(tensors)`` may break it."""
    config = config or CONFIG
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    try:
        shapes = hf_shapes(parse_hf_config(config))
    except ValueError:  # an unsupported config: tensors of the base model
        shapes = hf_shapes(parse_hf_config(CONFIG))
    tensors = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    if edit:
        edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    return path


def _run(tool: str, argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = _tool(tool).main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    return code, capsys.readouterr().err


def _convert(tmp_path, capsys, src, *extra):
    dst = tmp_path / "dst"
    code, err = _run(
        "convert_checkpoint", ["--to", "mcore", "--input", str(src), "--output", str(dst), *extra], capsys
    )
    assert not dst.exists() and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    return code, err


def _drop(name):
    return lambda t: t.pop(name)


@pytest.mark.parametrize(
    "config_change, edit, extra, expected",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, None, [], "architectures"),
        ({}, _drop("model.layers.1.mlp.up_proj.weight"), [], "tensor model.layers.1.mlp.up_proj.weight: missing"),
        ({}, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}), [], "model.layers.0.mlp.extra.weight: unexpected"),
        ({}, lambda t: t.update({"model.norm.weight": torch.zeros(31)}), [], r"model.norm.weight: shape \[31\], expected \[32\]"),
        ({}, lambda t: t.update({"model.norm.weight": torch.zeros(32, dtype=torch.int8)}), [], "model.norm.weight.*dtype I8"),
        ({}, None, ["--tp", "3"], "num_attention_heads=4 is not divisible by --tp 3"),
        ({"num_attention_heads": 8, "num_key_value_heads": 2}, None, ["--tp", "4"], "num_key_value_heads=2 is not divisible by --tp 4"),
        ({}, None, ["--pp", "3"], "num_hidden_layers=2 is not divisible by --pp 3"),
        ({}, lambda t: t.update({"lm_head.weight": torch.zeros(50, 32)}), [], "lm_head.weight: differs from model.embed_tokens.weight"),
        ({}, None, ["--dtype", "fp8"], "--dtype"),
        ({}, None, ["--hf-config", "x.json"], "--hf-config: only used with --to hf"),
        ({"hidden_act": "relu"}, None, [], "hidden_act"),
    ],
)  # fmt: skip
def test_hf_to_mcore_bad_inputs(tmp_path, capsys, config_change, edit, extra, expected):
    src = _hf_dir(tmp_path / "src", {**CONFIG, **config_change}, edit)
    code, err = _convert(tmp_path, capsys, src, *extra)
    assert code == 2, err
    assert "convert_checkpoint: error:" in err
    assert re.search(expected, err), err


def test_destination_not_empty_is_refused_and_untouched(tmp_path, capsys):
    src = _hf_dir(tmp_path / "src")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    code, err = _run(
        "convert_checkpoint", ["--to", "mcore", "--input", str(src), "--output", str(dst)], capsys
    )
    assert code == 2 and "--output" in err and "not empty" in err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_source_problems(tmp_path, capsys):
    code, err = _convert(tmp_path, capsys, tmp_path / "nowhere")
    assert code == 2 and "not a directory" in err
    src = tmp_path / "bin_only"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(CONFIG))
    (src / "pytorch_model.bin").write_bytes(b"")
    code, err = _convert(tmp_path, capsys, src)
    assert code == 2 and "pytorch_model.bin" in err and "safe_serialization" in err
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    code, err = _convert(tmp_path, capsys, src)
    assert code == 2 and "gone.safetensors" in err


def test_mcore_to_hf_bad_inputs(tmp_path, capsys):
    hf = _hf_dir(tmp_path / "hf")
    dst = tmp_path / "out"
    code, err = _run("convert_checkpoint", ["--to", "hf", "--input", str(hf), "--output", str(dst)], capsys)
    assert code == 2 and "not a megatron-core distributed checkpoint" in err and not dst.exists()
    code, err = _run(
        "convert_checkpoint", ["--to", "hf", "--input", str(tmp_path), "--output", str(dst)], capsys
    )
    assert code == 2 and "not a megatron-core" in err


def _gguf_file(path: Path, arch: str = "llama", drop: str | None = None) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    cfg = parse_hf_config(CONFIG)
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(64)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.ffn_hidden_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(cfg.vocab_size)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_layers)
    for hf_name, shape in hf_shapes(cfg).items():
        module, _, suffix = hf_name.rpartition(".")
        gguf_name = names.get(hf_name) or f"{table.get_name(module)}.{suffix}"
        if gguf_name != drop:
            writer.add_tensor(gguf_name, torch.randn(shape).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_bad_inputs(tmp_path, capsys):
    pytest.importorskip("gguf")
    dst = tmp_path / "out"

    def run(src):
        code, err = _run("import_gguf", ["--input", str(src), "--output", str(dst), "--no-tokenizer"], capsys)
        assert code == 2 and not dst.exists(), err
        return err

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    assert "not a readable GGUF file" in run(junk)
    assert "no such file" in run(tmp_path / "missing.gguf")
    assert "general.architecture='gpt2'" in run(_gguf_file(tmp_path / "gpt2.gguf", arch="gpt2"))
    err = run(_gguf_file(tmp_path / "holes.gguf", drop="blk.1.attn_k.weight"))
    assert "missing tensor(s) blk.1.attn_k.weight" in err


def test_gguf_import_of_an_unquantized_file(tmp_path):
    """A crafted F32 GGUF (no tokenizer): the import writes a loadable HF directory with the config."""
    pytest.importorskip("gguf")
    from rgkd_megatron.convert.gguf_import import import_gguf
    from rgkd_megatron.convert.hf_io import HFCheckpoint

    import_gguf(_gguf_file(tmp_path / "ok.gguf"), tmp_path / "hf", tokenizer=False)
    ckpt = HFCheckpoint(tmp_path / "hf")
    arch = parse_hf_config(ckpt.config)
    assert arch.tie_word_embeddings and arch.num_kv_heads == 2
    assert {n: i.shape for n, i in ckpt.tensors.items()} == hf_shapes(arch)


def test_prune_bad_inputs(tmp_path, capsys):
    src = _hf_dir(tmp_path / "src")
    dst = tmp_path / "out"
    cases = [
        (["--keep-layers", "0,2"], "--keep-layers: layer 2 out of range"),
        (["--keep-layers", "1,0"], "strictly increasing"),
        (["--num-layers", "3"], "--num-layers"),
        (["--num-layers", "1", "--ffn-hidden-size", "49"], "--ffn-hidden-size"),
        (["--num-layers", "1", "--keep-layers", "0"], "not allowed with argument"),
        (["--keep-layers", "a,b"], "comma-separated"),
    ]
    for extra, expected in cases:
        code, err = _run("prune_teacher", ["--teacher", str(src), "--output", str(dst), *extra], capsys)
        assert code == 2 and expected in err, (extra, err)
        assert not dst.exists()


def test_cli_exit_status_and_help(tmp_path):
    src = _hf_dir(tmp_path / "src", {**CONFIG, "architectures": ["BertModel"]})
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "--to", "mcore", "--input", str(src), "--output", str(tmp_path / "d")],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert proc.returncode == 2 and "architectures=['BertModel']" in proc.stderr
    for tool in ("convert_checkpoint", "import_gguf", "prune_teacher"):
        out = subprocess.run(
            [sys.executable, str(REPO / "tools" / f"{tool}.py"), "--help"], capture_output=True, text=True
        )
        assert out.returncode == 0 and "--output" in out.stdout


def test_dry_run_prints_mapping_and_sizes_and_writes_nothing(tmp_path, capsys):
    src = _hf_dir(tmp_path / "src", {**CONFIG, "tie_word_embeddings": False}, lambda t: t.update(
        {"lm_head.weight": torch.randn(50, 32)}))  # fmt: skip
    dst = tmp_path / "dst"
    code = _tool("convert_checkpoint").main(
        ["--to", "mcore", "--input", str(src), "--output", str(dst), "--tp", "2", "--pp", "2", "--dry-run"]
    )
    out = capsys.readouterr().out
    assert code == 0 and not dst.exists()
    assert re.search(r"decoder.layers.self_attention.linear_qkv.weight +\[2, 64, 32\]", out)
    assert "model.layers.{0..1}.self_attn.{q_proj,k_proj,v_proj}.weight" in out
    assert "vocab 50 -> padded 256 (tp=2)" in out
    # per TP rank: stage 0 = embedding 256*32/2 + one layer; stage 1 = one layer + norm + output 256*32/2
    layer = (64 * 32 + 32 * 32 + 2 * 48 * 32 + 32 * 48) // 2 + 2 * 32
    assert f"pp_rank 0: {4096 + layer:,} params" in out
    assert f"pp_rank 1: {layer + 32 + 4096:,} params" in out


def test_prune_dry_run_checks_and_writes_nothing(tmp_path, capsys):
    src = _hf_dir(tmp_path / "src")
    dst = tmp_path / "out"
    code = _tool("prune_teacher").main(["--teacher", str(src), "--output", str(dst), "--keep-layers", "1",
                                        "--dry-run", "--json"])  # fmt: skip
    meta = json.loads(capsys.readouterr().out)
    assert code == 0 and meta["dry_run"] and meta["kept_layers"] == [1] and not dst.exists()
    code = _tool("prune_teacher").main(
        ["--teacher", str(src), "--output", str(dst), "--num-layers", "9", "--dry-run"]
    )
    assert code == 2 and "--num-layers" in capsys.readouterr().err and not dst.exists()
