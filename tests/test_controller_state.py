"""proxy.controller.state, lock and overrides against a real redis-server: one script moves a plan."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, cast

import orjson
import pytest
import redis.asyncio as aioredis

from proxy.controller.decide import enter
from proxy.controller.lock import ControllerLock
from proxy.controller.overrides import Override, OverrideRefused, override
from proxy.controller.plan import PhaseConfig
from proxy.controller.state import (
    LOCK_KEY,
    Conflict,
    LostLock,
    PlanState,
    PlanStore,
    Transition,
    decisions_key,
    plan_key,
)
from proxy.rollout import CHANNEL, RolloutStore, audit_key, state_key

EXP = "exp"
DEFAULTS = {EXP: 0.0}
PLAN = [
    PhaseConfig(name="canary", percent=5, min_duration=60),
    PhaseConfig(name="beta", percent=25, min_duration=60),
    PhaseConfig(name="ga", percent=100),
]
EVIDENCE: dict[str, Any] = {"users": {"control": 520, "treatment": 515},
                            "srm": {"p_value": 0.8, "mismatch": False, "detail": "fine"}, "gates": []}  # fmt: skip


@pytest.fixture()
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    redis = aioredis.from_url(redis_url, decode_responses=True)
    yield redis
    await redis.aclose()


@pytest.fixture()
def store(client: aioredis.Redis) -> PlanStore:
    return PlanStore(client, DEFAULTS)


def _start(by: str = "controller") -> Transition:
    return enter(PLAN, 0, action="start", by=by, reason="plan started", clock_now=100.0, wall_now=1000.0)


def _promote(index: int = 1, evidence: dict[str, Any] | None = None) -> Transition:
    move = enter(PLAN, index, action="promote", by="controller", reason="every gate passed", clock_now=200.0,
                 wall_now=2000.0)  # fmt: skip
    return replace(move, evidence=evidence)


async def _snapshot(client: aioredis.Redis) -> dict[str, Any]:
    """Everything a transition may write."""
    return {
        "plan": await client.hgetall(plan_key(EXP)),
        "decisions": await client.xlen(decisions_key(EXP)),
        "rollout": await client.hgetall(state_key(EXP)),
        "audit": await client.xlen(audit_key(EXP)),
    }


async def _audit(client: aioredis.Redis, count: int | None = None) -> list[tuple[str, dict[str, str]]]:
    """The rollout audit stream, newest first."""
    return cast(list[tuple[str, dict[str, str]]], await client.xrevrange(audit_key(EXP), count=count))


async def _next_message(pubsub: Any, timeout: float = 2.0) -> dict[str, Any] | None:
    """The next published message (get_message returns None for the subscribe confirmation)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        message: dict[str, Any] | None = await pubsub.get_message(timeout=0.1)
        if message is not None:
            return message
    return None


async def _started(store: PlanStore, client: aioredis.Redis, owner: str = "ctl-a") -> PlanState:
    await client.set(LOCK_KEY, owner)
    return await store.apply(EXP, _start(), expected_rev=-1, lock_owner=owner, previous=None)


