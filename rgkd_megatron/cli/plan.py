"""rgkd-plan: print a run's placement, its plan and the predicted iteration time and idle per role.

Usage::

    rgkd-plan --preset 70b-7b                        # built-in cluster scenario (FLOP estimate)
    rgkd-plan --preset 70b-7b --gpu H200-141GB --json
    rgkd-plan --config RECIPE.yaml [a.b=value ...] --world-size 32
    rgkd-plan --config RECIPE.yaml --measured phases.json   # simulate with measured phase times
    rgkd-plan --list-presets
    rgkd-plan --preset 70b-7b --memory               # + memory per GPU per role, refusal if it cannot fit
    rgkd-plan --config RECIPE.yaml --memory --gpu H100-80GB --gpus-per-node 8 [a.b=value ...]

Nothing is launched and no GPU is needed. Phase times come from the cost model (FLOPs, HBM and
link bandwidths of the named GPU at an assumed MFU; see ``rgkd_megatron.schedule.cost_model``)
or, with ``--measured``, from a JSON file: ``{"policy/rollout": seconds, ...}`` (also accepted:
``{"phase_times": {...}}`` or ``{"policy": {"rollout": seconds}}``), covering every (role, action)
of the plan. ``--memory`` adds the bytes per GPU of every role (weights, gradients, optimizer states,
activations, KV cache, teacher top-k buffers, overhead; see ``rgkd_megatron.schedule.memory`` and
docs/planning.md) and, with ``--json``, a "memory" key. Exit status: 0 ok, 2 bad input (message names
the field), 3 a role does not fit in the GPU's memory (the reasons, with a layout that fits, on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any

from rgkd_megatron.schedule.cost_model import (
    GPUS,
    PRESETS,
    Efficiency,
    ModelShape,
    RoleSetup,
    Scenario,
    Workload,
)
from rgkd_megatron.schedule.placement import POLICY, REWARD, TEACHER, check_placement, placed_windows
from rgkd_megatron.schedule.plan import PlanSpec, build_plan, check_plan
from rgkd_megatron.utils.cli_errors import cli_main
from rgkd_megatron.utils.cli_flags import add_common_flags, add_overrides
from rgkd_megatron.utils.jsonl import read_json


def _read_measured(path: str) -> dict[str, float]:
    data = read_json(path)
    if isinstance(data, dict) and "phase_times" in data:
        data = data["phase_times"]
    if not isinstance(data, dict):
        raise ValueError(f"--measured {path}: expected a JSON object of 'role/action': seconds")
    out: dict[str, float] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update({f"{key}/{action}": float(v) for action, v in value.items()})
        else:
            out[key] = float(value)
    return out


def _scenario_from_config(args: argparse.Namespace) -> tuple[Scenario, Any]:
    from rgkd_megatron.config import load_config
    from rgkd_megatron.schedule.placement import disaggregated_world_size, role_model_configs

    cfg = load_config(args.config, args.overrides)
    models, errors = role_model_configs(cfg)
    if errors:
        raise ValueError(errors[0])
    if args.world_size is not None:
        world = args.world_size
    elif cfg.placement.mode == "disaggregated":
        world = disaggregated_world_size(cfg)
    else:
        world = cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size
    if cfg.placement.mode == "colocated":
        from rgkd_megatron.config.loader import data_parallel_size

        data_parallel_size(cfg, world)
    check_placement(cfg, world, models)
    spec = PlanSpec.from_config(cfg)
    if spec.errors():
        raise ValueError(spec.errors()[0])
    vocab = cfg.model.vocab_size
    if vocab is None and (args.measured is None or args.memory):
        if not cfg.data.tokenizer:
            raise ValueError("model.vocab_size: needed for FLOP estimates (or set data.tokenizer); got null")
        from rgkd_megatron.data.tokenizer import load_tokenizer

        vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
    roles = {}
    for w in placed_windows(cfg, world):
        model = models.get(w.role)
        if model is None and args.measured and not args.memory:  # measured times need no shapes
            roles[w.role] = RoleSetup(
                ModelShape("(model not given)", 1, 1, 1, 1, 1, 1), w.tp, w.pp, w.dp, w.first_rank
            )
            continue
        if model is None:
            raise ValueError(f"pbkd.teacher_model_config: the {w.role} role's model is needed; got null")
        shape = ModelShape.from_model_config(
            f"{w.role} ({model.num_layers}L x {model.hidden_size})", model, vocab or 1
        )
        roles[w.role] = RoleSetup(shape, w.tp, w.pp, w.dp, w.first_rank)
    scenario = Scenario(
        name=args.config,
        description=f"recipe {args.config} ({cfg.pbkd.method}), world size {world}",
        gpu=GPUS[args.gpu],
        gpus_per_node=args.gpus_per_node,
        roles=roles,
        spec=spec,
        workload=Workload.from_config(cfg),
        efficiency=Efficiency(mfu=args.mfu) if args.mfu else Efficiency(),
    )
    return scenario, cfg


def _fmt_roles(times: dict[str, Any]) -> str:
    return "; ".join(
        f"{role}: " + ", ".join(f"{a} x{n:g}" for a, n in acts.items()) for role, acts in times.items()
    )


def _secs(seconds: float, width: int = 8) -> str:
    """Two decimals, or three significant digits below 0.1 s (CPU-sized phases)."""
    text = f"{seconds:.2f}" if seconds >= 0.1 or seconds == 0 else f"{seconds:.3g}"
    return f"{text:>{width}}"


def render_text(out: dict[str, Any]) -> str:
    """The human-readable report of ``cost_model.predict``'s output."""
    lines = [f"rgkd-plan: {out['scenario']}", f"  {out['description']}", ""]
    lines.append(f"placement ({out['plan']['placement']}, world size {out['world_size']}, {out['gpu']}, "
                 f"{out['gpus_per_node']} GPUs per node):")  # fmt: skip
    for role in (TEACHER, POLICY, REWARD):
        p = out["placement"].get(role)
        if p:
            last = p["first_rank"] + p["num_ranks"] - 1
            lines.append(
                f"  {role:<8} ranks {p['first_rank']:>3}-{last:<3} tp={p['tp']} pp={p['pp']} dp={p['dp']:<3} "
                f"{p['model']} ({p['params_b']}B params)"
            )
    plan = out["plan"]
    mode = "serial (colocated order)" if plan["serial"] else f"overlapped, staleness {plan['staleness']}"
    lines += [
        "",
        f"plan: {plan['rounds']} rounds x {plan['iterations_per_round']} iterations, k_r:k_p = "
        f"{plan['k_r']}:{plan['k_p']}, {mode}, {plan['events']} events",
        f"  per iteration: {_fmt_roles(plan['per_iteration'])}",
    ]
    if plan["per_round"]:
        lines.append(f"  per round:     {_fmt_roles(plan['per_round'])}")
    source = out["phase_times_source"]
    eff = out["efficiency"]
    note = (
        f"FLOP estimate, MFU {eff['mfu']:.2f}, HBM efficiency {eff['hbm_efficiency']:.2f}"
        if source == "flop_estimate"
        else "measured"
    )
    lines += ["", f"phase times (s, {note}):"]
    breakdown = out.get("phase_breakdown") or {}
    for key, seconds in sorted(out["phase_times"].items()):
        extra = ""
        if key in breakdown:
            b = breakdown[key]
            extra = (
                f"  ({b['flops'] / 1e15:8.1f} PFLOP, compute {b['compute']:.2f} s, comm {b['comm']:.2f} s)"
            )
        lines.append(f"  {key:<24} {_secs(seconds)}{extra}")
    pred = out["prediction"]
    lines += ["", f"predicted iteration time: {_secs(pred['iteration_time']).strip()} s"]
    lines.append("  role      busy/iter  idle/iter   idle")
    for role in (TEACHER, POLICY, REWARD):
        if role in pred:
            r = pred[role]
            lines.append(
                f"  {role:<8} {_secs(r['busy'], 9)}  {_secs(r['idle'], 9)}  {100 * r['idle_fraction']:5.1f}%"
            )
    return "\n".join(lines)


