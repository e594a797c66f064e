"""Bad inputs against the commands, as a user (or an attacker) gives them: every case must end in
one message naming the file or field and what was expected, a non-zero exit, no traceback and
nothing half-written. Each case fails at validation time (seconds). The teacher cache and
checkpoint cases live in test_bad_inputs_cache.py and test_bad_inputs_checkpoint.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_SFT = REPO / "examples" / "data" / "tiny_sft.jsonl"
TOKENIZER = REPO / "examples" / "tokenizer"
TINY = [
    "model.num_layers=1",
    "model.hidden_size=32",
    "model.ffn_hidden_size=64",
    "logging.progress_bar=false",
]


def _run(*cmd: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    return subprocess.run(
        [sys.executable, *cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _command(name: str) -> list[str]:
    """A command as a user runs it: ``rgkd-*`` as a module, tools/ as a script."""
    return ["-m", f"rgkd_megatron.cli.{name}"] if "/" not in name else [str(REPO / name)]


def _refused(out: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """The stderr of a clean refusal that mentions every needle."""
    assert out.returncode == code, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr[-3000:])
    return out.stderr


def _sft_file(path: Path, lineno: int | None = None, line: bytes = b"") -> Path:
    """The first 6 records of the shipped SFT set at ``path``, line ``lineno`` replaced by ``line``."""
    lines = TINY_SFT.read_bytes().splitlines(keepends=True)[:6]
    if lineno is not None:
        lines[lineno - 1] = line
    path.write_bytes(b"".join(lines))
    return path


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------ judges
def test_judge_named_by_module_function_is_refused_before_anything_runs(tmp_path):
    """The issue's repro: shutil:copyfile from a config string must never be imported or called."""
    prompts, victim = _sft_file(tmp_path / "P.jsonl"), tmp_path / "copied.jsonl"
    out = _run(
        *_command("distill"), "--config", "examples/tiny_pbkd.yaml", *TINY, f"logging.run_dir={tmp_path}/run",
        "pbkd.judge=entry_point", "pbkd.judge_entry_point=shutil:copyfile", f"pbkd.prompts_path={prompts}",
        f"pbkd.teacher_samples_path={victim}",
    )  # fmt: skip
    err = _refused(
        out, "pbkd.judge_entry_point", "'shutil:copyfile'", "rgkd_megatron.judges", "entry_points="
    )
    assert "pyproject.toml" in err
    assert _files(tmp_path) == ["P.jsonl"]  # no run directory, nothing copied


def test_unregistered_judge_name_is_refused_listing_how_to_register(tmp_path):
    out = _run(
        *_command("distill"), "--config", "examples/tiny_pbkd.yaml", f"logging.run_dir={tmp_path}/run",
        "pbkd.judge=entry_point", "pbkd.judge_entry_point=no_such_judge",
    )  # fmt: skip
    _refused(out, "pbkd.judge_entry_point", "no judge 'no_such_judge' is registered", "rgkd_megatron.judges")
    assert not (tmp_path / "run").exists()


# -------------------------------------------------------------------------------------- data
def test_train_refuses_a_dataset_where_no_sample_fits_seq_length(tmp_path):
    """All prompts longer than data.seq_length used to train with lm_loss 0.0 at every step."""
    run = tmp_path / "run"
    out = _run(
        *_command("train"), "--config", "examples/tiny_sft.yaml", *TINY, "data.seq_length=8",
        f"logging.run_dir={run}", "train.train_iters=2",
    )  # fmt: skip
    _refused(out, "data.seq_length", str(TINY_SFT.relative_to(REPO)), "data.seq_length is 8", "prompts are")
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "command, recipe, field, lineno, line, message",
    [
        ("train", "tiny_sft", "data.train_path", 3, b'{"prompt": "caf\xff?", "response": "x"}\n',
         ":3: not valid UTF-8 (byte 0xff at column 16); expected UTF-8 text"),
        ("distill", "tiny_pbkd", "pbkd.prompts_path", 4, b'{"prompt": "no response field"}\n',
         ":4: field 'response' must be a string"),
    ],
)  # fmt: skip
def test_a_bad_data_line_is_named_with_its_file_and_line(
    tmp_path, command, recipe, field, lineno, line, message
):
    data = _sft_file(tmp_path / "bad.jsonl", lineno, line)
    run = tmp_path / "run"
    out = _run(
        *_command(command),
        "--config",
        f"examples/{recipe}.yaml",
        *TINY,
        f"{field}={data}",
        f"logging.run_dir={run}",
    )
    _refused(out, f"{data}{message}")
    assert _files(run) == ["config.yaml"]  # no tokenized copy, no temp file, no metrics or checkpoint