class TestApply:
    async def test_writes_plan_percent_audit_decision_and_publishes(
        self, store: PlanStore, client: aioredis.Redis
    ) -> None:
        started = await _started(store, client)
        assert (started.phase, started.status, started.rev) == (0, "running", 0)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(CHANNEL)
        try:
            after = await store.apply(EXP, _promote(evidence=EVIDENCE), expected_rev=0, lock_owner="ctl-a",
                                      previous=started)  # fmt: skip
            message = await _next_message(pubsub)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
        assert message is not None and message["channel"] == CHANNEL
        published = orjson.loads(message["data"])
        assert (published["experiment"], published["percent"], published["updated_by"]) == (EXP, "25", "controller")

        assert (after.phase, after.phase_name, after.status, after.rev) == (1, "beta", "running", 1)
        assert await store.get(EXP) == after  # what apply returns is what Redis holds
        plan = await client.hgetall(plan_key(EXP))
        assert plan["status"] == "running" and plan["rev"] == "1" and plan["reason"] == "every gate passed"
        assert (float(plan["entered_at"]), float(plan["data_since"])) == (200.0, 2000.0)

        rollout = await client.hgetall(state_key(EXP))
        assert rollout["percent"] == "25" and rollout["updated_by"] == "controller"
        audit = await _audit(client)
        assert [(e["from"], e["to"]) for _, e in audit] == [("5", "25"), ("0", "5")]
        assert orjson.loads(audit[0][1]["evidence"]) == EVIDENCE
        assert "evidence" not in audit[1][1]  # the start had none

        records = await store.decisions(EXP)
        assert [r.action for r in records] == ["promote", "start"]  # newest first
        newest = records[0]
        assert (newest.phase_from, newest.phase_to, newest.status) == ("canary", "beta", "running")
        assert (newest.percent_from, newest.percent_to, newest.rev) == (5.0, 25.0, 1)
        assert newest.evidence == EVIDENCE and newest.by == "controller"
        assert (records[1].phase_from, records[1].evidence, records[1].percent_from) == (None, None, 0.0)

    async def test_percent_none_leaves_the_live_percent(self, store: PlanStore, client: aioredis.Redis) -> None:
        started = await _started(store, client)
        halt = Transition("halt", 0, "canary", "halted", 100.0, 1000.0, None, "controller", "srm", EVIDENCE)
        after = await store.apply(EXP, halt, expected_rev=started.rev, lock_owner="ctl-a", previous=started)
        assert after.status == "halted"
        assert (await client.hgetall(state_key(EXP)))["percent"] == "5"
        assert await client.xlen(audit_key(EXP)) == 1  # only the start's
        newest = (await store.decisions(EXP))[0]
        assert (newest.action, newest.percent_from, newest.percent_to, newest.evidence) == ("halt", 5.0, 5.0,
                                                                                         EVIDENCE)  # fmt: skip

    async def test_stale_revision_is_a_conflict_and_writes_nothing(
        self, store: PlanStore, client: aioredis.Redis
    ) -> None:
        started = await _started(store, client)
        await store.apply(EXP, _promote(), expected_rev=started.rev, lock_owner="ctl-a", previous=started)
        before = await _snapshot(client)
        with pytest.raises(Conflict, match="revision 1"):
            await store.apply(EXP, _promote(2), expected_rev=started.rev, lock_owner="ctl-a", previous=started)
        with pytest.raises(Conflict):  # "no plan yet" when there is one
            await store.apply(EXP, _start(), expected_rev=-1, lock_owner="ctl-a", previous=None)
        assert await _snapshot(client) == before

    async def test_a_writer_that_does_not_hold_the_lock_writes_nothing(
        self, store: PlanStore, client: aioredis.Redis
    ) -> None:
        started = await _started(store, client, owner="ctl-a")
        before = await _snapshot(client)
        with pytest.raises(LostLock):
            await store.apply(EXP, _promote(), expected_rev=started.rev, lock_owner="ctl-b", previous=started)
        await client.delete(LOCK_KEY)
        with pytest.raises(LostLock):  # nobody holds it
            await store.apply(EXP, _promote(), expected_rev=started.rev, lock_owner="ctl-a", previous=started)
        assert await _snapshot(client) == before

    async def test_rollout_store_reads_the_new_percent(self, store: PlanStore, client: aioredis.Redis) -> None:
        rollout = RolloutStore(client, DEFAULTS)
        assert (await rollout.get(EXP)).source == "config"
        started = await _started(store, client)
        state = await rollout.get(EXP)
        assert (state.percent, state.source, state.updated_by) == (5.0, "redis", "controller")
        await store.apply(EXP, _promote(), expected_rev=started.rev, lock_owner="ctl-a", previous=started)
        state = await rollout.get(EXP)
        assert (state.percent, state.rev) == (25.0, 2)
        assert [(a.from_percent, a.to_percent) for a in await rollout.audit(EXP)] == [(5.0, 25.0), (0.0, 5.0)]

    async def test_a_hand_set_percent_is_the_from_of_the_next_transition(
        self, store: PlanStore, client: aioredis.Redis
    ) -> None:
        await RolloutStore(client, DEFAULTS).set_percent(EXP, 2.5, by="alice", reason="by hand")
        await _started(store, client)
        newest = (await store.decisions(EXP))[0]
        assert (newest.percent_from, newest.percent_to) == (2.5, 5.0)

    async def test_note_records_a_hold_at_the_same_revision(self, store: PlanStore, client: aioredis.Redis) -> None:
        started = await _started(store, client)
        await store.note(started, action="hold", by="controller", reason="waiting", evidence=EVIDENCE, percent=5.0)
        records = await store.decisions(EXP)
        assert [(r.action, r.rev, r.evidence) for r in records] == [("hold", 0, EVIDENCE), ("start", 0, None)]
        assert (await store.get(EXP)) == started

    async def test_decisions_count_limits_newest_first(self, store: PlanStore, client: aioredis.Redis) -> None:
        state = await _started(store, client)
        state = await store.apply(EXP, _promote(1), expected_rev=state.rev, lock_owner="ctl-a", previous=state)
        await store.apply(EXP, _promote(2), expected_rev=state.rev, lock_owner="ctl-a", previous=state)
        assert [r.rev for r in await store.decisions(EXP)] == [2, 1, 0]
        assert [r.phase_to for r in await store.decisions(EXP, count=2)] == ["ga", "beta"]
        assert await store.decisions("other") == []


