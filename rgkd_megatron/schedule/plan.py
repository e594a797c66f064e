"""The plan as pure data: which role does what, when, on which inputs (docs/design.md, roles and the scheduler).

A plan is a list of ``Event``s (role, action, step, round, iteration, inputs, outputs, depends_on)
built from the schedule: T rounds x I iterations, each iteration a block of k_r RM steps and a
block of k_p policy steps, the order ``pbkd/trainer.py`` describes. The list order is a valid execution order
(a topological order); ``depends_on`` holds every event an event waits for, so a runner may start
an event as soon as those are done. No process group is involved: everything here is testable.

Actions (role: action):
- policy: ``collect`` (round start: sample the round's responses, judge, append pairs),
  ``rollout`` (a policy step's n samples per prompt), ``policy_update`` (the policy-gradient /
  KD step, reference forward included);
- reward: ``rm_update`` (one RM / Q step), ``score`` (rewards of a policy step's rollouts);
- teacher: ``judge`` (round pairs, with ``pbkd.judge=teacher_loglik``), ``teacher_score``
  (top-k of a policy step's batch, white-box methods);
- evaluation (``PlanSpec.evaluate``, the run's plan): policy ``evaluate`` (greedy held-out
  responses ``heldout@t`` and the policy-side metrics) before iteration 1 (t = 0, the initial
  student) and at the end of every round (after the round's last iteration, the trailing RM blocks
  included), then teacher ``evaluate`` (its NLL of them) and reward ``evaluate`` (the reward gap)
  when those roles report them. They sit at the end of the cut (``Plan.cut``), so a checkpoint at
  a cut holds their results and a resumed run never repeats them.

Artifacts (``schedule/artifacts.py``, named in events by their keys): data (``rollouts@j``,
``rewards@j``, ``topk@j``, ``samples@rR``, ``pairs@rR``, ``heldout@t``) moves between roles; model states
(``policy@v`` after v policy steps, ``rm@v`` after v RM steps) stay with their role. A model state is consumed only by its own role, and only
while the role is at that version (no snapshots are kept).

Interleaving. Colocated (and ``schedule.overlap=false``, and staleness 0) is strict alternation,
the colocated order: per iteration t, the RM block then the policy block, every event waiting for
the previous one. Disaggregated with overlap and staleness s >= 1: the policy steps of iteration t
score with the RM after iteration t - s (``rm@((t-s) k_r)``), so the REWARD role scores them before
running RM block t - s + 1, and that block runs while the policy trains: the RM step on batch t+1
overlaps the policy step on batch t. A "version" in the staleness bound is one iteration's RM
block (k_r steps). The last s RM blocks have no policy step of the plan after them; they still run
(same number of RM steps as colocated).

``simulate`` is the measuring stick for the cost model and the runner: given seconds per
(role, action), it starts each event when its dependencies are done and its ranks are free
(colocated: one rank set for all roles), and reports per role the own compute time (busy), the time
its ranks do nothing (idle) and the iteration time (makespan / iterations).

Usage::

    plan = build_plan(PlanSpec.from_config(cfg))
    assert check_plan(plan) == []
    print(predict_from_measurements(plan, {("policy", "rollout"): 1.2, ...}))
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from rgkd_megatron.config.roles import schedule_errors, validate_schedule
from rgkd_megatron.methods import POLICY, REWARD, ROLES, TEACHER, get_method
from rgkd_megatron.schedule.artifacts import (
    INITIAL_STATES,
    Heldout,
    Pairs,
    PolicyVersion,
    Rewards,
    RMVersion,
    Rollouts,
    Samples,
    TopK,
    parse,
)

if TYPE_CHECKING:
    from rgkd_megatron.config.schema import RGKDConfig

ROUND_ACTIONS = ("collect", "judge")
"""Actions that happen once per round (the rest once per step, except ``EVALUATE``)."""
EVALUATE = "evaluate"
"""The held-out evaluation's action (every role): once at the start and once per round end."""
_STATE_OWNER = {"policy": POLICY, "rm": REWARD}
_INITIAL = INITIAL_STATES


