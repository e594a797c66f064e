"""generate_responses (rgkd_megatron.cli.generate_responses, tools/generate_responses.py) on a tiny random-init teacher saved as a dist checkpoint.

- The tool's file holds one response per prompt, in prompt order, equal to an independent call of
  ``generate`` on all prompts at once (greedy) with the EOS stripped and decoded here: this checks the
  tool's length-sorted batching and its merge; ``truncated`` is the reference's ``not finished``.
- ``--num-samples 3 --temperature 1`` on a teacher whose EOS logit is boosted (so that some responses
  stop and some are cut): 3 consecutive records per prompt with ``sample`` 0, 1, 2, equal to an
  independent ``generate`` call on the documented canonical order (one batch: item j = sample j % 3
  of prompt j // 3, sorted by (prompt length, j), seed = --seed); ``truncated`` is true exactly for
  the rows whose ids reached --max-new-tokens without EOS; the samples of a prompt differ.
- 2 DP processes (TP=1) write the same bytes as 1 process; so does TP=2; so do 2 DP processes with
  --num-samples.
- A crash after the first batch leaves no output, only the ``.partial`` sidecar; the rerun resumes
  and writes the same bytes (with and without --num-samples). A rerun on a finished output does
  nothing; other settings are an error unless --overwrite.
- Bad inputs: a clear error, exit code 2, nothing written. (Everything that needs megatron runs in
  spawned processes; the pytest process only reads files.)
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from distributed_utils import run_distributed

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "examples" / "tokenizer" / "tokenizer.json"
MODEL = {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4,
         "max_position_embeddings": 64, "init_method_std": 0.2}  # fmt: skip
PROMPTS = [
    {"prompt": "What is the capital of Italy?", "reference": "The capital of Italy is Rome."},
    {"prompt": "List three fruits.", "reference": "Apple, banana and orange."},
    {"prompt": "Give a synonym for 'big'.", "reference": "A synonym for 'big' is 'large'."},
    {"prompt": "What is 2 plus 3?", "task": "arithmetic"},  # no reference; an extra field is kept
    {"prompt": "Explain in one sentence what gravity is.", "reference": "Gravity pulls things down."},
    {"prompt": "Name a color.", "reference": "Blue."},
    {"prompt": "Is 7 odd?", "reference": "Yes, 7 is odd."},
]
MAX_NEW = 6
BATCH = 2
SAMPLES = ["--temperature", "1.0", "--num-samples", "3", "--seed", "3"]
EOS_BOOST = 5.0  # scales the EOS row of the tied output weight: a mix of stopped and cut responses
OK = ['{"prompt": "a"}']
BAD_CASES = [  # (id, prompt lines, extra flags, expected message); run with --dry-run
    ("bad-json", ['{"prompt": "a"}', '{"prompt": "b"', '{"prompt": "c"}'], [], "prompts.jsonl:2: invalid JSON"),
    ("no-prompt", ['{"prompt": "a"}', '{"reference": "b"}'], [], "prompts.jsonl:2: missing field 'prompt'"),
    ("empty-prompt", ['{"prompt": ""}'], [], "prompts.jsonl:1: field 'prompt' must be a non-empty string"),
    ("bad-reference", ['{"prompt": "a", "reference": 3}'], [], "prompts.jsonl:1: field 'reference' must be a string"),
    ("not-an-object", ["[1, 2]"], [], "prompts.jsonl:1: expected a JSON object"),
    ("empty-file", [""], [], "no records"),
    ("too-long", [*OK, '{"prompt": "' + "long " * 60 + '"}'], [], "line 2: the prompt is"),
    ("missing-prompts", OK, ["--prompts", "{tmp}/missing.jsonl"], "missing.jsonl does not exist"),
    ("missing-ckpt", OK, ["--teacher", "{tmp}/nope"], "nope: checkpoint directory does not exist"),
    ("bad-flag", OK, ["--max-new-tokens", "0"], "max_new_tokens: expected a positive int"),
    ("bad-samples", OK, ["--num-samples", "0", "--temperature", "1"], "num_samples: expected a positive int"),
    ("greedy-samples", OK, ["--num-samples", "2"], "num_samples: 2 samples per prompt need temperature > 0"),
    ("bad-tp", OK, ["--tp", "3"], "parallel.tensor_model_parallel_size"),
    ("bad-model-config", OK, ["--model-config", "{tmp}/prompts.jsonl"], "--model-config"),
]  # fmt: skip


def _load_tool():
    from rgkd_megatron.cli import generate_responses

    return generate_responses


def _argv(tmp: Path, out: str, *extra: str) -> list[str]:
    return [
        "--prompts", str(tmp / "prompts.jsonl"), "--teacher", str(tmp / "ckpt"), "--model-config", str(tmp / "model.yaml"),
        "--tokenizer", str(TOKENIZER), "--output", str(tmp / out), "--batch-size", str(BATCH),
        "--max-new-tokens", str(MAX_NEW), "--no-progress", "--log-level", "WARNING", *extra,
    ]  # fmt: skip


def _main(tool, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = tool.main(argv)
    return rc, out.getvalue(), err.getvalue()


def _bad_inputs(tool, tmp: Path) -> list[tuple[int, str, list[str]]]:
    """Each BAD_CASES entry in its own directory: (exit code, stderr, files left there)."""
    results = []
    for i, (_, lines, extra, _) in enumerate(BAD_CASES):
        d = tmp / "bad" / str(i)
        (d / "ckpt").mkdir(parents=True)
        (d / "ckpt" / "metadata.json").write_text("{}")  # enough for the checks that run before loading
        (d / "model.yaml").write_text(json.dumps({"model": MODEL}))
        (d / "prompts.jsonl").write_text("".join(line + "\n" for line in lines))
        flags = [a.format(tmp=d) for a in extra]
        rc, _, err = _main(tool, _argv(d, "out.jsonl", "--dry-run", *flags))
        results.append((rc, err, sorted(p.name for p in d.iterdir())))
    return results


def _crash_and_resume(tool, tmp: Path, out: str, *extra: str) -> dict:
    """Run the tool with ``generate`` failing on its second call, look at what is left, rerun."""
    import rgkd_megatron.generation.responses as responses

    generate, calls, result = responses.generate, [], {}

    def crash_after_first_batch(*args, **kwargs):
        if calls:
            raise RuntimeError("simulated kill")
        calls.append(1)
        return generate(*args, **kwargs)

    responses.generate = crash_after_first_batch
    try:
        _main(tool, _argv(tmp, out, *extra))
    except RuntimeError as exc:
        result["crash"] = str(exc)
    finally:
        responses.generate = generate
    result["after_crash"] = sorted(p.name for p in tmp.iterdir() if p.name.startswith(out))
    result["after_crash_partial"] = sorted(p.name for p in (tmp / f"{out}.partial").iterdir())
    result["resume"] = _main(tool, _argv(tmp, out, *extra))
    result["resumed_bytes"] = (tmp / out).read_bytes()
    return result


def _single_process(rank, world_size, tmp):
    """Build + save the teacher (and its EOS-boosted copy), run the tool (plain, samples,
    crash/resume, rerun, mismatch, bad inputs), and the references."""
    import torch
    import yaml

    from rgkd_megatron.checkpoint.dist_ckpt import save_model_weights
    from rgkd_megatron.config import config_from_dict
    from rgkd_megatron.data.tokenizer import load_tokenizer
    from rgkd_megatron.generation.generate import generate
    from rgkd_megatron.models.builders import build_policy
    from rgkd_megatron.parallel.groups import RoleLayout
    from rgkd_megatron.training.setup import init_role, teardown_roles

    tmp = Path(tmp)
    cfg = config_from_dict({"model": MODEL})
    tok = load_tokenizer(str(TOKENIZER))
    groups = init_role(RoleLayout(), seed=11)
    model = build_policy(cfg.model, cfg.parallel, groups, tok.vocab_size)
    save_model_weights(tmp / "ckpt", model)
    (tmp / "model.yaml").write_text(yaml.safe_dump({"model": MODEL}))
    # the independent reference: every prompt in one generate call, greedy
    ids = [tok.encode(tok.apply_prompt_template(p["prompt"])) for p in PROMPTS]
    ref = generate(model, groups, ids, max_new_tokens=MAX_NEW, temperature=0.0, eos_id=tok.eos_id,
                   pad_id=tok.pad_id, seed=0, vocab_size=tok.vocab_size)  # fmt: skip
    expected = []
    for row in ref.response_ids():
        if row and row[-1] == tok.eos_id:
            row = row[:-1]
        expected.append(tok.decode(row))
    result = {"expected": expected, "expected_truncated": [not f for f in ref.finished.tolist()]}

    # the EOS-boosted teacher and the reference for --num-samples 3 in one batch of 3 * len(PROMPTS)
    with torch.no_grad():
        model.shared_embedding_or_output_weight()[tok.eos_id] *= EOS_BOOST
    save_model_weights(tmp / "ckpt_eos", model)
    order = sorted(range(3 * len(PROMPTS)), key=lambda j: (len(ids[j // 3]), j))
    ref = generate(model, groups, [ids[j // 3] for j in order], max_new_tokens=MAX_NEW, temperature=1.0,
                   eos_id=tok.eos_id, pad_id=tok.pad_id, seed=3, vocab_size=tok.vocab_size)  # fmt: skip
    samples = [None] * len(order)
    for j, row, done in zip(order, ref.response_ids(), ref.finished.tolist()):
        cut = len(row) == MAX_NEW and row[-1] != tok.eos_id  # from the ids alone
        samples[j] = (tok.decode(row[:-1] if done else row), not done, cut)
    result["expected_samples"] = samples
    teardown_roles()

    tool, eos = _load_tool(), ["--teacher", str(tmp / "ckpt_eos")]
    result["plain"] = _main(tool, _argv(tmp, "out.jsonl"))
    result["rerun"] = _main(tool, _argv(tmp, "out.jsonl"))
    result["mismatch"] = _main(tool, _argv(tmp, "out.jsonl", "--seed", "5", "--temperature", "1.0"))
    result["samples"] = _main(tool, _argv(tmp, "samples.jsonl", *eos, *SAMPLES, "--batch-size", "21"))
    result["samples_b2"] = _main(tool, _argv(tmp, "samples_b2.jsonl", *eos, *SAMPLES))
    result.update(_crash_and_resume(tool, tmp, "resumed.jsonl"))
    result["samples_resumed"] = _crash_and_resume(tool, tmp, "samples_resumed.jsonl", *eos, *SAMPLES)
    result["overwrite"] = _main(tool, _argv(tmp, "resumed.jsonl", "--max-new-tokens", "3", "--overwrite"))
    result["bad"] = _bad_inputs(tool, tmp)
    parser = tool.build_parser()
    result["help"] = (parser.format_help(), [a.option_strings for a in parser._actions if not a.help])
    return result


def _two_processes(rank, world_size, tmp):
    tool, tmp = _load_tool(), Path(tmp)
    return (
        _main(tool, _argv(tmp, "dp2.jsonl")),
        _main(tool, _argv(tmp, "tp2.jsonl", "--tp", "2")),
        _main(tool, _argv(tmp, "dp2_samples.jsonl", "--teacher", str(tmp / "ckpt_eos"), *SAMPLES)),
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generate_responses")
    with open(tmp / "prompts.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p) + "\n" for p in PROMPTS)
    return tmp, run_distributed(_single_process, 1, args=(str(tmp),), timeout=180)[0]


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_one_response_per_prompt_in_order_equal_to_direct_generate(run):
    tmp, result = run
    assert result["plain"][0] == 0, result["plain"]
    rows = _read(tmp / "out.jsonl")
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in PROMPTS]
    assert [r["response"] for r in rows] == result["expected"]
    assert [r["reference"] for r in rows] == [p.get("reference") for p in PROMPTS]
    assert rows[3]["task"] == "arithmetic"
    assert [r["truncated"] for r in rows] == result["expected_truncated"]
    assert [r["sample"] for r in rows] == [0] * len(PROMPTS)
    assert list(rows[3]) == ["prompt", "response", "reference", "truncated", "sample", "task"]
    assert not (tmp / "out.jsonl.partial").exists()
    meta = json.loads((tmp / "out.jsonl.meta.json").read_text())
    assert meta["identity"]["settings"]["max_new_tokens"] == MAX_NEW and meta["num_records"] == len(PROMPTS)
    assert meta["identity"]["version"] == 2 and meta["identity"]["settings"]["num_samples"] == 1
    assert meta["num_samples"] == 1 and meta["num_truncated"] == sum(result["expected_truncated"])
    assert f"{meta['num_truncated']} responses cut at --max-new-tokens" in result["plain"][1]


def test_samples_are_consecutive_records_marked_truncated_when_cut(run):
    tmp, result = run
    rc, out, _ = result["samples"]
    assert rc == 0 and f"wrote {3 * len(PROMPTS)} responses ({len(PROMPTS)} prompts x 3 samples)" in out
    rows = _read(tmp / "samples.jsonl")
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in PROMPTS for _ in range(3)]
    assert [r["sample"] for r in rows] == [0, 1, 2] * len(PROMPTS)
    assert [r["reference"] for r in rows] == [p.get("reference") for p in PROMPTS for _ in range(3)]
    expected = result["expected_samples"]
    assert [r["response"] for r in rows] == [text for text, _, _ in expected]
    truncated = [r["truncated"] for r in rows]
    assert truncated == [not_finished for _, not_finished, _ in expected]
    assert truncated == [cut for _, _, cut in expected]  # reached max_new_tokens, last id not EOS
    assert 0 < sum(truncated) < len(rows), "the boosted EOS must give both stopped and cut responses"
    # 3 copies of a prompt share the one batch: they draw their own uniforms, so they differ
    assert any(len({r["response"] for r in rows[i : i + 3]}) > 1 for i in range(0, len(rows), 3))
    meta = json.loads((tmp / "samples.jsonl.meta.json").read_text())
    assert meta["identity"]["settings"]["num_samples"] == 3
    assert (meta["num_samples"], meta["num_records"], meta["num_truncated"]) == (3, len(rows), sum(truncated))
    assert f"{sum(truncated)} responses cut at --max-new-tokens" in out


def test_rerun_is_a_no_op_and_a_mismatch_needs_overwrite(run):
    tmp, result = run
    rc, out, _ = result["rerun"]
    assert rc == 0 and "up to date" in out
    rc, _, err = result["mismatch"]
    assert rc == 2 and "settings.temperature" in err and "settings.seed" in err and "--overwrite" in err
    assert result["overwrite"][0] == 0
    meta = json.loads((tmp / "resumed.jsonl.meta.json").read_text())
    assert meta["identity"]["settings"]["max_new_tokens"] == 3 and meta["num_records"] == len(PROMPTS)


def test_resume_after_a_crash_gives_the_same_file(run):
    tmp, result = run
    assert result["crash"] == "simulated kill"
    assert result["after_crash"] == ["resumed.jsonl.partial"], "no output may exist after a crash"
    assert result["after_crash_partial"] == ["batch_000000.json", "identity.json"]
    rc, out, _ = result["resume"]
    assert rc == 0 and "3 of 4 batches generated in this run" in out
    assert result["resumed_bytes"] == (tmp / "out.jsonl").read_bytes()


def test_resume_with_samples_gives_the_same_file(run):
    tmp, result = run
    assert result["samples_b2"][0] == 0, result["samples_b2"]
    resumed, batches = result["samples_resumed"], -(-3 * len(PROMPTS) // BATCH)
    assert resumed["crash"] == "simulated kill"
    assert resumed["after_crash"] == ["samples_resumed.jsonl.partial"]
    assert resumed["after_crash_partial"] == ["batch_000000.json", "identity.json"]
    rc, out, _ = resumed["resume"]
    assert rc == 0 and f"{batches - 1} of {batches} batches generated in this run" in out
    assert resumed["resumed_bytes"] == (tmp / "samples_b2.jsonl").read_bytes()


def test_two_processes_data_or_tensor_parallel_write_the_same_file(run):
    tmp, _ = run
    outs = run_distributed(_two_processes, 2, args=(str(tmp),), timeout=180)
    assert all(rc == 0 for rank in outs for rc, _, _ in rank), outs
    assert (tmp / "dp2.jsonl").read_bytes() == (tmp / "out.jsonl").read_bytes()
    assert (tmp / "dp2_samples.jsonl").read_bytes() == (tmp / "samples_b2.jsonl").read_bytes()
    # TP=2 sums partial products in another order; greedy ids on this peaked tiny model still agree
    assert (tmp / "tp2.jsonl").read_bytes() == (tmp / "out.jsonl").read_bytes()


@pytest.mark.parametrize("case", range(len(BAD_CASES)), ids=[c[0] for c in BAD_CASES])
def test_bad_inputs_fail_clearly_and_write_nothing(run, case):
    rc, err, files = run[1]["bad"][case]
    assert rc == 2 and BAD_CASES[case][3] in err, err
    assert files == ["ckpt", "model.yaml", "prompts.jsonl"], "something was written"


def test_help_documents_every_flag(run):
    text, undocumented = run[1]["help"]
    assert not undocumented
    assert "--max-new-tokens" in text and "--overwrite" in text and "--tp" in text and "--num-samples" in text
