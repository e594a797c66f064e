"""Executes a plan (``plan.py``) on the ranks of each role, moving data between role windows.

Every rank walks the same event list in order and runs the events of the role(s) it holds
(colocated: every role, one after the other; disaggregated: its window's role only). An event
first fetches its data inputs (local when the producer shares the ranks, else received from the
producer role's leader, see ``transport.py``), then runs its handler, then publishes its outputs
(kept locally for local consumers, sent without waiting to each remote consumer role). Because
the plan's dependencies point backwards and sends never block, this needs no global barrier: with
``schedule.overlap`` the REWARD window runs the RM step on batch t+1 while the POLICY window
still trains on batch t, and the staleness bound is the plan's.

The runner times every training event: *compute* (the handler) per (role, action) and *wait*
(blocked on inputs) per role; evaluation events (``evaluate``) are timed apart (``evaluation_s``),
so the iteration times measure training alone, as the cost model predicts them. The plan's cuts
(``Plan.cut``: ``iteration_ends``, and 0 for the initial evaluation) are consistent: ``run``
returns at one, and ``cut_state``/``restore`` give what a checkpoint at that cut must hold besides
the models (artifacts produced before the cut and consumed after it).

Metrics returned by handlers (the ``"metrics"`` output) are kept per iteration, those of training
events (``pop_metrics()``) apart from those of evaluation events (``pop_metrics(evaluation=True)``).

Handlers are registered on the runner (``register``), one per action: ``fn(event, inputs) ->
{artifact key: (local, wire)}``; ``local`` is what consumers on this rank get, ``wire`` the
JSON/tensor payload sent to other windows. Artifact keys are those of ``schedule/artifacts.py``.
"""

from __future__ import annotations

import os
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from rgkd_megatron.schedule.artifacts import RMVersion, is_model_state, parse
from rgkd_megatron.schedule.plan import EVALUATE, Event, Plan, build_plan, predict_from_measurements
from rgkd_megatron.schedule.transport import RoleTransport

Handler = Callable[[Event, dict[str, Any]], dict[str, tuple[Any, Any]]]
FAULT_ENV = "RGKD_FAULT_AFTER_EVENT"
"""Testing hook: ``"<event id>:<rank>"`` SIGKILLs that rank right after that event (crash tests)."""


@dataclass
class Timings:
    """Seconds per (role, action) of compute, per role of waiting, and of walking the plan
    (training events; evaluation events count in ``evaluation`` only)."""

    compute: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    wait: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    loop: float = 0.0
    iterations: int = 0
    evaluation: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "compute": {k: list(v) for k, v in self.compute.items()},
            "wait": dict(self.wait),
            "loop": self.loop,
            "iterations": self.iterations,
            "evaluation": self.evaluation,
        }


