"""The pure parts of the checkpoint converters: tensor layouts, config parsing, files, GGUF q/k order.

References are independent constructions: megatron's QKV rows built head by head with explicit
loops, llama.cpp's q/k ``permute`` as written in its converter, the project's own config loader
reading the generated ``model_config.yaml``.
"""

from __future__ import annotations

import json

import pytest
import torch

from rgkd_megatron.convert.common import ConversionError, atomic_output_dir
from rgkd_megatron.convert.hf_io import HFCheckpoint, ShardedSafetensorsWriter, parse_size
from rgkd_megatron.convert.hf_mapping import (
    FC1,
    QKV,
    QKV_BIAS,
    hf_config_from_model_fields,
    mapping_rules,
    model_config_fields,
    pack,
    parse_hf_config,
    unpack,
    validate_layout,
)

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 48,
    "intermediate_size": 80,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def _arch(**overrides):
    return parse_hf_config({**LLAMA, **overrides})


def _rule(arch, key):
    return next(r for r in mapping_rules(arch) if r.key == key)


@pytest.mark.parametrize("kv_heads", [6, 2, 1])
def test_qkv_layout_matches_megatron_per_group_order(kv_heads):
    arch = _arch(num_key_value_heads=kv_heads)
    hd, h = arch.head_dim, arch.hidden_size
    q = torch.randn(arch.num_heads * hd, h)
    k, v = torch.randn(kv_heads * hd, h), torch.randn(kv_heads * hd, h)
    # megatron-core: for each query group g: its query heads, then key head g, then value head g
    rows = []
    per = arch.num_heads // kv_heads
    for g in range(kv_heads):
        for j in range(per):
            head = g * per + j
            rows.append(q[head * hd : (head + 1) * hd])
        rows.append(k[g * hd : (g + 1) * hd])
        rows.append(v[g * hd : (g + 1) * hd])
    expected = torch.cat(rows)
    rule = _rule(arch, QKV)
    packed = pack(rule, arch, [q, k, v], padded=0)
    assert torch.equal(packed, expected)
    assert all(torch.equal(a, b) for a, b in zip(unpack(rule, arch, packed), [q, k, v]))


def test_qkv_bias_and_fc1_and_vocab_roundtrip():
    arch = parse_hf_config({**LLAMA, "architectures": ["Qwen2ForCausalLM"]})
    assert arch.qkv_bias
    hd = arch.head_dim
    bias = [torch.randn(arch.num_heads * hd), torch.randn(2 * hd), torch.randn(2 * hd)]
    rule = _rule(arch, QKV_BIAS)
    packed = pack(rule, arch, bias, 0)
    assert packed[: 3 * hd].equal(bias[0][: 3 * hd]) and packed[3 * hd : 4 * hd].equal(bias[1][:hd])
    assert all(a.equal(b) for a, b in zip(unpack(rule, arch, packed), bias))
    gate, up = torch.randn(80, 48), torch.randn(80, 48)
    fc1 = pack(_rule(arch, FC1), arch, [gate, up], 0)
    assert fc1[:80].equal(gate) and fc1[80:].equal(up)
    emb = torch.randn(100, 48)
    embed_rule = mapping_rules(arch)[0]
    padded = pack(embed_rule, arch, [emb], 128)
    assert padded.shape == (128, 48) and padded[100:].abs().sum() == 0
    assert unpack(embed_rule, arch, padded)[0].equal(emb)


