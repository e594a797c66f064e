"""The Python API: ``rgkd_megatron.load_config`` / ``train`` / ``distill`` at the package top.

``examples/python_api.py`` runs on the tiny recipe (two steps, as a user runs it: a subprocess);
what it reports is checked against what the run wrote (metrics.jsonl, the student checkpoint) and
``logging.export_hf=false`` leaves no Hugging Face export. ``import rgkd_megatron`` imports neither
torch nor megatron-core; the API functions carry docstrings; a config of the wrong type is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _python(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def test_example_script_trains_the_tiny_recipe(tmp_path):
    run = tmp_path / "run"
    out = _python([
        "examples/python_api.py", "train.train_iters=2", f"logging.run_dir={run}", "logging.export_hf=false",
        "model.num_layers=2", "data.seq_length=64",
    ])  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert rows[-1]["step"] == 2  # the recipe logs every 10 steps and at the end
    assert f"trained 2 steps, final lm_loss {rows[-1]['lm_loss']:.4f}" in out.stdout
    assert (run / "student" / "metadata.json").is_file() and (run / "student" / "model_config.yaml").is_file()
    assert not (run / "student_hf").exists()


def test_import_is_light_and_the_api_is_documented():
    code = (
        "import sys, rgkd_megatron as r\n"
        "assert 'torch' not in sys.modules and 'megatron' not in sys.modules, 'heavy import'\n"
        "assert all(getattr(r, n).__doc__ for n in ('train', 'distill', 'load_config'))\n"
        "assert {'train', 'distill', 'load_config'} <= set(dir(r))\n"
    )
    out = _python(["-c", code])
    assert out.returncode == 0, out.stderr[-2000:]


def test_config_of_the_wrong_type_is_refused():
    import rgkd_megatron

    with pytest.raises(TypeError, match="expected an RGKDConfig or a YAML path, got dict"):
        rgkd_megatron.train({"train": {"lr": 1.0}})
