"""The configuration reference is generated from the code; it must be up to date."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_current():
    spec = importlib.util.spec_from_file_location("gen_config_doc", REPO / "tools" / "gen_config_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0, "docs/configuration.md is stale: run python tools/gen_config_doc.py"
    text = (REPO / "docs" / "configuration.md").read_text()
    assert "`pbkd.bt_lambda`" in text and "`placement.teacher.tp`" in text and "`train.lr`" in text
