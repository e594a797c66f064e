"""Rank-aware logging, metrics sinks (JSONL, TensorBoard, offline wandb) and the progress bar."""

from __future__ import annotations

import io
import json
import logging

import pytest
import torch

from rgkd_megatron.utils import (
    MetricsLogger,
    ProgressBar,
    get_logger,
    infer_rank,
    read_metrics,
    scrub_secrets,
    setup_logging,
)
from rgkd_megatron.utils.metrics import truncate_metrics


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger("rgkd_megatron")
    saved = (list(root.handlers), root.level, root.propagate)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    root.propagate = saved[2]


# --------------------------------------------------------------------------- logger


def test_logger_drops_info_on_nonzero_rank():
    stream = io.StringIO()
    setup_logging("INFO", rank=1, stream=stream)
    log = get_logger("tests.logging")
    assert log.name == "rgkd_megatron.tests.logging"
    log.info("quiet info")
    log.warning("loud warning")
    out = stream.getvalue()
    assert "quiet info" not in out
    assert "loud warning" in out and "[rank 1]" in out


def test_logger_rank0_and_all_ranks():
    stream = io.StringIO()
    setup_logging("DEBUG", rank=0, stream=stream)
    get_logger("rgkd_megatron.x").debug("hello %d", 7)
    assert "[rank 0] DEBUG rgkd_megatron.x: hello 7" in stream.getvalue()

    stream = io.StringIO()
    setup_logging("INFO", rank=3, all_ranks=True, stream=stream)
    get_logger("y").info("from three")
    assert "[rank 3] INFO rgkd_megatron.y: from three" in stream.getvalue()
    ours = [h for h in logging.getLogger("rgkd_megatron").handlers if type(h).__name__ == "_RankHandler"]
    # re-configuring replaces, never stacks, our handler (others, e.g. pytest's, may exist)
    assert len(ours) == 1


def test_logger_infers_rank_lazily(monkeypatch):
    stream = io.StringIO()
    setup_logging("INFO", stream=stream)
    monkeypatch.setenv("RANK", "2")
    assert infer_rank() == 2
    get_logger("lazy").info("dropped")
    monkeypatch.setenv("RANK", "0")
    get_logger("lazy").info("kept")
    out = stream.getvalue()
    assert "dropped" not in out and "[rank 0]" in out and "kept" in out


def test_setup_logging_rejects_bad_level():
    with pytest.raises(ValueError, match="LOUD"):
        setup_logging("LOUD")


# --------------------------------------------------------------------------- metrics


def test_jsonl_written_and_read_back(tmp_path):
    with MetricsLogger(tmp_path / "run") as m:
        m.log(1, {"loss": 2.5, "lr": torch.tensor(3e-4)}, prefix="train")
        m.log(2, {"loss": 2.0, "ok": True})
        # flushed per line: readable while the logger is still open
        assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 2
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["train/loss"] == 2.5
    assert rows[0]["train/lr"] == pytest.approx(3e-4)
    assert rows[1]["loss"] == 2.0 and rows[1]["ok"] == 1
    assert all("time" in r for r in rows)


def test_jsonl_appends_on_resume_and_skips_truncated_tail(tmp_path):
    with MetricsLogger(tmp_path) as m:
        m.log(1, {"a": 1.0})
    with MetricsLogger(tmp_path) as m:
        m.log(2, {"a": 2.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "a"')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_metrics(tmp_path / "bad.jsonl")


def test_nonzero_rank_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, rank=1, tensorboard=True, wandb=True) as m:
        m.log(1, {"loss": 1.0})
    assert not run_dir.exists()


def test_non_numeric_metric_is_rejected(tmp_path):
    with MetricsLogger(tmp_path) as m, pytest.raises(ValueError, match="'name'"):
        m.log(1, {"name": "abc"})


def test_secret_scrubbing(tmp_path):
    config = {
        "api_key": "k-123",
        "hf_token": "hf_abc",
        "wandbSecret": "s",
        "db": {"password": "pw-hunter2", "host": "db1", "nested": [{"access_token": "tok-xyz"}]},
        "tokenizer": "spm.model",
        "num_tokens": 10,
        "lr": 1e-4,
    }
    clean = scrub_secrets(config)
    assert clean["api_key"] == clean["hf_token"] == clean["wandbSecret"] == "***"
    assert clean["db"]["password"] == "***" and clean["db"]["nested"][0]["access_token"] == "***"
    assert clean["db"]["host"] == "db1" and clean["tokenizer"] == "spm.model" and clean["num_tokens"] == 10
    assert config["api_key"] == "k-123"  # the caller's dict is untouched

    with MetricsLogger(tmp_path, tensorboard=True, config=config) as m:
        m.log(1, {"loss": 1.0})
        assert m.config["api_key"] == "***"
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert b"spm.model" in written  # the config reached TensorBoard, scrubbed
    for secret in (b"k-123", b"hf_abc", b"pw-hunter2", b"tok-xyz"):
        assert secret not in written


def test_tensorboard_event_file(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLogger(tmp_path, tensorboard=True) as m:
        m.log(1, {"loss": 1.5}, prefix="train")
        m.log(2, {"loss": float("nan")}, prefix="train")  # non-finite: JSONL only
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.5)]


