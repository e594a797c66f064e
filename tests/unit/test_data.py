"""Data layer: tokenizers, indexed dataset, preprocessing CLI, collation and the micro-batch sampler.

Expectations are computed independently of the code under test: raw ``tokenizers`` / ``sentencepiece``
calls for token ids, ``hashlib`` for fingerprints, hand-written arrays for labels and loss masks.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import pickle
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rgkd_megatron.data import (
    IndexedDataset,
    MicroBatchSampler,
    collate_packed,
    collate_padded,
    load_tokenizer,
    make_sft_sample,
    write_indexed_dataset,
)
from rgkd_megatron.data.batching import check_samples_fit, trained_positions

REPO = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = REPO / "examples" / "tokenizer"
TINY_SFT = REPO / "examples" / "data" / "tiny_sft.jsonl"
EOS = "<|endoftext|>"


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_rgkd_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # multiprocessing workers pickle functions by module name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def preprocess():
    from rgkd_megatron.cli import preprocess_data

    return preprocess_data


@pytest.fixture(scope="module")
def raw_hf():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))


def _write_jsonl(path: Path, records: list) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


# --------------------------------------------------------------------------------------------- tokenizer
def test_hf_tokenizer_roundtrip_and_fields(raw_hf):
    tok = load_tokenizer(str(TOKENIZER_DIR))
    same = load_tokenizer(str(TOKENIZER_DIR / "tokenizer.json"))
    for text in ["What is 3 plus 4?", "  spaces\tand\nnewlines ", "unicode: héllo 世界 🙂", ""]:
        ids = tok.encode(text)
        assert ids == raw_hf.encode(text, add_special_tokens=False).ids
        assert same.encode(text) == ids
        assert tok.decode(ids) == text
    assert tok.vocab_size == 512 == raw_hf.get_vocab_size(with_added_tokens=True)
    assert tok.eos_id == raw_hf.token_to_id(EOS)
    assert tok.pad_id == tok.eos_id and tok.bos_id is None
    expected_fp = hashlib.sha256((TOKENIZER_DIR / "tokenizer.json").read_bytes()).hexdigest()
    assert tok.fingerprint == expected_fp == same.fingerprint
    assert tok.apply_prompt_template("Hi there") == "User: Hi there\nAssistant:"
    assert tok.decode([tok.eos_id]) == EOS


def test_hf_tokenizer_config_overrides(tmp_path, raw_hf):
    shutil.copy(TOKENIZER_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    pad_token = raw_hf.id_to_token(300)
    config = {"eos_token": {"content": EOS}, "pad_token": pad_token, "prompt_template": "Q: {prompt}\nA:"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(tmp_path))
    assert tok.pad_id == 300 and tok.eos_id == raw_hf.token_to_id(EOS)
    assert tok.apply_prompt_template("x") == "Q: x\nA:"
    assert load_tokenizer(str(tmp_path), prompt_template="<{prompt}>").apply_prompt_template("x") == "<x>"

    chat = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}{{ '|go' if add_generation_prompt }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": chat}))
    assert load_tokenizer(str(tmp_path)).apply_prompt_template("hey") == "[user] hey|go"

    # A post-processor that adds BOS (Llama-3 style) must not affect encode().
    from tokenizers import Tokenizer, processors

    with_bos = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    with_bos.post_processor = processors.TemplateProcessing(single=f"{EOS} $A", special_tokens=[(EOS, 0)])
    with_bos.save(str(tmp_path / "tokenizer.json"))
    assert with_bos.encode("hi").ids == [0] + raw_hf.encode("hi").ids
    assert load_tokenizer(str(tmp_path)).encode("hi") == raw_hf.encode("hi").ids

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|no-such-token|>"}))
    with pytest.raises(ValueError, match="eos_token"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"prompt_template": "no placeholder"}))
    with pytest.raises(ValueError, match="prompt"):
        load_tokenizer(str(tmp_path))


def test_sentencepiece_roundtrip(tmp_path):
    import sentencepiece as spm

    rng = random.Random(0)
    words = "the cat sat on a mat with seven red apples and two blue kites near river stones".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) for _ in range(400)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    prefix = tmp_path / "sp"
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"),
        model_prefix=str(prefix),
        vocab_size=60,
        model_type="bpe",
        normalization_rule_name="identity",
        minloglevel=2,
    )
    model = tmp_path / "sp.model"
    tok = load_tokenizer(str(model))
    raw = spm.SentencePieceProcessor(model_file=str(model))
    for text in ["the cat sat on a mat", "seven blue kites near stones", lines[7]]:
        ids = tok.encode(text)
        assert ids == raw.encode(text) and all(isinstance(i, int) for i in ids)
        assert tok.decode(ids) == text
    # sentencepiece defaults: unk=0, bos=1, eos=2, no pad (falls back to eos).
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (60, 1, 2, 2)
    assert tok.fingerprint == hashlib.sha256(model.read_bytes()).hexdigest()
    os.makedirs(tmp_path / "dir")
    shutil.copy(model, tmp_path / "dir" / "tokenizer.model")
    assert load_tokenizer(str(tmp_path / "dir")).encode(lines[3]) == list(raw.encode(lines[3]))


def test_tokenizer_missing_or_unreadable(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_tokenizer(str(missing))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))  # directory without a tokenizer file
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=str(bad)):
        load_tokenizer(str(bad))
    bad_sp = tmp_path / "x.model"
    bad_sp.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=str(bad_sp)):
        load_tokenizer(str(bad_sp))


# --------------------------------------------------------------------------------------------- shipped data
def test_shipped_data_and_tokenizer_are_reproducible(tmp_path):
    data = TINY_SFT.read_bytes()
    assert len(data) < 200_000
    records = [json.loads(line) for line in data.decode().splitlines()]
    assert 250 <= len(records) <= 350
    assert all(isinstance(r["prompt"], str) and isinstance(r["response"], str) for r in records)
    assert len({r["prompt"] for r in records}) == len(records)

    maker = _load_tool("make_tiny_sft")
    maker.main(["--output", str(tmp_path / "regen.jsonl")])
    assert (tmp_path / "regen.jsonl").read_bytes() == data

    from rgkd_megatron.cli import train_tokenizer as trainer

    trainer.main(["--input", str(TINY_SFT), "--vocab-size", "512", "--output", str(tmp_path / "tok")])
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == (
        TOKENIZER_DIR / "tokenizer.json"
    ).read_bytes()


def test_shipped_responses_are_correct():
    """Spot-check that responses are the deterministic answer to their prompt."""
    import re

    checked = 0
    for line in TINY_SFT.read_text().splitlines():
        r = json.loads(line)
        m = re.fullmatch(r"What is (\d+) (plus|minus|times) (\d+)\?", r["prompt"])
        if m:
            a, op, b = int(m[1]), m[2], int(m[3])
            assert int(r["response"]) == {"plus": a + b, "minus": a - b, "times": a * b}[op]
            checked += 1
        m = re.fullmatch(r"Reverse the word '(\w+)'\.", r["prompt"])
        if m:
            assert r["response"] == m[1][::-1]
            checked += 1
    assert checked >= 50


# --------------------------------------------------------------------------------------------- preprocess
RECORDS = [
    {"prompt": "What is 2 plus 2?", "response": "4"},
    {"prompt": "Reverse 'abc'.", "response": " cba", "extra": 1},
    {"prompt": "héllo 世界", "response": "ünïcode 🙂 ok"},
    {"prompt": "", "response": "empty prompt"},
    {"prompt": "empty response", "response": ""},
]


def test_preprocess_matches_direct_tokenization(tmp_path, preprocess, raw_hf):
    src = tmp_path / "in.jsonl"
    _write_jsonl(src, RECORDS[:2] + [""] + RECORDS[2:])  # a blank line is skipped
    out = tmp_path / "out" / "ds"
    assert (
        preprocess.main(["--input", str(src), "--tokenizer", str(TOKENIZER_DIR), "--output", str(out)]) == 0
    )

    eos = raw_hf.token_to_id(EOS)
    ds = IndexedDataset(str(out), verify=True)
    assert len(ds) == len(RECORDS)
    for i, r in enumerate(RECORDS):
        prompt = raw_hf.encode(f"User: {r['prompt']}\nAssistant:", add_special_tokens=False).ids
        response = raw_hf.encode(r["response"], add_special_tokens=False).ids
        tokens, prompt_len = ds[i]
        assert tokens.dtype == np.uint16
        assert tokens.tolist() == prompt + response + [eos]
        assert prompt_len == len(prompt)
    assert (
        ds.tokenizer_fingerprint
        == hashlib.sha256((TOKENIZER_DIR / "tokenizer.json").read_bytes()).hexdigest()
    )
    assert ds.vocab_size == 512
    files = [Path(f"{out}{ext}").read_bytes() for ext in (".bin", ".idx", ".prompt_lengths.npy")]
    assert ds.fingerprint == hashlib.sha256(b"".join(files)).hexdigest()
    assert ds.num_tokens * 2 == len(files[0])

    # --no-template keeps the raw prompt; two workers give byte-identical output.
    out2 = tmp_path / "raw"
    args = ["--input", str(src), "--tokenizer", str(TOKENIZER_DIR), "--output", str(out2)]
    preprocess.main([*args, "--no-template", "--workers", "2"])
    tokens, prompt_len = IndexedDataset(str(out2))[2]
    assert prompt_len == len(raw_hf.encode(RECORDS[2]["prompt"], add_special_tokens=False).ids)
    out3 = tmp_path / "raw1"
    preprocess.main(
        [
            "--input",
            str(src),
            "--tokenizer",
            str(TOKENIZER_DIR),
            "--output",
            str(out3),
            "--no-template",
        ]
    )
    assert Path(f"{out2}.bin").read_bytes() == Path(f"{out3}.bin").read_bytes()
    assert IndexedDataset(str(out2)).fingerprint == IndexedDataset(str(out3)).fingerprint
    assert IndexedDataset(str(out2)).source_fingerprint != ds.source_fingerprint


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"prompt": "p"}', ":3: missing field 'response'"),
        ('{"prompt": "p", "response": 7}', ":3: field 'response' must be a string"),
        ('{"prompt": "p", "response": ', ":3: invalid JSON"),
        ('["prompt", "response"]', ":3: expected a JSON object"),
        (b'{"prompt": "p", "response": "caf\xe9"}', ":3: not valid UTF-8 (byte 0xe9 at column 33)"),
    ],
)
def test_preprocess_bad_input_names_file_line_field(tmp_path, preprocess, bad_line, message):
    src = tmp_path / "bad.jsonl"
    _write_jsonl(src, [RECORDS[0], RECORDS[1], "BAD", RECORDS[2]])
    line = bad_line if isinstance(bad_line, bytes) else bad_line.encode()
    src.write_bytes(src.read_bytes().replace(b"BAD", line))
    out = tmp_path / "ds"
    with pytest.raises(SystemExit) as exc:
        preprocess.main(["--input", str(src), "--tokenizer", str(TOKENIZER_DIR), "--output", str(out)])
    assert f"{src}{message}" in str(exc.value)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # nothing written, no temp files left


def test_preprocess_refuses_existing_output(tmp_path, preprocess):
    src = tmp_path / "in.jsonl"
    _write_jsonl(src, RECORDS)
    out = tmp_path / "ds"
    args = ["--input", str(src), "--tokenizer", str(TOKENIZER_DIR), "--output", str(out)]
    preprocess.main(args)
    before = Path(f"{out}.bin").read_bytes()
    _write_jsonl(src, RECORDS[:2])
    with pytest.raises(SystemExit, match="output exists.*--overwrite"):
        preprocess.main(args)
    assert Path(f"{out}.bin").read_bytes() == before and len(IndexedDataset(str(out))) == len(RECORDS)
    preprocess.main([*args, "--overwrite"])
    assert len(IndexedDataset(str(out))) == 2
    with pytest.raises(SystemExit, match="not found"):
        preprocess.main(["--input", str(tmp_path / "missing.jsonl"), *args[2:], "--overwrite"])


# --------------------------------------------------------------------------------------------- indexed dataset
def _small_dataset(prefix, vocab_size=1000):
    samples = [([1, 2, 3, 4], 2), ([5], 0), ([vocab_size - 1, 0, 7], 3)]
    write_indexed_dataset(str(prefix), iter(samples), "tokfp", "srcfp", vocab_size)
    return samples


def test_indexed_dataset_roundtrip_int32_and_pickle(tmp_path):
    samples = _small_dataset(tmp_path / "a", vocab_size=70_000)
    ds = IndexedDataset(str(tmp_path / "a"), verify=True)
    assert len(ds) == 3 and ds.vocab_size == 70_000 and ds.tokenizer_fingerprint == "tokfp"
    assert os.path.getsize(tmp_path / "a.bin") == 8 * 4
    for i, (tokens, prompt_len) in enumerate(samples):
        got, got_prompt = ds[i]
        assert got.dtype == np.int32 and got.tolist() == tokens and got_prompt == prompt_len
    assert ds[-1][0].tolist() == samples[-1][0]
    with pytest.raises(IndexError):
        ds[3]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[0][0].tolist() == [1, 2, 3, 4] and clone.fingerprint == ds.fingerprint
    assert ds.lengths.tolist() == [4, 1, 3] and ds.prompt_lengths.tolist() == [2, 0, 3]


def test_writer_rejects_bad_samples_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="sample 1: token id 512"):
        write_indexed_dataset(str(tmp_path / "x"), [([1], 0), ([512], 0)], "t", "s", 512)
    with pytest.raises(ValueError, match="sample 0: prompt_len 3"):
        write_indexed_dataset(str(tmp_path / "x"), [([1, 2], 3)], "t", "s", 512)
    with pytest.raises(ValueError, match="no samples"):
        write_indexed_dataset(str(tmp_path / "x"), [], "t", "s", 512)
    assert os.listdir(tmp_path) == []


def test_interrupted_overwrite_keeps_previous_dataset(tmp_path):
    samples = _small_dataset(tmp_path / "a")

    def crashing():
        yield [9, 9, 9], 1
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_indexed_dataset(str(tmp_path / "a"), crashing(), "t", "s", 1000)
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "a.idx", "a.json", "a.prompt_lengths.npy"]
    ds = IndexedDataset(str(tmp_path / "a"), verify=True)
    assert [ds[i][0].tolist() for i in range(len(ds))] == [s[0] for s in samples]


def test_truncated_bin_is_rejected(tmp_path):
    _small_dataset(tmp_path / "a")
    with open(tmp_path / "a.bin", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "a.bin") - 2)
    with pytest.raises(ValueError, match=r"a\.bin is truncated.*num_tokens"):
        IndexedDataset(str(tmp_path / "a"))


def test_corrupt_checksum_is_rejected_with_verify(tmp_path):
    _small_dataset(tmp_path / "a")
    data = bytearray((tmp_path / "a.bin").read_bytes())
    data[0] ^= 0xFF
    (tmp_path / "a.bin").write_bytes(bytes(data))
    IndexedDataset(str(tmp_path / "a"))  # size is intact: opens without verify
    with pytest.raises(ValueError, match=r"checksum mismatch for .*a\.bin.*files\.bin\.sha256"):
        IndexedDataset(str(tmp_path / "a"), verify=True)


def test_missing_files_and_unknown_version(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.json"):
        IndexedDataset(str(tmp_path / "nothing"))
    _small_dataset(tmp_path / "a")
    meta = json.loads((tmp_path / "a.json").read_text())
    (tmp_path / "a.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ValueError, match="field 'version' is 99"):
        IndexedDataset(str(tmp_path / "a"))
    del meta["num_tokens"]
    (tmp_path / "a.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="missing field 'num_tokens'"):
        IndexedDataset(str(tmp_path / "a"))
    _small_dataset(tmp_path / "b")
    os.remove(tmp_path / "b.idx")
    with pytest.raises(FileNotFoundError, match=r"b\.idx"):
        IndexedDataset(str(tmp_path / "b"))


@pytest.mark.parametrize("vocab_size", [1000, 70_000])
def test_megatron_core_reader_reads_the_written_files(tmp_path, vocab_size):
    """megatron-core's own IndexedDataset (what Megatron-LM's GPTDataset reads) gives every sample."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset

    samples = _small_dataset(tmp_path / "a", vocab_size)
    theirs = MegatronIndexedDataset(str(tmp_path / "a"))
    assert len(theirs) == len(samples)
    assert theirs.document_indices.tolist() == list(range(len(samples) + 1))  # a document per sample
    assert [theirs[i].tolist() for i in range(len(samples))] == [s[0] for s in samples]
    prompt = np.load(tmp_path / "a.prompt_lengths.npy")
    assert prompt.tolist() == [s[1] for s in samples]