def test_preprocess_names_file_and_line_of_invalid_json(tmp_path):
    data = _sft_file(tmp_path / "bad.jsonl", 5, b'{"prompt": "unterminated\n')
    out = _run(
        *_command("tools/preprocess_data.py"), "--input", str(data), "--tokenizer", str(TOKENIZER),
        "--output", str(tmp_path / "ds"),
    )  # fmt: skip
    _refused(out, f"{data}:5: invalid JSON", code=1)
    assert _files(tmp_path) == ["bad.jsonl"]


def test_train_tokenizer_names_file_and_line_of_a_non_utf8_byte(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xc3(", "response": "c"}\n')
    out = _run(*_command("tools/train_tokenizer.py"), "--input", str(data), "--output", str(tmp_path / "tok"))
    _refused(out, f"{data}:2: not valid UTF-8")
    assert not (tmp_path / "tok").exists()


def test_generate_responses_names_file_and_line_of_a_non_utf8_byte(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    output = tmp_path / "out.jsonl"
    out = _run(
        *_command("tools/generate_responses.py"), "--prompts", str(prompts), "--output", str(output),
        "--tokenizer", str(TOKENIZER), "--teacher", str(tmp_path / "no_teacher"),
    )  # fmt: skip
    _refused(out, f"{prompts}:2: not valid UTF-8 (byte 0xe9")
    assert _files(tmp_path) == ["prompts.jsonl"]


# --------------------------------------------------------------------------- reports, planning
def _summary_run(root: Path, text: str) -> Path:
    run = root / "run_a"
    run.mkdir()
    (run / "summary.json").write_text(text)
    return run


def test_eval_names_a_corrupt_summary(tmp_path):
    run = _summary_run(tmp_path, '{"method": "pbkd", "final": {"eval_rougeL_vs_teacher": 0.')
    out = _run(*_command("evaluate"), "--runs", str(run), "--output", str(tmp_path / "report"))
    _refused(out, f"{run / 'summary.json'}:1: invalid JSON")
    assert not (tmp_path / "report").exists()


def test_eval_names_a_summary_that_is_not_a_run_summary(tmp_path):
    run = _summary_run(tmp_path, json.dumps([1, 2, 3]))
    out = _run(*_command("evaluate"), "--runs", str(run), "--output", str(tmp_path / "report"))
    _refused(out, f"{run / 'summary.json'}: expected a run summary")
    assert not (tmp_path / "report").exists()


def test_eval_names_a_missing_summary(tmp_path):
    out = _run(
        *_command("evaluate"), "--runs", str(tmp_path / "nowhere"), "--output", str(tmp_path / "report")
    )
    _refused(out, str(tmp_path / "nowhere" / "summary.json"), "missing")
    assert not (tmp_path / "report").exists()


def test_plan_names_a_corrupt_measured_file(tmp_path):
    measured = tmp_path / "measured.json"
    measured.write_text('{"policy/train": 1.0,')
    out = _run(*_command("plan"), "--preset", _first_preset(), "--measured", str(measured))
    _refused(out, f"{measured}:1: invalid JSON")


def _first_preset() -> str:
    listing = _run(*_command("plan"), "--list-presets")
    assert listing.returncode == 0, listing.stderr
    return listing.stdout.split()[0]


# ------------------------------------------------------------------ config (already clean: stays so)
def test_missing_recipe_file_is_named(tmp_path):
    out = _run(*_command("train"), "--config", str(tmp_path / "absent.yaml"))
    _refused(out, str(tmp_path / "absent.yaml"))


def test_invalid_yaml_recipe_is_named(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  lr: [1e-3\n")
    out = _run(*_command("distill"), "--config", str(recipe))
    _refused(out, f"{recipe}: not valid YAML")
    recipe.write_bytes(b"train:\n  lr: 1.0e-3  # caf\xe9\n")
    _refused(_run(*_command("train"), "--config", str(recipe)), f"{recipe}: not valid UTF-8 (byte 0xe9")


def test_unknown_field_names_the_field_and_debug_shows_the_traceback(tmp_path):
    args = ["--config", "examples/tiny_sft.yaml", "train.lrr=1", f"logging.run_dir={tmp_path}/run"]
    _refused(_run(*_command("train"), *args), "train.lrr")
    debug = _run(*_command("train"), *args, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "train.lrr" in debug.stderr
    assert not (tmp_path / "run").exists()


def test_non_positive_kd_topk_is_refused(tmp_path):
    out = _run(
        *_command("distill"),
        "--config",
        "examples/tiny_pbkd.yaml",
        "pbkd.kd_topk=0",
        f"logging.run_dir={tmp_path}/r",
    )
    _refused(out, "pbkd.kd_topk: expected null or a value > 0, got 0")
    assert not (tmp_path / "r").exists()
