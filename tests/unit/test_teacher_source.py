"""The cached teacher refuses a pbkd.kd_topk that differs from the cache's k instead of using the
cache's k silently."""

from __future__ import annotations

from pathlib import Path

import pytest
from cache_synthetic import write_synthetic_cache

from rgkd_megatron.pbkd.teacher_source import CachedTeacher

REPO = Path(__file__).resolve().parents[2]


def test_kd_topk_other_than_the_cache_k_is_refused_naming_both(tmp_path):
    write_synthetic_cache(tmp_path / "cache", k=4)
    with pytest.raises(ValueError) as info:
        CachedTeacher(str(tmp_path / "cache"), "unused.jsonl", None, 300, 2.0, tmp_path / "work", kd_topk=8)
    message = str(info.value)
    assert (
        message.startswith("pbkd.kd_topk: 8")
        and "holds k=4" in message
        and str(tmp_path / "cache") in message
    )
    assert not (tmp_path / "work").exists()  # refused before anything is tokenized