def test_version_1_datasets_are_still_read(tmp_path):
    """The previous format (npy index of (start, end, prompt_len)), written here by hand."""
    tokens = np.array([1, 2, 3, 4, 5, 9, 0, 7], dtype="<u2")
    index = np.array([[0, 4, 2], [4, 5, 0], [5, 8, 3]], dtype=np.int64)
    (tmp_path / "v1.bin").write_bytes(tokens.tobytes())
    with open(tmp_path / "v1.idx", "wb") as f:
        np.save(f, index)
    files = {k: {"size": 0, "sha256": "-"} for k in ("bin", "idx")}
    meta = {"format": "rgkd_indexed_dataset", "version": 1, "dtype": "uint16", "num_samples": 3}
    meta.update(num_tokens=8, vocab_size=10, tokenizer_fingerprint="t", source_fingerprint="s")
    (tmp_path / "v1.json").write_text(json.dumps({**meta, "fingerprint": "f", "files": files}))
    ds = IndexedDataset(str(tmp_path / "v1"))
    assert [(ds[i][0].tolist(), ds[i][1]) for i in range(3)] == [([1, 2, 3, 4], 2), ([5], 0), ([9, 0, 7], 3)]


# --------------------------------------------------------------------------------------------- collation
def test_make_sft_sample():
    assert make_sft_sample([5, 6], [7, 8], 0) == ([5, 6, 7, 8, 0], 2)
    assert make_sft_sample([], [7], 3) == ([7, 3], 0)


