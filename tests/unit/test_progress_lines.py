"""Progress lines for log files: cadence, fields, and the ETA against the hand-computed formula."""

import logging

import pytest

from rgkd_megatron.utils import progress


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = _Clock()
    monkeypatch.setattr(progress.time, "perf_counter", fake)
    return fake


@pytest.fixture
def captured():
    logger = logging.getLogger("test.progress.lines")
    logger.propagate = False
    records: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = _Keep()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield logger, records
    logger.removeHandler(handler)


def test_one_line_per_interval_and_at_the_end(clock, captured):
    logger, lines = captured
    bar = progress.ProgressBar(
        10, desc="train", enabled=False, unit="step", rank=0, log_interval=4, logger=logger
    )
    for step in range(10):
        clock.now += 2.0
        bar.update(1, tokens=500, loss=3.0 - 0.1 * step)
    assert len(lines) == 3  # steps 4, 8 and the last, 10
    # after 4 steps of 2 s: 8 s elapsed, 6 steps left at 2 s/step -> 12 s; 2000 tokens / 8 s
    assert lines[0] == "train step 4/10 (40.0%) | loss 2.7 | 250.0 tok/s | elapsed 0:00:08 | eta 0:00:12"
    assert lines[2].startswith("train step 10/10 (100.0%) | loss 2.1 |")
    assert lines[2].endswith("elapsed 0:00:20 | eta 0:00:00")


def test_resumed_steps_count_but_are_not_timed(clock, captured):
    logger, lines = captured
    bar = progress.ProgressBar(
        1000, desc="pbkd", enabled=False, unit="iter", rank=0, log_interval=100, logger=logger
    )
    bar.skip(600)
    assert lines == []  # restoring progress is not progress
    for _ in range(100):
        clock.now += 36.0
    bar.update(100)
    # 100 timed iterations in 3600 s; 300 left -> 10800 s = 3 h
    assert lines == ["pbkd iter 700/1000 (70.0%) | elapsed 1:00:00 | eta 3:00:00"]
    bar.note(rm_loss=0.25)
    assert bar.progress_line().startswith("pbkd iter 700/1000 (70.0%) | rm_loss 0.25 |")


def test_only_rank_zero_logs_and_zero_interval_is_silent(clock, captured):
    logger, lines = captured
    for rank, interval in ((1, 1), (0, 0)):
        bar = progress.ProgressBar(3, rank=rank, enabled=False, log_interval=interval, logger=logger)
        for _ in range(3):
            bar.update(1)
    assert lines == []


def test_unknown_total_has_no_eta(clock, captured):
    logger, lines = captured
    bar = progress.ProgressBar(
        None, desc="gen", enabled=False, unit="batch", rank=0, log_interval=1, logger=logger
    )
    clock.now += 5.0
    bar.update(1)
    assert lines == ["gen batch 1 | elapsed 0:00:05"]