@cli_main("rgkd-plan")
def main(argv: list[str] | None = None) -> int:
    parser = add_common_flags(argparse.ArgumentParser(prog="rgkd-plan", description=__doc__.split("\n\n")[0]))
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), help="a built-in cluster scenario")
    source.add_argument("--config", help="YAML recipe: its placement, schedule, pbkd and model sections")
    source.add_argument("--list-presets", action="store_true", help="list the built-in scenarios and exit")
    add_overrides(parser, "schedule.overlap=true (with --config)")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="H100-80GB", help="GPU type of the estimate")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (NVLink vs InfiniBand)")
    parser.add_argument(
        "--world-size", type=int, help="with --config: ranks of the job (default: the end of the last window, "
        "or TP x PP when colocated)"
    )  # fmt: skip
    parser.add_argument("--mfu", type=float, help="assumed model FLOPs utilisation (default 0.40)")
    parser.add_argument("--measured", help="JSON of measured seconds per 'role/action' instead of estimates")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--events", action="store_true", help="with --json: include the full event list")
    parser.add_argument(
        "--memory", action="store_true", help="also plan memory per GPU per role; exit 3 if a role cannot fit"
    )
    parser.add_argument(
        "--overhead-gib", type=float, default=4.0, help="with --memory: CUDA context + NCCL + fragmentation per GPU"
    )  # fmt: skip
    args = parser.parse_intermixed_args(argv)  # overrides before and after the flags
    if args.list_presets:
        for name, factory in sorted(PRESETS.items()):
            print(f"{name:<20} {factory().description}")
        return 0
    if not args.preset and not args.config:
        parser.error("give --preset NAME or --config RECIPE.yaml (see --list-presets)")
    if args.overrides and not args.config:
        parser.error("overrides apply to --config recipes only")
    cfg = None
    try:
        if args.preset:
            scenario = PRESETS[args.preset](args.gpu)
            scenario = replace(scenario, gpus_per_node=args.gpus_per_node)
            if args.mfu:
                scenario = replace(scenario, efficiency=replace(scenario.efficiency, mfu=args.mfu))
        else:
            scenario, cfg = _scenario_from_config(args)
        from rgkd_megatron.schedule.cost_model import predict

        plan = build_plan(scenario.spec)
        problems = check_plan(plan)
        if problems:  # pragma: no cover - a builder bug
            raise RuntimeError("invalid plan: " + "; ".join(problems))
        measured = _read_measured(args.measured) if args.measured else None
        out = predict(scenario, measured)
        reports = None
        if args.memory:
            from rgkd_megatron.schedule import memory

            if args.overhead_gib < 0:
                raise ValueError(f"--overhead-gib: expected a value >= 0, got {args.overhead_gib}")
            opts = (
                memory.MemoryOptions.from_config(cfg, overhead_gib=args.overhead_gib)
                if cfg is not None  # the presets are MM-PbKD runs with Megatron's usual options
                else memory.MemoryOptions(reward_head="q", overhead_gib=args.overhead_gib)
            )
            reports = memory.plan_memory(scenario, opts)
            out["memory"] = memory.memory_summary(scenario, opts, reports)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"rgkd-plan: error: {message}", file=sys.stderr)
        return 2
    if args.json:
        if args.events:
            out["events"] = plan.to_dict()["events"]
        print(json.dumps(out, indent=1))
    else:
        print(render_text(out))
        if reports is not None:
            print("\n" + memory.render_memory(scenario, opts, reports))
    refused = [r.reason for r in reports or [] if not r.fits]
    for reason in refused:
        print(f"rgkd-plan: does not fit: {reason}", file=sys.stderr)
    return 3 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