@dataclass(frozen=True)
class Event:
    """One unit of work of one role."""

    id: int
    """Position in the plan (the plan's list order is a valid execution order)."""
    role: str
    """policy, reward or teacher."""
    action: str
    """collect, rollout, policy_update, rm_update, score, judge, teacher_score or evaluate."""
    step: int
    """1-based global index of the RM step (rm_update) or policy step (the rest); 0 for round and
    evaluation events."""
    round: int
    """1-based online round (0: the initial evaluation)."""
    iteration: int
    """1-based global iteration (round r, iteration i -> (r-1) * iterations_per_round + i); 0: the
    initial evaluation."""
    inputs: tuple[str, ...]
    """Artifacts read (data from other roles, or this role's model state at that version)."""
    outputs: tuple[str, ...]
    """Artifacts produced."""
    depends_on: tuple[int, ...]
    """Ids of the events that must finish first (producers, previous event of the role, and the
    previous event of the plan when it is serial)."""

    @property
    def key(self) -> str:
        return f"{self.role}/{self.action}"


@dataclass(frozen=True)
class PlanSpec:
    """What the plan is built from: the schedule fields and what the method does per step."""

    rounds: int
    """pbkd.rounds."""
    iterations_per_round: int
    """pbkd.iterations_per_round."""
    k_r: int
    """pbkd.k_r: RM steps per iteration."""
    k_p: int
    """pbkd.k_p: policy steps per iteration."""
    placement: Literal["colocated", "disaggregated"] = "colocated"
    """placement.mode."""
    overlap: bool = False
    """schedule.overlap."""
    staleness: int = 1
    """schedule.staleness (used with overlap)."""
    collect: bool = True
    """Rounds start by sampling, judging and appending preference pairs."""
    teacher_judges: bool = False
    """The judge runs on the TEACHER role (teacher_loglik)."""
    reward_model: bool = True
    """The method trains an RM / Q-function that scores the policy's rollouts."""
    rollouts: bool = True
    """Policy steps sample from the student (on-policy)."""
    teacher_scores: bool = False
    """The TEACHER role scores each policy step's batch (white-box: top-k log-probs)."""
    evaluate: bool = False
    """Held-out evaluation events at the start and at every round end (``rgkd-distill``'s plan;
    the plans of the cost model and ``rgkd-plan`` describe training only)."""
    evaluate_reward: bool = False
    """With ``evaluate``: the REWARD role reports the reward gap of the held-out responses."""
    evaluate_teacher: bool = False
    """With ``evaluate``: the TEACHER role reports its NLL of the held-out responses."""

    @property
    def effective_staleness(self) -> int:
        return self.staleness if self.overlap else 0

    @property
    def iterations(self) -> int:
        return self.rounds * self.iterations_per_round

    def with_evaluation(self, reward: bool, teacher: bool) -> PlanSpec:
        """This spec with the held-out evaluation events (``reward`` / ``teacher``: those roles
        evaluate the policy's responses too)."""
        return replace(self, evaluate=True, evaluate_reward=reward, evaluate_teacher=teacher)

    def without_evaluation(self) -> PlanSpec:
        """This spec, training events only."""
        return replace(self, evaluate=False, evaluate_reward=False, evaluate_teacher=False)

    def errors(self) -> list[str]:
        """Problems, each naming the config field (``config.roles.schedule_errors``)."""
        return schedule_errors(
            self.rounds, self.iterations_per_round, self.k_r, self.k_p, self.placement, self.overlap,
            self.staleness,
        )  # fmt: skip

    @classmethod
    def from_config(cls, cfg: RGKDConfig) -> PlanSpec:
        """The spec of ``cfg``: schedule fields plus the flags of ``pbkd.method``'s ``MethodSpec``
        (off-policy KD with ``pbkd.cache_path`` reads the teacher top-k cache: no live teacher scoring)."""
        p, method = cfg.pbkd, get_method(cfg.pbkd.method)
        return cls(
            rounds=p.rounds,
            iterations_per_round=p.iterations_per_round,
            k_r=p.k_r,
            k_p=p.k_p,
            placement=cfg.placement.mode,
            overlap=cfg.schedule.overlap,
            staleness=cfg.schedule.staleness,
            collect=method.collects,
            teacher_judges=method.judges_with_teacher(p),
            reward_model=method.reward_head is not None,
            rollouts=method.samples_rollouts(p),
            teacher_scores=method.teacher_source(p) == "live",
        )