def test_collate_padded_by_hand():
    samples = [
        ([10, 11, 12, 20, 21, 0], 3),  # prompt 10 11 12, response 20 21, EOS 0
        (list(range(1, 12)), 2),  # 11 tokens: truncated to seq_length + 1 = 9
        ([5], 1),  # nothing to predict
    ]
    b = collate_padded(samples, seq_length=8, pad_id=99)
    assert set(b) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert b["tokens"].dtype == torch.int64 and b["labels"].dtype == torch.int64
    assert b["position_ids"].dtype == torch.int64 and b["loss_mask"].dtype == torch.float32
    assert b["tokens"].tolist() == [
        [10, 11, 12, 20, 21, 99, 99, 99],
        [1, 2, 3, 4, 5, 6, 7, 8],
        [99] * 8,
    ]
    assert b["labels"].tolist() == [
        [11, 12, 20, 21, 0, 99, 99, 99],
        [2, 3, 4, 5, 6, 7, 8, 9],
        [99] * 8,
    ]
    assert b["loss_mask"].tolist() == [
        [0, 0, 1, 1, 1, 0, 0, 0],  # labels 20, 21 and EOS
        [0, 1, 1, 1, 1, 1, 1, 1],  # labels 3..9 are response tokens
        [0] * 8,
    ]
    assert b["position_ids"].tolist() == [list(range(8))] * 3
    with_ids = collate_padded(samples[:1], seq_length=8, pad_id=99, sample_ids=[42])
    assert with_ids["sample_ids"].tolist() == [[42] * 5 + [-1] * 3]