def test_parse_legacy_and_v5_rope_formats_agree():
    legacy = {**LLAMA, "rope_theta": 500000.0}
    legacy["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    v5 = {k: v for k, v in legacy.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**legacy["rope_scaling"], "rope_theta": 500000.0}
    assert parse_hf_config(legacy) == parse_hf_config(v5)
    arch = parse_hf_config(v5)
    assert arch.rope_theta == 500000.0 and arch.rope_scaling_factor == 8.0


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"head_dim": 16}, "head_dim=16"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 4}, "num_key_value_heads=4"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling.rope_type='linear'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}}, "low_freq_factor"),
        ({"rope_theta": 10000.5}, "rope_theta"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"hidden_size": "48"}, "hidden_size"),
        ({"architectures": ["MistralForCausalLM"], "sliding_window": 4096}, "sliding_window=4096"),
    ],
)
def test_unsupported_configs_name_the_field(change, expected):
    with pytest.raises(ConversionError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        parse_hf_config({**LLAMA, **change})


def test_sliding_window_rules():
    mistral = {**LLAMA, "architectures": ["MistralForCausalLM"], "sliding_window": 4096}
    assert parse_hf_config(mistral, ignore_sliding_window=True).architecture == "MistralForCausalLM"
    qwen = {
        **LLAMA,
        "architectures": ["Qwen2ForCausalLM"],
        "sliding_window": 4096,
        "use_sliding_window": False,
    }
    assert parse_hf_config(qwen).qkv_bias  # a window that is switched off is fine


def test_layout_errors_name_fields():
    arch = _arch()
    validate_layout(arch, 2, 2)
    with pytest.raises(ConversionError, match="num_key_value_heads=2 is not divisible by --tp 3"):
        validate_layout(arch, 3, 1)
    with pytest.raises(ConversionError, match="num_attention_heads=6 is not divisible by --tp 4"):
        validate_layout(arch, 4, 1)
    with pytest.raises(ConversionError, match="num_hidden_layers=2 is not divisible by --pp 3"):
        validate_layout(arch, 1, 3)
    with pytest.raises(ConversionError, match="--tp"):
        validate_layout(arch, 0, 1)


def test_model_section_roundtrips_and_loads_in_our_config(tmp_path):
    from rgkd_megatron.config import load_config
    from rgkd_megatron.convert.hf_to_mcore import model_config_yaml

    arch = _arch(tie_word_embeddings=True, rope_scaling={"rope_type": "llama3", "factor": 4.0})
    fields = model_config_fields(arch, 64)
    back = parse_hf_config(hf_config_from_model_fields(fields, None))
    assert model_config_fields(back, 64) == fields
    path = tmp_path / "model_config.yaml"
    path.write_text(model_config_yaml({**fields, "load": "/ckpt"}, "a comment\nline two"))
    cfg = load_config(str(path))
    for key, value in fields.items():
        assert getattr(cfg.model, key) == value, key
    assert cfg.model.load == "/ckpt" and cfg.model.num_query_groups == 2


def test_sharded_writer_and_reader(tmp_path):
    tensors = {f"t{i}": torch.randn(10, 10) for i in range(5)}
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=900)  # 400 bytes each: 2 per shard
    for name, t in tensors.items():
        writer.add(name, t)
    files = writer.close()
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    ckpt = HFCheckpoint(tmp_path)
    assert sorted(ckpt.tensors) == sorted(tensors)
    assert all(ckpt.get(n).equal(t) for n, t in tensors.items())
    assert parse_size("5GB") == 5_000_000_000 and parse_size("500MB") == 500_000_000
    with pytest.raises(ConversionError, match="--max-shard-size"):
        parse_size("lots")


def test_atomic_output_dir(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(dst) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # neither the destination nor the temporary directory
    with atomic_output_dir(dst) as tmp:
        (tmp / "done").write_text("1")
    assert (dst / "done").read_text() == "1" and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(ConversionError, match="not empty"):
        with atomic_output_dir(dst):
            pass
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_output_dir(empty) as tmp:
        (tmp / "f").write_text("1")
    assert (empty / "f").is_file()


def test_unpermute_inverts_llama_cpp_permute():
    from rgkd_megatron.convert.gguf_import import unpermute_rope

    def llama_cpp_permute(weights, n_head):  # convert_hf_to_gguf.py, LlamaModel.permute
        return (
            weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape)
        )

    for heads in (9, 3):
        w = torch.randn(heads * 8, 5)
        assert unpermute_rope(llama_cpp_permute(w, heads), heads).equal(w)
    # one head of dim 4, rows labelled: HF order [a0, a1, b0, b1] is stored by llama.cpp as [a0, b0, a1, b1]
    stored = torch.tensor([[0.0], [2.0], [1.0], [3.0]])
    assert unpermute_rope(stored, 1).flatten().tolist() == [0.0, 1.0, 2.0, 3.0]


def test_mcore_to_hf_finds_the_config_of_a_training_run(tmp_path):
    """runs/X/config.yaml (resolved config) -> the HF config of an iter_* checkpoint; --vocab-size wins."""
    from rgkd_megatron.config import config_to_dict, load_config
    from rgkd_megatron.convert.mcore_to_hf import find_hf_config

    cfg = load_config(None, ["model.num_layers=3", "model.vocab_size=300", "model.num_query_groups=2"])
    run = tmp_path / "run"
    (run / "checkpoints" / "iter_0000010").mkdir(parents=True)
    import yaml

    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    hf, origin = find_hf_config(run / "checkpoints" / "iter_0000010", None, None, None)
    assert origin.endswith("run/config.yaml")
    arch = parse_hf_config(hf)
    assert (arch.num_layers, arch.vocab_size, arch.num_kv_heads) == (3, 300, 2)
    assert arch.hidden_size == cfg.model.hidden_size and arch.ffn_hidden_size == cfg.model.ffn_hidden_size
    hf, _ = find_hf_config(run / "checkpoints" / "iter_0000010", None, None, 320)
    assert hf["vocab_size"] == 320
    with pytest.raises(ConversionError, match="--hf-config"):
        find_hf_config(tmp_path, None, None, None)
