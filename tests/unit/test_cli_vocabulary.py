"""One vocabulary for every command (docs/cli.md): renamed flags keep their old spelling for one
release with a deprecation warning naming the new one; every command has ``--version``; ``--help``
and ``--version`` print nothing on stderr (no megatron-core import warnings); the teacher tools
share one launch helper and parse their flags without importing torch or megatron-core."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rgkd_megatron import __version__
from rgkd_megatron.utils.cli_flags import add_common_flags, deprecated_alias, deprecation_message

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "examples" / "tokenizer"

TOOLS = sorted(p.name for p in (REPO / "tools").glob("*.py") if p.name != "prompt_tables.py")
MODULES = ["train", "distill", "evaluate", "plan"]
COMMANDS = [[f"tools/{name}"] for name in TOOLS] + [["-m", f"rgkd_megatron.cli.{m}"] for m in MODULES]

# (module of rgkd_megatron.cli, argv with the old spelling, old, new, attribute, value)
ALIASES = [
    ("build_teacher_cache", ["--data-prefix", "d", "--output", "o", "--teacher-checkpoint", "T"],
     "--teacher-checkpoint", "--teacher", "teacher", "T"),
    ("build_teacher_cache", ["--data-prefix", "d", "--output", "o", "--teacher", "T", "--teacher-config", "m.yaml"],
     "--teacher-config", "--model-config", "model_config", "m.yaml"),
    ("build_teacher_cache", ["--data-prefix", "d", "--output", "o", "--teacher", "T", "--k", "16"],
     "--k", "--kd-top-k", "kd_top_k", 16),
    ("build_teacher_cache", ["--data-prefix", "d", "--output", "o", "--teacher", "T", "--temperature", "2"],
     "--temperature", "--kd-temperature", "kd_temperature", 2.0),
    ("generate_responses", ["--prompts", "p", "--output", "o", "--tokenizer", "t", "--load", "T"],
     "--load", "--teacher", "teacher", "T"),
    ("convert_checkpoint", ["--to", "hf", "--src", "S", "--output", "D"], "--src", "--input", "input", "S"),
    ("convert_checkpoint", ["--to", "hf", "--input", "S", "--dst", "D"], "--dst", "--output", "output", "D"),
    ("import_gguf", ["--src", "f.gguf", "--output", "D"], "--src", "--input", "input", "f.gguf"),
    ("import_gguf", ["--input", "f.gguf", "--dst", "D"], "--dst", "--output", "output", "D"),
    ("prune_teacher", ["--src", "S", "--output", "D", "--num-layers", "2"], "--src", "--teacher", "teacher", "S"),
    ("prune_teacher", ["--teacher", "S", "--dst", "D", "--num-layers", "2"], "--dst", "--output", "output", "D"),
    ("preprocess_data", ["--input", "x", "--tokenizer", "t", "--output-prefix", "P"],
     "--output-prefix", "--output", "output", "P"),
    ("train_tokenizer", ["--input", "x", "--output-dir", "D"], "--output-dir", "--output", "output", "D"),
    ("evaluate", ["--runs", "r", "--out", "D"], "--out", "--output", "output", "D"),
]  # fmt: skip


@pytest.mark.parametrize(
    "module, argv, old, new, attr, value", ALIASES, ids=[f"{a[0]}{a[2]}" for a in ALIASES]
)
def test_old_spelling_sets_the_new_flag_and_warns(module, argv, old, new, attr, value, capsys):
    parser = importlib.import_module(f"rgkd_megatron.cli.{module}").build_parser()
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated, use {new}"):
        args = parser.parse_args(argv)
    assert getattr(args, attr) == value
    assert f"warning: {deprecation_message(old, new)}" in capsys.readouterr().err
    assert f"[{old} " not in parser.format_usage() and f" {old} " not in parser.format_usage()  # hidden there
    assert f"formerly {old}" in " ".join(parser.format_help().split()).replace("- ", "-")


def test_new_spelling_does_not_warn(capsys):
    import warnings

    from rgkd_megatron.cli.build_teacher_cache import build_parser

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        args = build_parser().parse_args(
            ["--data-prefix", "d", "--output", "o", "--teacher", "T", "--kd-top-k", "8"]
        )
    assert args.teacher == "T" and args.kd_top_k == 8 and capsys.readouterr().err == ""


def test_old_spelling_still_runs_the_command(tmp_path, capsys):
    """preprocess_data --output-prefix writes the same dataset as --output, with the warning."""
    from rgkd_megatron.cli.preprocess_data import main

    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"prompt": "Hi?", "response": "Hello."}) + "\n")
    with pytest.warns(DeprecationWarning):
        assert (
            main(
                [
                    "--input",
                    str(data),
                    "--tokenizer",
                    str(TOKENIZER),
                    "--output-prefix",
                    str(tmp_path / "old"),
                ]
            )
            == 0
        )
    assert "--output-prefix is deprecated, use --output" in capsys.readouterr().err
    assert main(["--input", str(data), "--tokenizer", str(TOKENIZER), "--output", str(tmp_path / "new")]) == 0
    for ext in (".bin", ".idx", ".prompt_lengths.npy"):
        assert (tmp_path / f"old{ext}").read_bytes() == (tmp_path / f"new{ext}").read_bytes()


def test_alias_keeps_required_and_exclusive_groups(capsys):
    parser = argparse.ArgumentParser(prog="x")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--teacher", help="weights")
    group.add_argument("--seed", type=int, help="random")
    deprecated_alias(parser, "--load", "--teacher")
    with pytest.warns(DeprecationWarning):
        assert parser.parse_args(["--load=W"]).teacher == "W"  # --flag=value form too
    with pytest.raises(SystemExit), pytest.warns(DeprecationWarning):
        parser.parse_args(["--load", "W", "--seed", "1"])
    assert "argument --seed: not allowed with argument --teacher" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args([])
    assert "one of the arguments --teacher --seed is required" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--nope is not a flag"):
        deprecated_alias(parser, "--old", "--nope")
    with pytest.raises(ValueError, match="--seed is already a flag"):
        deprecated_alias(parser, "--seed", "--teacher")


def test_version_text(capsys):
    parser = add_common_flags(argparse.ArgumentParser(prog="x"))
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--version"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and out.startswith(f"rgkd_megatron {__version__} (megatron-core ")


@pytest.mark.parametrize("command", COMMANDS, ids=[c[-1] for c in COMMANDS])
def test_help_and_version_are_clean(command):
    for flag, expected in (("--help", "usage:"), ("--version", f"rgkd_megatron {__version__}")):
        proc = subprocess.run(
            [sys.executable, *command, flag], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, (command, flag, proc.stderr)
        assert proc.stderr == "", (command, flag, proc.stderr)  # e.g. megatron-core's import warnings
        assert expected in proc.stdout and "Warning:" not in proc.stdout, (command, flag, proc.stdout)


def test_teacher_tools_parse_without_torch_and_share_the_launch_flags():
    code = (
        "import sys\n"
        "from rgkd_megatron.cli import build_teacher_cache, generate_responses\n"
        "from rgkd_megatron.cli.teacher_launch import add_launch_flags\n"
        "flags = []\n"
        "for tool in (build_teacher_cache, generate_responses):\n"
        "    p = tool.build_parser()\n"
        "    flags.append(sorted(s for a in p._actions for s in a.option_strings))\n"
        "print(sorted(set(flags[0]) & set(flags[1])))\n"
        "print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    shared, heavy = (eval(line) for line in proc.stdout.splitlines())  # noqa: S307 - our own output
    for flag in ("--teacher", "--model-config", "--tp", "--pp", "--backend", "--timeout-minutes",
                 "--log-level", "--no-progress", "--dry-run", "--json", "--version", "--debug"):  # fmt: skip
        assert flag in shared, flag
    assert heavy == []


@pytest.mark.parametrize("module, recipe", [("train", "tiny_sft.yaml"), ("distill", "tiny_pbkd.yaml")])
def test_recipe_commands_dry_run_json_with_overrides(module, recipe, tmp_path, capsys):
    main = importlib.import_module(f"rgkd_megatron.cli.{module}").main
    run_dir = tmp_path / "run"
    argv = ["--config", str(REPO / "examples" / recipe), f"logging.run_dir={run_dir}", "--dry-run", "--json"]
    assert main(argv) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["logging"]["run_dir"] == str(run_dir) and not run_dir.exists()
    assert main([*argv, "train.lr=oops"]) == 2
    assert "train.lr" in capsys.readouterr().err


def test_train_tokenizer_dry_run_writes_nothing(tmp_path, capsys):
    from rgkd_megatron.cli.train_tokenizer import main

    out = tmp_path / "tok"
    data = REPO / "examples" / "data" / "tiny_sft.jsonl"
    assert main(["--input", str(data), "--output", str(out), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["dry_run"] and plan["texts"] > 0 and not out.exists()