class PlanRunner:
    """Runs ``plan`` on this rank. ``windows``: role -> ranks (colocated: every role -> all ranks).
    ``handlers`` (action -> handler) may also be registered after construction (``register``)."""

    def __init__(
        self,
        plan: Plan,
        handlers: Mapping[str, Handler] | None,
        windows: Mapping[str, range],
        transport: RoleTransport | None,
    ):
        if not plan.iteration_ends:
            raise ValueError("plan has no iteration_ends (build it with build_plan)")
        self.plan, self.handlers, self.transport = plan, dict(handlers or {}), transport
        self.windows = {role: range(r.start, r.stop) for role, r in windows.items()}
        rank = dist.get_rank()
        self.my_roles = {role for role, ranks in self.windows.items() if rank in ranks}
        missing = [e.key for e in plan.events if e.role not in self.windows]
        if missing:
            raise ValueError(f"the plan has events of unplaced roles: {sorted(set(missing))}")
        if transport is None and len({(r.start, r.stop) for r in self.windows.values()}) > 1:
            raise ValueError("roles on different rank windows need a RoleTransport")
        self.producer: dict[str, Event] = {}
        self.consumers: dict[str, list[Event]] = defaultdict(list)
        for e in plan.events:
            for a in e.outputs:
                self.producer[a] = e
            for a in e.inputs:
                self.consumers[a].append(e)
        self.local: dict[str, Any] = {}
        self.wire: dict[str, Any] = {}
        self.position = 0
        self.iteration = 0
        self.metrics: dict[int, dict[str, float]] = defaultdict(dict)
        self.evaluations: dict[int, dict[str, Any]] = defaultdict(dict)
        self.timings = Timings()
        self.max_rm_lag = 0
        """Largest lag (in RM blocks) of a score event's RM behind the colocated order, seen here."""
        self._fault = self._parse_fault(rank)

    @staticmethod
    def _parse_fault(rank: int) -> int | None:
        spec = os.environ.get(FAULT_ENV)
        if not spec:
            return None
        event_id, _, fault_rank = spec.partition(":")
        return int(event_id) if int(fault_rank or 0) == rank else None

    def register(self, handlers: Mapping[str, Handler]) -> None:
        """Handle each ``action`` of ``handlers`` with its function (replacing an earlier one)."""
        self.handlers.update(handlers)

    # ------------------------------------------------------------------ artifacts
    def _shares_ranks(self, a: str, b: str) -> bool:
        return self.windows[a] == self.windows[b]

    def _fetch(self, artifact: str, role: str) -> Any:
        if artifact in self.local:
            return self.local[artifact]
        src = self.producer[artifact]
        if self._shares_ranks(src.role, role):
            raise RuntimeError(f"{artifact}: produced on this rank by event {src.id} but not kept")
        payload = self.transport.recv(src.role, role, tag=src.id)
        self.local[artifact] = payload
        self.wire[artifact] = payload
        return payload

    def _publish(self, event: Event, outputs: Mapping[str, tuple[Any, Any]]) -> None:
        for artifact, (local, wire) in outputs.items():
            consumer_roles = {c.role for c in self.consumers.get(artifact, [])}
            if consumer_roles & self.my_roles:
                self.local[artifact] = local
                self.wire[artifact] = wire
            for role in sorted(consumer_roles):
                if not self._shares_ranks(event.role, role):
                    self.transport.send(wire, event.role, role, tag=event.id)

    def _release(self, upto: int) -> None:
        """Drop artifacts no event of this rank at position >= ``upto`` still reads."""
        for artifact in list(self.local):
            if not any(c.id >= upto and c.role in self.my_roles for c in self.consumers[artifact]):
                del self.local[artifact]
                self.wire.pop(artifact, None)

    # ------------------------------------------------------------------ execution
    def _execute(self, event: Event) -> float:
        """Run ``event``; returns its seconds when it is an evaluation event (else 0)."""
        started = time.perf_counter()
        inputs = {a: self._fetch(a, event.role) for a in event.inputs if not is_model_state(a)}
        ready = time.perf_counter()
        outputs = self.handlers[event.action](event, inputs) or {}
        done = time.perf_counter()
        evaluation = event.action == EVALUATE
        if not evaluation:
            self.timings.wait[event.role] += ready - started
            self.timings.compute[event.key].append(done - ready)
        metrics = outputs.pop("metrics", None)
        if metrics is not None:
            (self.evaluations if evaluation else self.metrics)[event.iteration].update(metrics[0])
        self._publish(event, outputs)
        if self._fault is not None and event.id == self._fault:
            os.kill(os.getpid(), signal.SIGKILL)
        return time.perf_counter() - started if evaluation else 0.0

    def check_rm_version(self, event: Event, rm_steps: int) -> None:
        """Called by the score handler: the RM must be at the version the plan names."""
        used = [state.index for state in map(parse, event.inputs) if isinstance(state, RMVersion)]
        for version in used:
            if version != rm_steps:
                raise RuntimeError(
                    f"event {event.id} ({event.key}) expects {RMVersion(version)}, the RM is at {rm_steps}"
                )
            k_r = max(self.plan.spec.k_r, 1)
            colocated_steps = sum(
                1 for e in self.plan.events if e.action == "rm_update" and e.iteration <= event.iteration
            )
            self.max_rm_lag = max(self.max_rm_lag, (colocated_steps - version) // k_r)

    def run(self, until_iteration: int) -> None:
        """Run this rank's events up to the cut after ``until_iteration`` (0: the initial evaluation)."""
        end = self.plan.cut(until_iteration)
        started = time.perf_counter()
        evaluation = 0.0
        for event in self.plan.events[self.position : end]:
            if event.role in self.my_roles:
                evaluation += self._execute(event)
        self.timings.evaluation += evaluation
        self.timings.loop += time.perf_counter() - started - evaluation
        self.timings.iterations += until_iteration - self.iteration
        self.position, self.iteration = end, until_iteration
        self._release(end)

    # ------------------------------------------------------------------ cuts
    def drain(self) -> None:
        """At a cut: receive every artifact a remote role sent before it that this rank still
        needs after it, and wait for this rank's own sends. Then nothing is in flight."""
        for artifact, src in self.producer.items():
            if src.id >= self.position or artifact in self.local:
                continue
            later = [c for c in self.consumers[artifact] if c.id >= self.position and c.role in self.my_roles]
            if later and not self._shares_ranks(src.role, later[0].role):
                self._fetch(artifact, later[0].role)
        if self.transport is not None:
            self.transport.flush()

    def cut_state(self) -> dict[str, Any]:
        """What a checkpoint at the current cut keeps besides models (call ``drain`` first)."""
        return {"position": self.position, "iteration": self.iteration, "artifacts": dict(self.wire)}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from ``cut_state``'s output (the kept artifacts are JSON/tensor payloads)."""
        self.position, self.iteration = int(state["position"]), int(state["iteration"])
        self.wire = dict(state["artifacts"])
        self.local = dict(self.wire)

    def pop_metrics(self, evaluation: bool = False) -> dict[int, dict[str, Any]]:
        """Metrics per iteration kept since the last call: of training events, or (``evaluation``)
        of evaluation events (iteration 0: the initial evaluation)."""
        kept = self.evaluations if evaluation else self.metrics
        out = dict(kept)
        kept.clear()
        return out

    # ------------------------------------------------------------------ timing report
    def timing_report(self) -> dict[str, Any]:
        """Collective: every rank's timings -> per role measured busy/idle and iteration time, and
        the cost model's prediction (``predict_from_measurements``) fed with the measured means."""
        gathered: list[Any] = [None] * dist.get_world_size()
        mine = {"max_rm_lag": self.max_rm_lag, **self.timings.to_dict()}
        dist.all_gather_object(gathered, mine)
        compute: dict[str, list[float]] = defaultdict(list)
        role_compute: dict[str, float] = defaultdict(float)
        role_wait: dict[str, float] = defaultdict(float)
        for rank, t in enumerate(gathered):  # each role counted once: from its window's first rank
            for key, values in t["compute"].items():
                role = key.split("/")[0]
                if rank == self.windows[role].start:
                    compute[key].extend(values)
                    role_compute[role] += sum(values)
            for role, w in t["wait"].items():
                if rank == self.windows[role].start:
                    role_wait[role] += w
        loop = {rank: t["loop"] for rank, t in enumerate(gathered)}
        iterations = max(t["iterations"] for t in gathered) or 1
        measured = max(loop.values()) / iterations
        means = {key: sum(v) / len(v) for key, v in compute.items() if v}
        spec = self.plan.spec
        training = build_plan(spec.without_evaluation()) if spec.evaluate else self.plan  # as the cost model
        predicted = predict_from_measurements(training, means, unmeasured=0.0)  # resumed: some never ran
        colocated = len({(r.start, r.stop) for r in self.windows.values()}) == 1
        total_compute = sum(role_compute.values())
        roles = {}
        for role in training.roles:  # the roles with training events (as before evaluation joined the plan)
            busy = (total_compute if colocated else role_compute[role]) / iterations
            roles[role] = {
                "compute_s": role_compute[role] / iterations,
                "wait_s": role_wait[role] / iterations,
                "idle_fraction": max(0.0, 1.0 - busy / measured) if measured > 0 else 0.0,
                "predicted_idle_fraction": predicted[role]["idle_fraction"],
            }
        return {
            "placement": "colocated" if colocated else "disaggregated",
            "iterations": iterations,
            "measured_iteration_s": measured,
            "predicted_iteration_s": predicted["iteration_time"],
            "predicted_over_measured": predicted["iteration_time"] / measured if measured > 0 else None,
            "phase_times": means,
            "roles": roles,
            "max_rm_lag": max(t["max_rm_lag"] for t in gathered),
            "evaluation_s": max(t["evaluation"] for t in gathered),
        }