@dataclass(frozen=True)
class Plan:
    """The events of a whole run, in a valid execution order."""

    spec: PlanSpec
    events: tuple[Event, ...]
    iteration_ends: tuple[int, ...] = ()
    """``iteration_ends[t-1]``: number of events built for iterations 1..t; the prefix
    ``events[:iteration_ends[t-1]]`` is a consistent cut (nothing in it depends on a later event),
    where the runner may synchronise and checkpoint. The last entry is ``len(events)``."""

    def cut(self, iteration: int) -> int:
        """Number of events up to the cut after ``iteration``: ``iteration_ends[iteration - 1]``;
        for 0, the initial evaluation (the leading events of iteration 0, none without evaluation)."""
        if iteration == 0:
            return next((e.id for e in self.events if e.iteration != 0), len(self.events))
        return self.iteration_ends[iteration - 1]

    @property
    def serial(self) -> bool:
        """True when every event waits for the previous one (colocated order)."""
        return self.spec.placement == "colocated" or self.spec.effective_staleness == 0

    @property
    def roles(self) -> tuple[str, ...]:
        """Roles with at least one event, in ROLES order."""
        used = {e.role for e in self.events}
        return tuple(r for r in ROLES if r in used)

    def summary(self) -> dict[str, Any]:
        """Event counts per iteration (step actions) and per round (round actions), per role."""
        counts = Counter((e.role, e.action) for e in self.events)  # keys in order of first appearance
        per_iteration: dict[str, dict[str, float]] = {}
        per_round: dict[str, dict[str, float]] = {}
        for (role, action), n in sorted(counts.items(), key=lambda kv: ROLES.index(kv[0][0])):
            if action == EVALUATE:
                continue
            if action in ROUND_ACTIONS:
                per_round.setdefault(role, {})[action] = n / self.spec.rounds
            else:
                per_iteration.setdefault(role, {})[action] = n / self.spec.iterations
        return {
            "placement": self.spec.placement,
            "serial": self.serial,
            "staleness": self.spec.effective_staleness,
            "rounds": self.spec.rounds,
            "iterations_per_round": self.spec.iterations_per_round,
            "k_r": self.spec.k_r,
            "k_p": self.spec.k_p,
            "events": len(self.events),
            "per_iteration": per_iteration,
            "per_round": per_round,
            "evaluations": counts[(POLICY, EVALUATE)],
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": asdict(self.spec),
            "events": [asdict(e) for e in self.events],
            "iteration_ends": list(self.iteration_ends),
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        events = []
        for e in data["events"]:
            fields = dict(e)
            for name in ("inputs", "outputs", "depends_on"):
                fields[name] = tuple(fields[name])
            events.append(Event(**fields))
        return cls(PlanSpec(**data["spec"]), tuple(events), tuple(data.get("iteration_ends", ())))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------------------------------------
# Building


@dataclass
class _Builder:
    serial: bool
    events: list[Event] = field(default_factory=list)
    producer: dict[str, int] = field(default_factory=dict)
    last_of_role: dict[str, int] = field(default_factory=dict)

    def add(self, role, action, step, round_, iteration, inputs, outputs) -> None:
        deps = {self.producer[a] for a in inputs if a in self.producer}
        if role in self.last_of_role:
            deps.add(self.last_of_role[role])
        if self.serial and self.events:
            deps.add(self.events[-1].id)
        event = Event(
            len(self.events), role, action, step, round_, iteration, tuple(inputs), tuple(outputs),
            tuple(sorted(deps)),
        )  # fmt: skip
        self.events.append(event)
        for a in outputs:
            self.producer[a] = event.id
        self.last_of_role[role] = event.id


def build_plan(spec: PlanSpec) -> Plan:
    """The plan of ``spec`` (raises ValueError naming the field for a bad spec)."""
    errors = spec.errors()
    if errors:
        raise ValueError(errors[0] if len(errors) == 1 else "; ".join(errors))
    s = spec.effective_staleness
    k_r = spec.k_r if spec.reward_model else 0
    b = _Builder(serial=s == 0)
    iters = spec.iterations_per_round
    blocks_done = 0  # RM blocks (iterations' worth of RM steps) emitted so far

    def rm_block(block: int) -> None:
        round_ = (block - 1) // iters + 1
        data = [Samples(round_).key, Pairs(round_).key] if spec.collect else []
        for i in range((block - 1) * k_r + 1, block * k_r + 1):
            b.add(REWARD, "rm_update", i, round_, block, [RMVersion(i - 1).key, *data], [RMVersion(i).key])

    def evaluation(t: int, round_: int) -> None:
        heldout = [Heldout(t).key]
        b.add(POLICY, EVALUATE, 0, round_, t, [PolicyVersion(t * spec.k_p).key], heldout)
        if spec.evaluate_teacher:
            b.add(TEACHER, EVALUATE, 0, round_, t, heldout, [])
        if spec.evaluate_reward:
            b.add(REWARD, EVALUATE, 0, round_, t, [*heldout, RMVersion(blocks_done * k_r).key], [])

    if spec.evaluate:
        evaluation(0, 0)
    t = 0
    ends: list[int] = []
    for round_ in range(1, spec.rounds + 1):
        for _ in range(iters):
            t += 1
            if t == (round_ - 1) * iters + 1 and spec.collect:
                policy_version = (t - 1) * spec.k_p
                samples, pairs = Samples(round_).key, Pairs(round_).key
                outputs = [samples] + ([] if spec.teacher_judges else [pairs])
                b.add(POLICY, "collect", 0, round_, t, [PolicyVersion(policy_version).key], outputs)
                if spec.teacher_judges:
                    b.add(TEACHER, "judge", 0, round_, t, [samples], [pairs])
            while blocks_done < t - s:
                blocks_done += 1
                rm_block(blocks_done)
            rm_version = max(0, t - s) * k_r
            for j in range((t - 1) * spec.k_p + 1, t * spec.k_p + 1):
                batch = [Rollouts(j).key] if spec.rollouts else []
                update_inputs = [PolicyVersion(j - 1).key, *batch]
                if spec.rollouts:
                    b.add(POLICY, "rollout", j, round_, t, [PolicyVersion(j - 1).key], batch)
                if spec.teacher_scores:
                    b.add(TEACHER, "teacher_score", j, round_, t, batch, [TopK(j).key])
                    update_inputs.append(TopK(j).key)
                if spec.reward_model:
                    b.add(
                        REWARD, "score", j, round_, t, [*batch, RMVersion(rm_version).key], [Rewards(j).key]
                    )
                    update_inputs.append(Rewards(j).key)
                b.add(POLICY, "policy_update", j, round_, t, update_inputs, [PolicyVersion(j).key])
            if spec.evaluate and t % iters == 0 and t < spec.iterations:
                evaluation(t, round_)
            ends.append(len(b.events))
    while blocks_done < t:
        blocks_done += 1
        rm_block(blocks_done)
    if spec.evaluate:  # after the trailing RM blocks: every model at its final version
        evaluation(t, spec.rounds)
    ends[-1] = len(b.events)  # the trailing RM blocks (and the last evaluation) belong to the last iteration
    return Plan(spec, tuple(b.events), tuple(ends))


# ---------------------------------------------------------------------------------------------
# Checking


def _version(artifact: str) -> tuple[str, int] | None:
    """('policy', 3) for 'policy@3', ('rm', 2) for 'rm@2', None for data artifacts."""
    try:
        state = parse(artifact)
    except ValueError:
        return None
    return (state.kind, state.index) if state.model_state else None


def check_plan(plan: Plan) -> list[str]:
    """Invariant violations of ``plan`` (empty list = valid), checked from the events alone:

    - ids are positions; dependencies point backwards (the list is an execution order);
    - every input is initial or produced by an earlier event that the consumer depends on; every
      artifact is produced once;
    - each role's events are totally ordered (each depends on the role's previous event);
    - a model state is read only by its role, at the role's current version (no snapshots);
    - every ``score`` uses an RM at most ``staleness`` iterations' blocks (staleness * k_r steps)
      older than the colocated order would (the RM steps of iterations <= its own), and never newer;
    - a serial plan (colocated / no overlap / staleness 0) chains every event to the previous one;
    - the numbers of policy and RM steps are what the schedule asks for;
    - evaluations (``spec.evaluate``) happen at iteration 0 and at every round end, at the end of
      their cut (nothing but evaluation between them and ``plan.cut``).
    """
    spec, events = plan.spec, plan.events
    problems: list[str] = []
    producer: dict[str, int] = {}
    last_of_role: dict[str, int] = {}
    version = {POLICY: 0, REWARD: 0}
    s = spec.effective_staleness
    rm_steps_by_iteration = Counter(e.iteration for e in events if e.action == "rm_update")
    for pos, e in enumerate(events):
        where = f"event {e.id} ({e.key}, step {e.step})"
        if e.id != pos:
            problems.append(f"{where}: id {e.id} at position {pos}")
        if any(d >= e.id or d < 0 for d in e.depends_on):
            problems.append(f"{where}: depends on a later or unknown event {list(e.depends_on)}")
        for a in e.inputs:
            if a in producer:
                if producer[a] not in e.depends_on:
                    problems.append(f"{where}: reads {a} without depending on its producer {producer[a]}")
            elif a not in _INITIAL:
                problems.append(f"{where}: reads {a} before any event produced it")
            state = _version(a)
            if state is not None:
                owner = _STATE_OWNER[state[0]]
                if owner != e.role:
                    problems.append(f"{where}: reads {a}, a model state of the {owner} role")
                elif version[owner] != state[1]:
                    problems.append(
                        f"{where}: reads {a} while the {owner} role is at version {version[owner]}"
                    )
        if e.role in last_of_role and last_of_role[e.role] not in e.depends_on:
            problems.append(
                f"{where}: not ordered after the {e.role} role's previous event {last_of_role[e.role]}"
            )
        if plan.serial and pos > 0 and pos - 1 not in e.depends_on:
            problems.append(f"{where}: a serial plan must wait for the previous event {pos - 1}")
        if e.action == "score":
            used = [v for a in e.inputs if (v := _version(a)) and v[0] == "rm"]
            fresh = sum(n for it, n in rm_steps_by_iteration.items() if it <= e.iteration)
            for _, v in used:
                lag = fresh - v
                if not 0 <= lag <= s * spec.k_r:
                    problems.append(
                        f"{where}: scores with rm@{v}, {lag} RM steps behind the colocated order "
                        f"(allowed 0..{s * spec.k_r}: staleness {s} x k_r {spec.k_r})"
                    )
        for a in e.outputs:
            if a in producer or a in _INITIAL:
                problems.append(f"{where}: produces {a} a second time")
            producer[a] = e.id
            state = _version(a)
            if state is not None and _STATE_OWNER[state[0]] == e.role:
                version[e.role] = state[1]
        last_of_role[e.role] = e.id
    counts = Counter(e.action for e in events)
    expected = {"policy_update": spec.iterations * spec.k_p}
    if spec.reward_model:
        expected["rm_update"] = spec.iterations * spec.k_r
    for action, n in expected.items():
        if counts[action] != n:
            problems.append(f"plan has {counts[action]} {action} events, the schedule asks for {n}")
    return problems + _evaluation_problems(plan)


def _evaluation_problems(plan: Plan) -> list[str]:
    spec, events = plan.spec, plan.events
    evaluated = [e.iteration for e in events if e.key == f"{POLICY}/{EVALUATE}"]
    every_round = range(spec.iterations_per_round, spec.iterations + 1, spec.iterations_per_round)
    wanted = [0, *every_round] if spec.evaluate else []
    problems = []
    if evaluated != wanted:
        problems.append(f"plan evaluates after iterations {evaluated}, expected {wanted}")
    for e in events:
        if e.action == EVALUATE and plan.iteration_ends and e.iteration <= len(plan.iteration_ends):
            after = events[e.id : plan.cut(e.iteration)]
            if not after or any(x.action != EVALUATE for x in after):
                problems.append(
                    f"event {e.id} ({e.key}): not at the end of the cut after iteration {e.iteration}"
                )
    return problems


# The simulator lives in its own module; re-exported here (callers import it from the plan).
from rgkd_megatron.schedule.simulate import (  # noqa: E402
    Durations,
    RoleTime,
    Simulation,
    predict_from_measurements,
    simulate,
)

__all__ = [
    "EVALUATE", "ROUND_ACTIONS", "Durations", "Event", "Plan", "PlanSpec", "RoleTime", "Simulation", "build_plan",
    "check_plan", "predict_from_measurements", "simulate", "validate_schedule",
]  # fmt: skip