def test_wandb_offline_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_API_KEY", "must-never-be-read")
    config = {"api_key": "super-secret-value", "lr": 0.1}
    with MetricsLogger(tmp_path, wandb=True, config=config) as m:
        m.log(1, {"loss": 3.0}, prefix="train")
        m.log(2, {"loss": 2.0}, prefix="train")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))
    written = b"".join(p.read_bytes() for p in runs[0].rglob("*") if p.is_file())
    assert b"api_key" in written  # the config reached wandb ...
    assert b"super-secret-value" not in written  # ... scrubbed
    assert b"must-never-be-read" not in written
    assert [r["train/loss"] for r in read_metrics(tmp_path)] == [3.0, 2.0]


def test_missing_backend_is_a_clear_error(tmp_path, monkeypatch):
    import rgkd_megatron.utils.metrics as metrics

    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="wandb"):
        MetricsLogger(tmp_path, wandb=True)
    with pytest.raises(RuntimeError, match="tensorboard"):
        MetricsLogger(tmp_path, tensorboard=True)


# --------------------------------------------------------------------------- progress


def test_progress_bar_counts_tokens_and_hides_on_nonzero_rank(capsys):
    with ProgressBar(total=4, desc="train", unit="step", rank=0) as bar:
        for _ in range(4):
            bar.update(1, tokens=100, loss=0.5)
    assert bar.n == 4 and bar.tokens == 400 and bar.tokens_per_s > 0
    err = capsys.readouterr().err
    assert "train" in err and "tok/s" in err and "4/4" in err

    with ProgressBar(total=2, desc="quiet", rank=1) as bar:
        bar.update(2, tokens=10)
    with ProgressBar(total=2, desc="off", enabled=False, rank=0) as bar:
        bar.update(2)
    assert bar.n == 2
    err = capsys.readouterr().err
    assert "quiet" not in err and "off" not in err


def test_metrics_jsonl_is_one_object_per_line(tmp_path):
    with MetricsLogger(tmp_path) as m:
        for step in range(3):
            m.log(step, {"x": step * 0.5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(isinstance(json.loads(line), dict) for line in lines)


def test_truncate_metrics_keeps_the_resumed_steps_and_drops_a_torn_line(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "time": 1.5, "loss": 10.0 - s} for s in (0, 1, 2, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')  # killed mid-write
    logging.getLogger("rgkd_megatron.utils").addHandler(caplog.handler)
    try:
        truncate_metrics(path, 2)
    finally:
        logging.getLogger("rgkd_megatron.utils").removeHandler(caplog.handler)
    assert path.read_text().splitlines() == [json.dumps(r) for r in rows[:3]]
    assert f"{path}:6: dropping a torn last line" in caplog.text
    assert "dropping 2 rows logged after step 2" in caplog.text
    truncate_metrics(path, None)  # a start from scratch: nothing of the earlier attempt is kept
    assert path.read_text() == ""
    truncate_metrics(tmp_path / "absent.jsonl", 3)  # no file yet: nothing to do
    assert not (tmp_path / "absent.jsonl").exists()


def test_read_metrics_names_file_and_line_of_a_bad_row(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2, "x": "\xff"}\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: not valid UTF-8"):
        read_metrics(path)
    path.write_text('{"step": 1}\n{"step": 2,\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: invalid JSON"):
        read_metrics(path)
