"""Markdown report with a results table and PNG plots of logged metrics.

``write_report(run_dir, title, rows, curves, notes, sections)``:
- ``rows``: list of dicts, one per method (keys become columns; floats shown with 4 digits, and
  ``(mean, std)`` tuples as ``mean ± std``);
- ``curves``: {plot name: {series label: [(x, y), ...]}}, drawn one PNG per plot with matplotlib's
  non-interactive backend and linked from the report;
- ``sections``: (heading, Markdown body) pairs placed after the results table, before the plots.
Written atomically (temp file + rename) so a crash never leaves a half report.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence


def _cell(value: Any) -> str:
    if isinstance(value, tuple) and len(value) == 2:
        return f"{value[0]:.4f} ± {value[1]:.4f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "_no results_\n"
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(path: Path, title: str, series: Mapping[str, Sequence[tuple[float, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, points in series.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=label, marker="." if len(points) < 30 else None)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(
    run_dir: str | os.PathLike,
    title: str,
    rows: Sequence[Mapping[str, Any]],
    curves: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]] | None = None,
    notes: str = "",
    sections: Sequence[tuple[str, str]] | None = None,
) -> Path:
    """Write ``run_dir/report.md`` (+ ``plot_*.png``); returns the report path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}\n", markdown_table(rows)]
    for heading, body in sections or ():
        parts.append(f"\n## {heading}\n\n{body.strip()}\n")
    for name, series in (curves or {}).items():
        png = run_dir / f"plot_{name}.png"
        plot_curves(png, name, series)
        parts.append(f"\n![{name}]({png.name})\n")
    if notes:
        parts.append("\n" + notes.strip() + "\n")
    report = run_dir / "report.md"
    tmp = report.with_name("report.md.tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, report)
    return report
