"""SLURM host-list and task-count parsing (``SLURM_JOB_NODELIST="node[01-03,07],gpu5"``,
``SLURM_TASKS_PER_NODE="2(x3),1"``) and the node-address lookup through ``scontrol``.

Pure string parsing, no process groups; used by ``launch.detect_launch_env`` for srun tasks. Errors
are ValueErrors naming the environment variable.
"""

from __future__ import annotations

import itertools
import re
import subprocess


def _split_top_level(text: str, var: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts: list[str] = []
    depth = 0
    start = 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"{var}={text!r}: nested brackets are not a valid host list")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"{var}={text!r}: unbalanced ']'")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"{var}={text!r}: unbalanced '['")
    parts.append(text[start:])
    for part in parts:
        if not part.strip():
            raise ValueError(f"{var}={text!r}: empty host name")
    return [p.strip() for p in parts]


def _expand_range_list(body: str, text: str, var: str) -> list[str]:
    out: list[str] = []
    for item in body.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if m is None:
            raise ValueError(f"{var}={text!r}: bad range {item!r} in '[{body}]'")
        lo, hi = m.group(1), m.group(2) if m.group(2) is not None else m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"{var}={text!r}: descending range {item!r}")
        width = len(lo)  # slurm keeps the zero padding of the lower bound: node[08-10]
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(nodelist: str, var: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Expand a SLURM host list: "node[01-03,07],gpu5" -> node01 node02 node03 node07 gpu5.

    Several bracket groups in one name expand as a product ("r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2),
    and zero padding follows the lower bound of each range. `var` only names the source in errors.
    """
    if not nodelist or not nodelist.strip():
        raise ValueError(f"environment variable {var} is empty")
    hosts: list[str] = []
    for expr in _split_top_level(nodelist.strip(), var):
        pieces = re.split(r"(\[[^\[\]]*\])", expr)
        choices: list[list[str]] = []
        for piece in pieces:
            if piece.startswith("[") and piece.endswith("]"):
                choices.append(_expand_range_list(piece[1:-1], nodelist, var))
            elif piece:
                choices.append([piece])
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def parse_tasks_per_node(value: str, var: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """Expand SLURM's compressed per-node counts: "2(x3),1" -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for item in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if m is None:
            raise ValueError(f"environment variable {var}={value!r} is malformed at {item!r}")
        count, reps = int(m.group(1)), int(m.group(2) or 1)
        if count < 1 or reps < 1:
            raise ValueError(f"environment variable {var}={value!r} has a zero count at {item!r}")
        counts.extend([count] * reps)
    return counts


def scontrol_node_addr(node: str, timeout_s: float = 10.0) -> str:
    """NodeAddr of `node` from `scontrol show node`; the node name itself when that fails."""
    try:
        proc = subprocess.run(
            ["scontrol", "show", "node", node],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return node
    m = re.search(r"\bNodeAddr=(\S+)", proc.stdout)
    if proc.returncode != 0 or m is None:
        return node
    return m.group(1)
