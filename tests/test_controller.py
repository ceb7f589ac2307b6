"""The rollout controller end to end on a real Redis and a real SQLite store, replaying weeks of simulated
traffic with known truths (tests/synthetic.py) through an injected clock: each run's decisions and their
evidence are asserted, not only the final percent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from sqlalchemy import Engine

from proxy.config import Settings, settings_from_dict
from proxy.controller.controller import Controller, Outcome
from proxy.controller.overrides import override
from proxy.controller.state import DecisionRecord, LostLock
from proxy.rollout import RolloutStore
from proxy.store.db import Store, engine_for, migrate
from tests.synthetic import DAY, EXPERIMENT, Scenario, generate

T0 = 1_800_000_000.0  # wall and controller clock start; the synthetic requests carry times after it

PLAN: list[dict[str, Any]] = [
    {"name": "canary", "percent": 10, "min_duration": "2d", "min_users_per_variant": 100,
     "gates": [{"guardrail": "error_rate", "max_regression": 0.02}, {"guardrail": "latency_p95", "max_ratio": 1.2}]},
    {"name": "beta", "percent": 50, "min_duration": "3d",
     "gates": [{"metric": "csat", "non_inferior_margin": 0.3}]},
    {"name": "ga", "percent": 100},
]  # fmt: skip


def _settings() -> Settings:
    raw = {
        "upstreams": {"u": {"base_url": "http://127.0.0.1:9/v1"}},
        "models": {"base": {"upstream": "u", "model": "m"}, "finetuned": {"upstream": "u", "model": "ft:m"}},
        "experiments": {EXPERIMENT: {"aliases": [EXPERIMENT], "control": "base", "treatment": "finetuned",
                                     "salt": "sales-v2", "rollout_plan": PLAN}},
        "metrics": {"task_completed": {"type": "boolean"}, "csat": {"type": "float", "min": 1, "max": 5},
                    "returned": {"type": "boolean", "level": "user"}},
        "events": {"redis_stream": {"enabled": True}},
        "controller": {"interval_s": 1, "lease_s": 5},
    }
    return settings_from_dict(raw, {})


@dataclass
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    settings: Settings
    engine: Engine
    redis: aioredis.Redis
    clock: Clock
    controller: Controller

    def traffic(self, scenario: Scenario, days: float) -> None:
        """`days` of traffic at the live percent from now on, then the clock moves past it."""
        scenario.days = max(int(days), 2)
        Store(self.engine).write(generate(scenario, self.clock.now))
        self.clock.now += scenario.days * DAY

    async def percent(self) -> float:
        store = RolloutStore(self.redis, {EXPERIMENT: 0.0})
        return (await store.get(EXPERIMENT)).percent

    async def decisions(self) -> list[DecisionRecord]:
        return list(reversed(await self.controller.store.decisions(EXPERIMENT, 100)))

    async def tick(self) -> Outcome:
        return (await self.controller.tick())[EXPERIMENT]


@pytest.fixture()
async def rig(redis_url: str, tmp_path: Path) -> AsyncIterator[Rig]:
    settings = _settings()
    engine = engine_for(f"sqlite:///{tmp_path / 'store.db'}")
    migrate(engine)
    client = aioredis.from_url(redis_url, decode_responses=True)
    clock = Clock()
    controller = Controller(settings, client, engine, owner="test-controller", clock=clock, wall=clock)
    yield Rig(settings, engine, client, clock, controller)
    await client.aclose()
    engine.dispose()


def _scenario(percent: float, seed: int, **truth: Any) -> Scenario:
    return Scenario(users=1500, schedule=[(0.0, percent)], seed=seed, **truth)


def _gate(outcome: Outcome, name: str) -> dict[str, Any]:
    assert outcome.decision.move is not None and outcome.decision.move.evidence is not None
    return next(g for g in outcome.decision.move.evidence["gates"] if g["gate"] == name)


async def test_a_healthy_treatment_goes_canary_beta_ga(rig: Rig) -> None:
    start = await rig.tick()
    assert start.decision.action == "start" and await rig.percent() == 10
    held = await rig.tick()  # no traffic yet: the phase waits, saying on what
    assert held.decision.action == "hold" and "min_duration waits" in held.decision.reason
    rig.traffic(_scenario(10, seed=1), days=3)
    promoted = await rig.tick()
    assert promoted.decision.action == "promote" and await rig.percent() == 50
    error_gate = _gate(promoted, "guardrail:error_rate")
    assert error_gate["status"] == "pass" and error_gate["figures"]["bound"] < 0.02
    assert _gate(promoted, "min_users")["figures"]["treatment"] >= 100
    rig.traffic(_scenario(50, seed=2), days=4)
    completed = await rig.tick()
    assert completed.decision.action == "complete" and await rig.percent() == 100
    assert completed.state is not None and completed.state.status == "completed"
    csat = _gate(completed, "metric:csat")
    assert csat["status"] == "pass" and csat["figures"]["always_valid_ci"][0] > -0.3
    assert (await rig.tick()).decision.action == "idle"
    actions = [(d.action, d.phase_to, d.percent_to) for d in await rig.decisions()]
    assert actions == [("start", "canary", 10), ("hold", "canary", 10), ("promote", "beta", 50),
                       ("complete", "ga", 100)]  # fmt: skip


async def test_extra_errors_roll_back_during_canary(rig: Rig) -> None:
    await rig.tick()
    rig.traffic(_scenario(10, seed=3, error_rate={"control": 0.01, "treatment": 0.08}), days=2)
    rolled = await rig.tick()
    assert rolled.decision.action == "rollback" and await rig.percent() == 0
    assert rolled.state is not None and rolled.state.status == "rolled_back"
    gate = _gate(rolled, "guardrail:error_rate")
    assert gate["status"] == "fail" and gate["figures"]["diff"] > 0.02
    last = (await rig.decisions())[-1]
    assert last.action == "rollback" and last.evidence is not None and last.percent_to == 0
    assert (await rig.tick()).decision.action == "idle"  # a person decides what next


async def test_worse_csat_stops_at_the_beta_gate(rig: Rig) -> None:
    await rig.tick()
    rig.traffic(_scenario(10, seed=4, csat_mean={"control": 4.0, "treatment": 4.0}), days=3)
    assert (await rig.tick()).decision.action == "promote"
    rig.traffic(_scenario(50, seed=5, csat_mean={"control": 4.0, "treatment": 3.2}), days=4)
    stopped = await rig.tick()
    assert stopped.decision.action == "rollback" and await rig.percent() == 0
    gate = _gate(stopped, "metric:csat")
    assert gate["status"] == "fail" and gate["figures"]["always_valid_ci"][1] < -0.3


async def test_a_sample_ratio_mismatch_halts_the_plan(rig: Rig) -> None:
    await rig.tick()
    rig.traffic(_scenario(10, seed=6, lose_treatment_events=0.5), days=3)
    halted = await rig.tick()
    assert halted.decision.action == "halt" and "sample-ratio mismatch" in halted.decision.reason
    assert await rig.percent() == 10  # the split is broken: neither promoted nor rolled back
    assert halted.state is not None and halted.state.status == "halted"


async def test_a_person_aborting_during_a_promotion_wins(rig: Rig) -> None:
    await rig.tick()
    rig.traffic(_scenario(10, seed=7), days=3)

    async def abort_first(experiment: str, decision: Any) -> None:
        assert decision.action == "promote"
        plan = rig.settings.experiments[experiment].rollout_plan
        await override(rig.controller.store, plan, experiment, "abort", by="ops", reason="pager",
                       clock_now=rig.clock(), wall_now=rig.clock())  # fmt: skip

    rig.controller.before_act = abort_first
    refused = await rig.tick()
    assert refused.decision.action == "promote" and not refused.written
    assert await rig.percent() == 0
    state = await rig.controller.store.get(EXPERIMENT)
    assert state is not None and state.status == "aborted" and state.updated_by == "ops"
    assert [d.action for d in await rig.decisions()] == ["start", "abort"]


async def test_only_the_lease_holder_acts(rig: Rig) -> None:
    other = Controller(rig.settings, rig.redis, rig.engine, owner="other", clock=rig.clock, wall=rig.clock)
    assert (await rig.controller.tick()) and (await other.tick()) == {}
    # The leader stalls past its lease and the other takes over: the stale leader's write is refused.
    await rig.redis.delete("abproxy:controller:lock")
    assert (await other.tick())[EXPERIMENT].decision.action == "hold"
    rig.traffic(_scenario(10, seed=1), days=3)
    state = await rig.controller.store.get(EXPERIMENT)
    assert state is not None
    decision = (await rig.controller.evaluate(EXPERIMENT))[2]
    assert decision.move is not None
    with pytest.raises(LostLock):
        await rig.controller.store.apply(EXPERIMENT, decision.move, expected_rev=state.rev,
                                         lock_owner=rig.controller.lock.owner, previous=state)  # fmt: skip
    assert await rig.percent() == 10
    assert (await other.tick())[EXPERIMENT].decision.action == "promote"