def test_collate_packed_by_hand():
    a = ([1, 2, 3, 4, 5], 2)  # 4 positions
    b = ([11, 12, 13, 14, 15, 16, 17], 1)  # 6 positions
    c = ([21, 22, 23, 24], 3)  # 3 positions
    d = ([31, 32, 33], 0)  # 2 positions
    out = collate_packed([a, b, c, d], seq_length=8, pad_id=0, sample_ids=[100, 101, 102, 103])
    # First fit: a -> row 0 (4 left), b -> row 1 (2 left), c -> row 0 (1 left), d -> row 1 (0 left).
    assert out["tokens"].tolist() == [[1, 2, 3, 4, 21, 22, 23, 0], [11, 12, 13, 14, 15, 16, 31, 32]]
    assert out["labels"].tolist() == [[2, 3, 4, 5, 22, 23, 24, 0], [12, 13, 14, 15, 16, 17, 32, 33]]
    assert out["loss_mask"].tolist() == [[0, 1, 1, 1, 0, 0, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1]]
    assert out["sample_ids"].tolist() == [[100] * 4 + [102] * 3 + [-1], [101] * 6 + [103] * 2]
    assert out["loss_mask"].dtype == torch.float32 and out["tokens"].dtype == torch.int64
    # A row with one sample equals the padded row; num_rows fixes the batch dimension.
    single = collate_packed([a], seq_length=8, pad_id=0, num_rows=2)
    padded = collate_padded([a, ([0], 0)], seq_length=8, pad_id=0)
    for key in padded:
        assert torch.equal(single[key], padded[key]), key
    with pytest.raises(ValueError, match="num_rows=1"):
        collate_packed([a, b], seq_length=8, pad_id=0, num_rows=1)