class TestLock:
    async def test_one_holder_at_a_time_and_release(self, client: aioredis.Redis) -> None:
        first, second = ControllerLock(client, "ctl-a", 30), ControllerLock(client, "ctl-b", 30)
        assert await first.hold()
        assert await first.hold()  # renewing
        assert not await second.hold()
        assert await second.holder() == "ctl-a"
        await second.release()  # not its lock: nothing happens
        assert await first.holder() == "ctl-a"
        await first.release()
        assert await first.holder() is None
        assert await second.hold()
        assert not await first.hold()

    async def test_lease_expiry_hands_over_and_fences_the_old_leader(
        self, store: PlanStore, client: aioredis.Redis
    ) -> None:
        first, second = ControllerLock(client, "ctl-a", 0.2), ControllerLock(client, "ctl-b", 0.2)
        assert await first.hold()
        started = await store.apply(EXP, _start(), expected_rev=-1, lock_owner=first.owner, previous=None)
        assert not await second.hold()
        await asyncio.sleep(0.3)  # the first stalls past its lease
        assert await second.hold()
        before = await _snapshot(client)
        with pytest.raises(LostLock):  # it wakes up believing it leads: Redis refuses
            await store.apply(EXP, _promote(), expected_rev=started.rev, lock_owner=first.owner, previous=started)
        assert await _snapshot(client) == before
        assert not await first.hold()
        after = await store.apply(EXP, _promote(), expected_rev=started.rev, lock_owner=second.owner,
                                  previous=started)  # fmt: skip
        assert after.phase_name == "beta"

    async def test_unreachable_redis_is_not_leading(self, closed_port: int) -> None:
        redis = aioredis.from_url(f"redis://127.0.0.1:{closed_port}/0", decode_responses=True,
                                  socket_connect_timeout=0.5)  # fmt: skip
        try:
            lock = ControllerLock(redis, "ctl-a", 30)
            assert not await lock.hold()
            assert await lock.holder() is None
            await lock.release()
        finally:
            await redis.aclose()


async def _override(store: PlanStore, action: Override, by: str = "alice") -> PlanState:
    return await override(store, PLAN, EXP, action, by=by, reason="because", clock_now=500.0, wall_now=5000.0)


async def _percent(client: aioredis.Redis) -> str | None:
    value = await client.hget(state_key(EXP), "percent")
    return value if isinstance(value, str) else None


