"""Import layering: the config package validates without the scheduler, the method registry and
the KD divergence names load without torch, and config/ and schedule/ import each other in one
direction only (every import counted, the ones inside functions included)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "rgkd_megatron"


def _imports(path: Path) -> set[str]:
    """Every rgkd_megatron module a file imports, at any depth (module level or inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in out if m.startswith("rgkd_megatron.")}


def _package_of(module: str) -> str:
    return module.split(".")[1]


def _package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).parts
        if len(rel) < 2:
            continue
        edges = graph.setdefault(rel[0], set())
        edges.update(_package_of(m) for m in _imports(path) if _package_of(m) != rel[0])
    return graph


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return False


def test_config_does_not_import_the_scheduler_at_all():
    offenders = {
        str(p.relative_to(REPO)): sorted(m for m in _imports(p) if m.startswith("rgkd_megatron.schedule"))
        for p in (PACKAGE / "config").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize(
    "package, never",
    [("config", ("schedule", "pbkd")), ("methods", ("config", "schedule", "pbkd", "training", "models"))],
)
def test_no_import_cycle_through_the_orchestration_layers(package, never):
    """schedule imports config and methods; neither reaches back, through any package in between."""
    graph = _package_graph()
    assert {"config", "methods"} <= graph["schedule"] and "methods" in graph["config"]
    for goal in never:
        assert not _reaches(graph, package, goal), f"{package} reaches {goal}"


def test_importing_config_loads_neither_the_scheduler_nor_torch():
    code = (
        "import sys\n"
        "from rgkd_megatron.config import load_config\n"
        "cfg = load_config(None, ['pbkd.method=jsd', 'pbkd.cache_path=/c'])\n"
        "bad = sorted(m for m in sys.modules if m.startswith('rgkd_megatron.schedule') or m == 'torch')\n"
        "assert not bad, bad\n"
        "import rgkd_megatron.methods, rgkd_megatron.losses.divergences\n"
        "assert 'torch' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_the_teacher_model_yaml_is_read_once(tmp_path, monkeypatch):
    import yaml

    from rgkd_megatron.config import load_config
    from rgkd_megatron.config.roles import role_model_configs, validate_placement

    path = tmp_path / "teacher.yaml"
    path.write_text(
        yaml.safe_dump({"model": {"num_layers": 4, "hidden_size": 128, "num_attention_heads": 8}})
    )
    reads = []
    real = yaml.safe_load
    monkeypatch.setattr(yaml, "safe_load", lambda f: reads.append(1) or real(f))
    cfg = load_config(
        None, ["pbkd.method=mm_pbkd", "pbkd.teacher_load=/t", f"pbkd.teacher_model_config={path}"]
    )
    for _ in range(3):
        assert validate_placement(cfg, 1) == []
        assert role_model_configs(cfg)[0]["teacher"].num_layers == 4
    assert len(reads) == 1
    path.write_text(
        yaml.safe_dump({"model": {"num_layers": 12, "hidden_size": 128, "num_attention_heads": 8}})
    )
    assert role_model_configs(cfg)[0]["teacher"].num_layers == 12  # an edited file is read again
