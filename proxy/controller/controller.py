"""`abproxy controller`: evaluates every active rollout plan on an interval and acts on it.

Each tick: take or renew the leader lease (lock.py); if this process leads, for each experiment with a
plan read its state, gather the phase's evidence from the store (on a worker thread: SQL blocks), decide
(decide.py) and write the transition (state.py), which Redis refuses if a person acted in between or this
process lost the lease. A restarted controller has nothing to recover: the plan's state lives in Redis,
and the next tick continues from it.

Every decision is a JSON log line (`rollout_decision`), a record in the plan's decision stream with the
evidence, an audit entry when the percent moves, Prometheus series (below) for Grafana's panels and
annotations, and optionally a Slack-compatible webhook. A hold is recorded when what it waits on changes,
not at every tick.

Two clocks: `clock` measures how long a phase has run (min_duration) and is injectable, so tests and
the demo replay weeks in seconds; the data window is always the wall clock's, as the proxy stamps
requests with it. In production the two are the same clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from proxy.config import Settings
from proxy.controller.decide import Decision, decide
from proxy.controller.evidence import PhaseEvidence
from proxy.controller.gates import evaluate_phase
from proxy.controller.lock import ControllerLock, new_owner_id
from proxy.controller.plan import PhaseConfig
from proxy.controller.state import STATUSES, Conflict, LostLock, PlanState, PlanStore
from proxy.controller.webhook import Notifier
from proxy.errors import StateUnavailable

log = structlog.get_logger("abproxy.controller")
BY = "controller"
_GATE_VALUE = {"pass": 1.0, "wait": 0.0, "fail": -1.0}
_NOTIFIED = frozenset({"start", "promote", "complete", "rollback", "halt"})

BeforeAct = Callable[[str, Decision], Awaitable[None]]


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.leader = Gauge("abproxy_controller_leader", "1 while this controller holds the lock and acts.",
                            registry=registry)  # fmt: skip
        self.ticks = Counter("abproxy_controller_ticks", "Evaluation rounds, by role.", ["role"], registry=registry)
        self.decisions = Counter("abproxy_controller_decisions", "Decisions written, by action.",
                                 ["experiment", "action"], registry=registry)  # fmt: skip
        self.refused = Counter(
            "abproxy_controller_refused", "Transitions Redis refused: a person acted first (conflict) or the lease "
            "was lost.", ["experiment", "why"], registry=registry,
        )  # fmt: skip
        self.phase = Gauge("abproxy_rollout_plan_phase", "Index of the plan's current phase (0 = first).",
                           ["experiment"], registry=registry)  # fmt: skip
        self.phase_name = Gauge("abproxy_rollout_plan_phase_current", "1 for the plan's current phase, else 0.",
                                ["experiment", "phase"], registry=registry)  # fmt: skip
        self.status = Gauge("abproxy_rollout_plan_status", "1 for the plan's current status.",
                            ["experiment", "status"], registry=registry)  # fmt: skip
        self.gate = Gauge("abproxy_rollout_gate", "Each gate of the current phase: 1 pass, 0 wait, -1 fail.",
                          ["experiment", "gate"], registry=registry)  # fmt: skip
        self.last_tick = Gauge("abproxy_controller_last_tick_timestamp_seconds", "Unix time of the last round.",
                               registry=registry)  # fmt: skip

        self._gates: dict[str, set[str]] = {}

    def show(self, experiment: str, plan: list[PhaseConfig], state: PlanState | None,
             evidence: PhaseEvidence | None) -> None:  # fmt: skip
        if state is not None:
            self.phase.labels(experiment).set(state.phase)
            for phase in plan:
                self.phase_name.labels(experiment, phase.name).set(1.0 if phase.name == state.phase_name else 0.0)
            for status in STATUSES:
                self.status.labels(experiment, status).set(1.0 if status == state.status else 0.0)
        shown = {g.gate: _GATE_VALUE[g.status] for g in evidence.gates} if evidence is not None else {}
        for stale in self._gates.get(experiment, set()) - shown.keys():  # the last phase's gates, or none now
            self.gate.remove(experiment, stale)
        for gate, value in shown.items():
            self.gate.labels(experiment, gate).set(value)
        self._gates[experiment] = set(shown)


@dataclass(frozen=True, slots=True)
class Outcome:
    decision: Decision
    state: PlanState | None  # after the decision
    evidence: PhaseEvidence | None
    written: bool


class Controller:
    def __init__(
        self, settings: Settings, redis: aioredis.Redis, engine: Engine, *, owner: str | None = None,
        clock: Callable[[], float] = time.time, wall: Callable[[], float] = time.time,
        registry: CollectorRegistry | None = None, notifier: Notifier | None = None,
        before_act: BeforeAct | None = None,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.engine = engine
        self.plans = {name: exp.rollout_plan for name, exp in settings.experiments.items() if exp.rollout_plan}
        defaults = {name: exp.rollout_percent for name, exp in settings.experiments.items()}
        self.store = PlanStore(redis, defaults)
        self.lock = ControllerLock(redis, owner or new_owner_id(), settings.controller.lease_s)
        self.clock, self.wall = clock, wall
        self.metrics = ControllerMetrics(registry or CollectorRegistry())
        self.notifier = notifier
        self.before_act = before_act  # tests: run something between deciding and writing
        self._last_hold: dict[str, str] = {}

    async def tick(self) -> dict[str, Outcome]:
        """One round; {} when another controller leads."""
        self.metrics.last_tick.set(time.time())
        leading = await self.lock.hold()
        self.metrics.leader.set(1.0 if leading else 0.0)
        self.metrics.ticks.labels("leader" if leading else "follower").inc()
        if not leading:
            return {}
        outcomes: dict[str, Outcome] = {}
        for experiment, plan in self.plans.items():
            try:
                outcomes[experiment] = await self._step(experiment, plan)
            except LostLock:
                self.metrics.refused.labels(experiment, "lost_lock").inc()
                log.warning("controller_lost_lock", owner=self.lock.owner)
                break  # another controller leads now: it takes the rest
            except StateUnavailable as exc:
                log.warning("controller_redis_unavailable", experiment=experiment, error=str(exc))
        return outcomes

    async def evaluate(self, experiment: str) -> tuple[PlanState | None, PhaseEvidence | None, Decision]:
        """What the controller would do now, without acting (`abproxy rollout plan --dry-run`)."""
        plan = self.plans[experiment]
        state = await self.store.get(experiment)
        evidence = None
        if state is not None and state.status == "running" and state.phase < len(plan) - 1:
            evidence = await self._evidence(experiment, plan[state.phase], state)
        return state, evidence, decide(plan, state, evidence, by=BY, clock_now=self.clock(), wall_now=self.wall())

    async def _evidence(self, experiment: str, phase: PhaseConfig, state: PlanState) -> PhaseEvidence | None:
        try:
            return await asyncio.to_thread(evaluate_phase, self.engine, self.settings, experiment, phase,
                                           elapsed_s=self.clock() - state.entered_at, data_since=state.data_since,
                                           now=self.wall())  # fmt: skip
        except SQLAlchemyError as exc:
            log.warning("controller_store_unavailable", experiment=experiment, error=str(exc).splitlines()[0])
            return None

    async def _step(self, experiment: str, plan: list[PhaseConfig]) -> Outcome:
        state, evidence, decision = await self.evaluate(experiment)
        self.metrics.show(experiment, plan, state, evidence)
        if decision.move is None:
            if decision.action == "hold" and state is not None and self._last_hold.get(experiment) != decision.reason:
                percent = plan[state.phase].percent
                try:  # fenced like a transition (state.py _NOTE): LostLock goes up to tick()
                    await self.store.note(state, action="hold", by=BY, reason=decision.reason, percent=percent,
                                          evidence=evidence.as_dict() if evidence else None,
                                          lock_owner=self.lock.owner)  # fmt: skip
                except Conflict:  # the plan moved since it was read: the next round decides on the new state
                    return Outcome(decision, state, evidence, written=False)
                self._last_hold[experiment] = decision.reason
                self._log(experiment, decision, state)
            return Outcome(decision, state, evidence, written=False)
        if self.before_act is not None:
            await self.before_act(experiment, decision)
        try:
            after = await self.store.apply(experiment, decision.move, expected_rev=state.rev if state else -1,
                                           lock_owner=self.lock.owner, previous=state)  # fmt: skip
        except Conflict as exc:
            self.metrics.refused.labels(experiment, "conflict").inc()
            log.warning("rollout_decision_refused", experiment=experiment, action=decision.action, why=str(exc))
            return Outcome(decision, state, evidence, written=False)
        self._last_hold.pop(experiment, None)
        self.metrics.decisions.labels(experiment, decision.action).inc()
        self.metrics.show(experiment, plan, after, None)
        self._log(experiment, decision, after)
        if self.notifier is not None and decision.action in _NOTIFIED:
            await self.notifier.tell(experiment, decision, after)
        return Outcome(decision, after, evidence, written=True)

    def _log(self, experiment: str, decision: Decision, state: PlanState) -> None:
        log.info("rollout_decision", experiment=experiment, action=decision.action, phase=state.phase_name,
                 status=state.status, reason=decision.reason)  # fmt: skip

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every `controller.interval_s` (renewing the lease at least every 10 s) until `stop` is set."""
        interval = self.settings.controller.interval_s
        renew = min(interval, 10.0)
        next_tick = 0.0
        try:
            while not stop.is_set():
                if time.monotonic() >= next_tick:
                    await self.tick()
                    next_tick = time.monotonic() + interval
                else:
                    self.metrics.leader.set(1.0 if await self.lock.hold() else 0.0)
                try:
                    await asyncio.wait_for(stop.wait(), timeout=min(renew, max(next_tick - time.monotonic(), 0.01)))
                except TimeoutError:
                    pass
        finally:
            await self.lock.release()