def test_packing_keeps_every_response_token_exactly_once():
    rng = random.Random(3)
    seq_length = 16
    samples = []
    for _ in range(40):
        length = rng.randint(1, 24)  # some longer than a row: truncated
        samples.append(([rng.randint(1, 500) for _ in range(length)], rng.randint(0, length)))
    out = collate_packed(samples, seq_length=seq_length, pad_id=0, sample_ids=list(range(len(samples))))
    seen = {}
    ids, pos = out["sample_ids"], out["position_ids"]
    for r, t in zip(*torch.nonzero(out["loss_mask"], as_tuple=True)):
        key = (int(ids[r, t]), int(pos[r, t]) + 1)  # (sample, offset of the label token)
        seen[key] = seen.get(key, 0) + 1
        assert int(out["labels"][r, t]) == samples[key[0]][0][key[1]]
    expected = {
        (i, j)
        for i, (tokens, p) in enumerate(samples)
        for j in range(max(p, 1), min(len(tokens), seq_length + 1))
    }
    assert set(seen) == expected and set(seen.values()) == {1}
    assert out["tokens"].shape[1] == seq_length and out["tokens"].shape[0] < len(samples)


# --------------------------------------------------------------------------------------------- sampler
def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_ranks_partition_global_batches():
    n, mbs, dp, seed = 23, 2, 3, 7
    per_rank = [_take(MicroBatchSampler(n, mbs, r, dp, seed), 9) for r in range(dp)]
    per_epoch = n // (mbs * dp)  # 3 global batches, 5 samples dropped per epoch
    for step in range(9):
        union = [i for r in range(dp) for i in per_rank[r][step]]
        assert all(len(per_rank[r][step]) == mbs for r in range(dp))
        assert len(set(union)) == mbs * dp and all(0 <= i < n for i in union)
        epoch, k = divmod(step, per_epoch)
        perm = np.random.default_rng(seed + epoch).permutation(n)
        assert union == perm[k * mbs * dp : (k + 1) * mbs * dp].tolist()
    first_epoch = [i for step in range(per_epoch) for r in range(dp) for i in per_rank[r][step]]
    assert len(set(first_epoch)) == per_epoch * mbs * dp  # no repeats inside an epoch


