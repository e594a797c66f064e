"""User-style judges for the entry-point judge tests, and a way to register them as an installed
package would (a dist-info directory with an ``entry_points.txt`` on sys.path)."""

from __future__ import annotations

from pathlib import Path


def longer_is_better(prompt: str, response: str) -> float:
    return float(len(response))


def needs_three_args(prompt: str, response: str, extra: str) -> float:
    return 0.0


def returns_text(prompt: str, response: str) -> str:
    return "good"


def write_judge_dist(root: Path, judges: dict[str, str], dist_name: str = "user_judges") -> Path:
    """Write ``root/<dist>-0.1.dist-info`` registering ``judges`` (name -> "module:attr") in the
    ``rgkd_megatron.judges`` group; put ``root`` on sys.path (or PYTHONPATH) to install it."""
    info = Path(root) / f"{dist_name}-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.1\n")
    lines = ["[rgkd_megatron.judges]", *(f"{name} = {target}" for name, target in judges.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return info