class TestOverrides:
    async def test_pause_and_resume_keep_the_phase_and_window(self, store: PlanStore, client: aioredis.Redis) -> None:
        started = await _started(store, client)
        paused = await _override(store, "pause")
        assert (paused.status, paused.phase, paused.rev) == ("paused", 0, started.rev + 1)
        assert (paused.entered_at, paused.data_since) == (started.entered_at, started.data_since)
        assert await _percent(client) == "5"
        resumed = await _override(store, "resume")
        assert (resumed.status, resumed.phase, resumed.entered_at, resumed.data_since) == (
            "running", 0, started.entered_at, started.data_since)  # fmt: skip
        assert await _percent(client) == "5"
        newest = (await store.decisions(EXP))[0]
        assert (newest.action, newest.by) == ("resume", "alice")
        assert newest.reason == "resume by alice: because"

    @pytest.mark.parametrize("status", ["halted", "rolled_back"])
    async def test_resume_after_a_halt_or_rollback_refreshes_the_window(
        self, store: PlanStore, client: aioredis.Redis, status: Any
    ) -> None:
        started = await _started(store, client)
        state = await store.apply(EXP, _promote(), expected_rev=started.rev, lock_owner="ctl-a", previous=started)
        percent = 0.0 if status == "rolled_back" else None
        stop = Transition("x", 1, "beta", status, 200.0, 2000.0, percent, "controller", "bad", EVIDENCE)
        await store.apply(EXP, stop, expected_rev=state.rev, lock_owner="ctl-a", previous=state)
        resumed = await _override(store, "resume")
        assert (resumed.status, resumed.phase, resumed.phase_name) == ("running", 1, "beta")
        assert (resumed.entered_at, resumed.data_since) == (500.0, 5000.0)
        assert await _percent(client) == "25"

    async def test_resume_or_promote_without_a_plan_starts_it(self, store: PlanStore, client: aioredis.Redis) -> None:
        resumed = await _override(store, "resume")
        assert (resumed.status, resumed.phase, resumed.rev) == ("running", 0, 0)
        assert (await store.decisions(EXP))[0].action == "start"
        await client.flushdb()
        promoted = await _override(store, "promote")
        assert (promoted.status, promoted.phase) == ("running", 0)
        assert await _percent(client) == "5"

    async def test_promote_moves_on_whatever_the_gates_say(self, store: PlanStore, client: aioredis.Redis) -> None:
        await _started(store, client)
        promoted = await _override(store, "promote")
        assert (promoted.status, promoted.phase_name, promoted.entered_at, promoted.data_since) == (
            "running", "beta", 500.0, 5000.0)  # fmt: skip
        assert await _percent(client) == "25"
        completed = await _override(store, "promote")
        assert (completed.status, completed.phase_name) == ("completed", "ga")
        assert (await store.decisions(EXP))[0].action == "complete"
        assert await _percent(client) == "100"

    async def test_abort_goes_to_zero_and_resume_restarts_at_the_first_phase(
        self, store: PlanStore, client: aioredis.Redis
    ) -> None:
        started = await _started(store, client)
        await store.apply(EXP, _promote(), expected_rev=started.rev, lock_owner="ctl-a", previous=started)
        aborted = await _override(store, "abort")
        assert (aborted.status, aborted.phase_name) == ("aborted", "beta")
        assert await _percent(client) == "0"
        audit = await _audit(client, count=1)
        assert (audit[0][1]["from"], audit[0][1]["to"], audit[0][1]["by"]) == ("25", "0", "alice")
        with pytest.raises(OverrideRefused, match="already aborted"):
            await _override(store, "abort")
        resumed = await _override(store, "resume")
        assert (resumed.status, resumed.phase, resumed.phase_name) == ("running", 0, "canary")
        assert await _percent(client) == "5"

    async def test_abort_before_the_start_keeps_it_from_starting(self, client: aioredis.Redis) -> None:
        store = PlanStore(client, {EXP: 10.0})  # the config's rollout_percent holds until a write
        aborted = await _override(store, "abort")
        assert (aborted.status, aborted.phase) == ("aborted", 0)
        assert await _percent(client) == "0"
        assert (await store.decisions(EXP))[0].percent_from == 10.0
        assert (await _override(store, "resume")).phase_name == "canary"
        assert await _percent(client) == "5"

    async def test_abort_a_completed_plan(self, store: PlanStore, client: aioredis.Redis) -> None:
        await _started(store, client)
        await _override(store, "promote")
        await _override(store, "promote")
        aborted = await _override(store, "abort")
        assert (aborted.status, aborted.phase_name) == ("aborted", "ga")
        assert await _percent(client) == "0"

    async def test_refusals_write_nothing(self, store: PlanStore, client: aioredis.Redis) -> None:
        with pytest.raises(OverrideRefused, match="not started"):
            await _override(store, "pause")
        await _started(store, client)
        with pytest.raises(OverrideRefused, match="already running"):
            await _override(store, "resume")
        await _override(store, "pause")
        before = await _snapshot(client)
        with pytest.raises(OverrideRefused, match="paused, not running"):
            await _override(store, "pause")
        assert await _snapshot(client) == before
        await _override(store, "resume")
        await _override(store, "promote")
        await _override(store, "promote")  # completed
        before = await _snapshot(client)
        for action in ("pause", "resume", "promote"):
            with pytest.raises(OverrideRefused, match="completed"):
                await _override(store, action)
        assert await _snapshot(client) == before
        with pytest.raises(OverrideRefused, match="no rollout_plan"):
            await override(store, [], EXP, "abort", by="alice", reason="x", clock_now=0.0, wall_now=0.0)

    async def test_promote_in_the_last_phase_is_refused(self, store: PlanStore, client: aioredis.Redis) -> None:
        await client.set(LOCK_KEY, "ctl-a")
        last = enter(PLAN, 2, action="resume", by="alice", reason="x", clock_now=0.0, wall_now=0.0)
        last = replace(last, status="paused")
        await store.apply(EXP, last, expected_rev=-1, lock_owner=None, previous=None)
        with pytest.raises(OverrideRefused, match="is the last"):
            await _override(store, "promote")

    async def test_an_override_after_a_controller_write_applies_on_top(
        self, store: PlanStore, client: aioredis.Redis
    ) -> None:
        started = await _started(store, client)
        promoted = await store.apply(EXP, _promote(), expected_rev=started.rev, lock_owner="ctl-a", previous=started)
        paused = await _override(store, "pause")
        assert (paused.rev, paused.phase_name, paused.status) == (promoted.rev + 1, "beta", "paused")

    async def test_a_person_wins_over_a_decision_made_before(self, store: PlanStore, client: aioredis.Redis) -> None:
        started = await _started(store, client)
        await _override(store, "abort")
        before = await _snapshot(client)
        with pytest.raises(Conflict):  # the controller decided to promote on the revision before the abort
            await store.apply(EXP, _promote(), expected_rev=started.rev, lock_owner="ctl-a", previous=started)
        assert await _snapshot(client) == before
        assert await _percent(client) == "0"

    async def test_an_override_retries_when_the_controller_writes_in_between(self, client: aioredis.Redis) -> None:
        """The controller promotes after the person's read: the person's abort is applied on top of it."""

        class RacingStore(PlanStore):
            raced = False

            async def get(self, experiment: str) -> PlanState | None:
                seen = await super().get(experiment)
                if not self.raced and seen is not None:
                    self.raced = True
                    await self.apply(experiment, _promote(), expected_rev=seen.rev, lock_owner="ctl-a",
                                     previous=seen)  # fmt: skip
                return seen  # stale now

        store = RacingStore(client, DEFAULTS)
        started = await _started(store, client)
        aborted = await _override(store, "abort")
        assert store.raced
        assert (aborted.status, aborted.phase_name, aborted.rev) == ("aborted", "beta", started.rev + 2)
        assert await _percent(client) == "0"
        assert [r.action for r in await store.decisions(EXP)] == ["abort", "promote", "start"]

    async def test_an_override_gives_up_when_the_plan_keeps_changing(self, client: aioredis.Redis) -> None:
        class AlwaysRacing(PlanStore):
            async def get(self, experiment: str) -> PlanState | None:
                seen = await super().get(experiment)
                assert seen is not None
                note = Transition("x", seen.phase, seen.phase_name, seen.status, seen.entered_at, seen.data_since,
                                  None, "controller", "churn")  # fmt: skip
                await self.apply(experiment, note, expected_rev=seen.rev, lock_owner="ctl-a", previous=seen)
                return seen

        store = AlwaysRacing(client, DEFAULTS)
        await _started(store, client)
        with pytest.raises(OverrideRefused, match="kept changing"):
            await _override(store, "pause")
        assert (await PlanStore(client, DEFAULTS).get(EXP)).status == "running"  # type: ignore[union-attr]


async def test_promote_is_refused_on_an_aborted_plan(redis_url: str) -> None:
    """An abort stops the plan until resumed; promoting it would jump past the aborted phase."""
    client = aioredis.from_url(redis_url, decode_responses=True)
    try:
        store = PlanStore(client, DEFAULTS)
        await override(store, PLAN, EXP, "abort", by="ops", reason="stop", clock_now=1.0, wall_now=1.0)
        with pytest.raises(OverrideRefused, match="resume it"):
            await override(store, PLAN, EXP, "promote", by="ops", reason="go", clock_now=2.0, wall_now=2.0)
    finally:
        await client.aclose()