def test_sampler_resume_equals_uninterrupted():
    n, mbs, dp, seed = 10, 2, 2, 1
    for rank in range(dp):
        full = _take(MicroBatchSampler(n, mbs, rank, dp, seed), 12)  # crosses several epochs
        resumed = _take(MicroBatchSampler(n, mbs, rank, dp, seed, consumed_samples=5 * mbs * dp), 7)
        assert resumed == full[5:]
        first = MicroBatchSampler(n, mbs, rank, dp, seed)
        _take(first, 3)
        state = first.state_dict()
        assert state["consumed_samples"] == 3 * mbs * dp
        other = MicroBatchSampler(n, mbs, rank, dp, seed)
        other.load_state_dict(json.loads(json.dumps(state)))
        assert _take(other, 9) == full[3:]
    # Same global batch with another micro-batch / DP split: same global sample stream.
    merged = [i for b in _take(MicroBatchSampler(n, 4, 0, 1, seed), 4) for i in b]
    split = [i for s in range(4) for r in range(2) for i in _take(MicroBatchSampler(n, 2, r, 2, seed), 4)[s]]
    assert merged == split


def test_sampler_rejects_bad_state():
    s = MicroBatchSampler(10, 2, 0, 2, seed=1)
    with pytest.raises(ValueError, match="seed"):
        s.load_state_dict({"consumed_samples": 4, "seed": 2, "num_samples": 10})
    with pytest.raises(ValueError, match="num_samples"):
        s.load_state_dict({"consumed_samples": 4, "seed": 1, "num_samples": 11})
    with pytest.raises(ValueError, match="multiple"):
        MicroBatchSampler(10, 2, 0, 2, seed=1, consumed_samples=3)
    with pytest.raises(ValueError, match="dp_rank"):
        MicroBatchSampler(10, 2, 2, 2, seed=1)
    with pytest.raises(ValueError, match="smaller than one global"):
        MicroBatchSampler(3, 2, 0, 2, seed=1)


