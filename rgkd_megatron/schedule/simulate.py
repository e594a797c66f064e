"""The plan simulator: run a plan (``plan.py``) on a clock with seconds per (role, action).

The measuring stick for the cost model and the role runner: each event starts when its
dependencies are done and its ranks are free (colocated: one rank set for all roles), and the
result reports per role the busy time, the idle time and the iteration time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rgkd_megatron.methods import ROLES

if TYPE_CHECKING:
    from rgkd_megatron.schedule.plan import Event, Plan


Durations = Mapping[Any, float]
"""Seconds per event, keyed by (role, action) tuples or 'role/action' strings."""


def _duration(durations: Durations, e: Event) -> float:
    for key in ((e.role, e.action), e.key):
        if key in durations:
            value = float(durations[key])
            if value < 0:
                raise ValueError(f"duration of {e.key}: expected >= 0 seconds, got {value}")
            return value
    raise KeyError(f"no duration for {e.key} (the plan has {e.key} events)")


@dataclass(frozen=True)
class RoleTime:
    """One role's time over the simulated run."""

    busy: float
    """Seconds of the role's own events."""
    idle: float
    """Seconds the role's ranks do nothing (colocated: no role runs)."""
    idle_fraction: float
    """idle / makespan."""


@dataclass(frozen=True)
class Simulation:
    """Event start/finish times and per-role busy/idle over a simulated run."""

    start: tuple[float, ...]
    finish: tuple[float, ...]
    makespan: float
    iterations: int
    roles: dict[str, RoleTime]

    @property
    def iteration_time(self) -> float:
        return self.makespan / self.iterations

    def per_iteration(self) -> dict[str, Any]:
        """``{role: {busy, idle, idle_fraction}, ..., "iteration_time": s}``, seconds per iteration."""
        out: dict[str, Any] = {
            role: {
                "busy": t.busy / self.iterations,
                "idle": t.idle / self.iterations,
                "idle_fraction": t.idle_fraction,
            }
            for role, t in self.roles.items()
        }
        out["iteration_time"] = self.iteration_time
        return out


def simulate(plan: Plan, durations: Durations, roles: Iterable[str] = ()) -> Simulation:
    """Run the plan on a clock: an event starts when its dependencies are done and its ranks are
    free (colocated placement: all roles share one rank set), and takes its (role, action) time.

    ``roles`` adds placed roles without events (reported 100% idle).
    """
    missing = list(
        dict.fromkeys(
            e.key for e in plan.events if (e.role, e.action) not in durations and e.key not in durations
        )
    )
    if missing:
        raise KeyError(f"no duration for {', '.join(missing)} (the plan has such events)")
    colocated = plan.spec.placement == "colocated"
    free: dict[str, float] = {}
    start, finish = [], []
    busy: Counter[str] = Counter()
    for e in plan.events:
        resource = "all" if colocated else e.role
        t0 = max([free.get(resource, 0.0), *(finish[d] for d in e.depends_on)])
        dur = _duration(durations, e)
        start.append(t0)
        finish.append(t0 + dur)
        free[resource] = t0 + dur
        busy[e.role] += dur
    makespan = max(finish, default=0.0)
    reported = [r for r in ROLES if r in plan.roles or r in set(roles)]
    total_busy = sum(busy.values())
    times = {}
    for role in reported:
        ranks_busy = total_busy if colocated else busy[role]
        idle = max(0.0, makespan - ranks_busy)
        times[role] = RoleTime(busy[role], idle, idle / makespan if makespan > 0 else 0.0)
    return Simulation(tuple(start), tuple(finish), makespan, plan.spec.iterations, times)


def predict_from_measurements(
    plan: Plan, measured: Durations, roles: Iterable[str] = (), *, unmeasured: float | None = None
) -> dict[str, Any]:
    """Per-iteration prediction from measured seconds per (role, action):
    ``{role: {busy, idle, idle_fraction}, ..., "iteration_time": seconds}``.

    ``unmeasured``: seconds taken for a (role, action) of the plan that ``measured`` lacks, e.g. a
    resumed run whose attempt started past every ``policy/collect`` event (the runner passes 0: the
    attempt's measured iteration time holds no such event either). None (default): a KeyError names
    the missing ones.
    """
    if unmeasured is not None:
        filled = dict(measured)
        for e in plan.events:
            if (e.role, e.action) not in filled and e.key not in filled:
                filled[e.key] = unmeasured
        measured = filled
    return simulate(plan, measured, roles).per_iteration()
