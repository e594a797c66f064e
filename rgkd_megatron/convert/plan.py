"""What a conversion will do, before it does it: the tensor mapping table and the size per rank.

``conversion_plan`` returns plain data (also used by the tests, which compare the per-rank numbers
with the parameters of a real TP/PP model); ``format_plan`` renders it for ``--dry-run``.

Per-rank accounting (megatron-core GPTModel, our builders): pipeline stage s holds layers
[s*L/pp, (s+1)*L/pp); TP-split tensors (qkv, proj, fc1, fc2, embedding, output layer) hold 1/tp
of their rows/columns on each TP rank, the norms are replicated. Stage 0 holds the (padded)
embedding; the last stage the final norm and the output layer; with tied embeddings and PP > 1
the last stage keeps its own copy of the embedding as output layer (kept equal by megatron's
embedding group), with PP = 1 there is none.
"""

from __future__ import annotations

from typing import Any

import torch

from rgkd_megatron.convert.common import format_bytes
from rgkd_megatron.convert.hf_mapping import LlamaFamily, Rule, mcore_shape

__all__ = ["conversion_plan", "format_plan"]

_KIND_NOTES = {
    "copy": "",
    "vocab": "rows {v} -> {p} (zero padding)",
    "qkv": "per query group: [{per} q heads; k; v]",
    "fc1": "[gate; up]",
}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _hf_pattern(rule: Rule, num_layers: int) -> str:
    if not rule.per_layer:
        return ", ".join(rule.hf)
    names = [t.replace("{i}", f"{{0..{num_layers - 1}}}") for t in rule.hf]
    if len(names) == 1:
        return names[0]
    # collapse q/k/v or gate/up into one brace pattern when only one component differs
    parts = [n.split(".") for n in names]
    if all(len(p) == len(parts[0]) for p in parts):
        diff = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
        if len(diff) == 1:
            i = diff[0]
            merged = list(parts[0])
            merged[i] = "{" + ",".join(p[i] for p in parts) + "}"
            return ".".join(merged)
    return ", ".join(names)


def conversion_plan(
    arch: LlamaFamily, rules: list[Rule], padded: int, dtype: torch.dtype, tp: int, pp: int
) -> dict[str, Any]:
    """Tensor table + per-rank parameter counts/bytes for layout (tp, pp)."""
    itemsize = dtype.itemsize
    tensors = []
    for rule in rules:
        shape = mcore_shape(rule, arch, padded)
        global_shape = (arch.num_layers, *shape) if rule.per_layer else shape
        note = _KIND_NOTES[rule.kind].format(
            v=arch.vocab_size, p=padded, per=arch.num_heads // arch.num_kv_heads
        )
        tensors.append(
            {
                "megatron": rule.key,
                "shape": list(global_shape),
                "bytes": _numel(global_shape) * itemsize,
                "hf": _hf_pattern(rule, arch.num_layers),
                "note": note,
                "tp_axis": rule.tp_axis,
            }
        )
    per_stage = arch.num_layers // pp
    by_key = {r.key: r for r in rules}
    layer_numel = sum(
        _numel(mcore_shape(r, arch, padded)) // (tp if r.tp_axis is not None else 1)
        for r in rules
        if r.per_layer
    )
    embed_numel = _numel(mcore_shape(by_key["embedding.word_embeddings.weight"], arch, padded)) // tp
    ranks = []
    for stage in range(pp):
        numel = per_stage * layer_numel
        holds = [f"layers {stage * per_stage}-{(stage + 1) * per_stage - 1}"]
        if stage == 0:
            numel += embed_numel
            holds.insert(0, "embedding")
        if stage == pp - 1:
            numel += arch.hidden_size
            holds.append("final norm")
            if not arch.tie_word_embeddings or pp > 1:
                numel += embed_numel
                holds.append("output layer" + (" (tied copy)" if arch.tie_word_embeddings else ""))
        ranks.append({"pp_rank": stage, "params": numel, "bytes": numel * itemsize, "holds": holds})
    return {
        "architecture": arch.summary(),
        "tp": tp,
        "pp": pp,
        "dtype": str(dtype).removeprefix("torch."),
        "vocab_size": arch.vocab_size,
        "padded_vocab_size": padded,
        "tensors": tensors,
        "ranks": ranks,
        "total_bytes": sum(t["bytes"] for t in tensors),
    }


def format_plan(plan: dict[str, Any], header: str) -> str:
    lines = [header, f"  {plan['architecture']}"]
    lines.append(
        f"  vocab {plan['vocab_size']} -> padded {plan['padded_vocab_size']} (tp={plan['tp']}), dtype {plan['dtype']}"
    )
    lines.append("")
    w = max(len(t["megatron"]) for t in plan["tensors"])
    lines.append(
        f"  {'megatron-core tensor':<{w}}  {'global shape':<20} {'size':>10}  hugging face tensor(s)"
    )
    for t in plan["tensors"]:
        shape = "[" + ", ".join(map(str, t["shape"])) + "]"
        note = f"  ({t['note']})" if t["note"] else ""
        lines.append(f"  {t['megatron']:<{w}}  {shape:<20} {format_bytes(t['bytes']):>10}  {t['hf']}{note}")
    lines.append(f"  total {format_bytes(plan['total_bytes'])}")
    lines.append("")
    lines.append(
        f"  size per rank at tp={plan['tp']} pp={plan['pp']} (every TP rank of a stage holds the same):"
    )
    for r in plan["ranks"]:
        lines.append(
            f"    pp_rank {r['pp_rank']}: {r['params']:,} params, {format_bytes(r['bytes'])} "
            f"per TP rank ({', '.join(r['holds'])})"
        )
    return "\n".join(lines)