def _fits_by_collation(samples, seq_length):
    """Loss positions per sample, counted on the padded batch the trainer builds."""
    return [int(collate_padded([s], seq_length, 0)["loss_mask"].sum()) for s in samples]


def test_trained_positions_match_the_collated_loss_mask():
    rng = random.Random(0)
    seq = 12
    samples = []
    for _ in range(60):
        prompt_len = rng.randint(1, 20)
        samples.append((list(range(prompt_len + rng.randint(0, 10))), prompt_len))
    samples += [([1, 2, 3], 3), ([5] * 13, 12), ([5] * 14, 13), ([5] * 13, 13)]  # the boundaries
    lengths = np.array([len(t) for t, _ in samples])
    prompts = np.array([p for _, p in samples])
    assert trained_positions(lengths, prompts, seq).tolist() == _fits_by_collation(samples, seq)


def test_check_samples_fit_counts_cut_samples_and_refuses_when_none_trains():
    lengths, prompts = np.array([30, 8, 40]), np.array([25, 4, 20])
    assert check_samples_fit(lengths, prompts, 16, "d.jsonl") == (2, 2)  # 30 and 40 cut, 2 untrained
    with pytest.raises(
        ValueError, match=r"no sample of d.jsonl fits: prompts are 20 to 25 tokens, data.seq_length is 8"
    ):
        check_samples_fit(np.array([30, 40]), np.array([25, 20]), 8, "d.jsonl")


def test_tokenize_once_reuses_a_current_copy_and_replaces_a_stale_one(tmp_path, caplog):
    from rgkd_megatron.data.preprocess import tokenize_once

    src, prefix = tmp_path / "d.jsonl", str(tmp_path / "run" / "data" / "d")
    _write_jsonl(src, RECORDS[:2])
    tokenize_once(str(src), str(TOKENIZER_DIR), prefix)
    first = Path(f"{prefix}.bin").read_bytes()
    tokenize_once(str(src), str(TOKENIZER_DIR), prefix)
    assert Path(f"{prefix}.bin").read_bytes() == first
    _write_jsonl(src, RECORDS[:3])  # the source changed since the copy was made
    logging.getLogger("rgkd_megatron.data.preprocess").addHandler(caplog.handler)
    try:
        tokenize_once(str(src), str(TOKENIZER_DIR), prefix)
    finally:
        logging.getLogger("rgkd_megatron.data.preprocess").removeHandler(caplog.handler)
    assert f"{prefix} is stale" in caplog.text
    tok = load_tokenizer(str(TOKENIZER_DIR))
    assert len(IndexedDataset(prefix)) == 3
    tokens, prompt_len = IndexedDataset(prefix)[2]
    prompt = tok.encode(tok.apply_prompt_template(RECORDS[2]["prompt"]))
    assert tokens.tolist() == prompt + tok.encode(RECORDS[2]["response"]) + [tok.eos_id]
    assert prompt_len == len(prompt)
