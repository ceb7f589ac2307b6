"""The rollout controller under network faults and crashes, against real processes: a real redis-server,
two `abproxy controller` processes, each talking to Redis through its own tests/faultproxy.py.

The plan is short (canary, beta, ga: seconds each) and the lease 3 s, so each fault is over in seconds:
- A leads; its link is partitioned the moment it sends a write (a promotion, or the note of a hold) and
  stays cut until B holds the lease. A still believes it leads. When the link heals, the held write
  reaches Redis and is refused (LostLock); A becomes a follower; B finishes the plan.
- A's Redis turns slower than the lease (each command's round trip longer than it) in the middle of a
  round: A's next write is refused the same way.
- A is SIGKILLed with its promotion in flight: the write is lost with it, or reaches Redis after A died.
  Either way the promotion happened completely or not at all, and B finishes the plan from there.

Checked every time, from Redis alone and from each controller's own log lines:
- Redis is consistent at every moment sampled (about every 20 ms, one MULTI), not only at the end: the
  plan's revision, phase, status and reason are those of the last transition in the decision stream,
  whose revisions run 0, 1, 2 with no gap or repeat; the live percent is that transition's, and the
  rollout audit holds exactly one entry per change of percent, in order; every hold is at the revision
  and phase in force.
- Each step is taken once: start, promote, complete, revisions 0, 1, 2; the audit 0 -> 10 -> 50 -> 100.
- Each decision was written by the then-owner: the stream is A's logged decisions, then B's, in order;
  A logs none after the fault.
- B took the lease only after A's ran out: B is first seen holding it (by Redis's clock) no earlier than
  A's last lease expiry, and A's lease was never renewed through the partition.
No timing is asserted: every wait is generous and bounded by what it waits for.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
import redis.asyncio as aioredis
import yaml
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy.controller.decide import enter
from proxy.controller.plan import PhaseConfig
from proxy.controller.state import LOCK_KEY, Conflict, LostLock, PlanStore, decisions_key, plan_key
from proxy.errors import StateUnavailable
from proxy.rollout import audit_key, state_key
from proxy.store.db import engine_for, migrate
from tests.faultproxy import FaultProxy
from tests.harness import MockUpstream, Process, RedisServer, free_port, outcomes_config, wait_until

EXPERIMENT = "sales-companion"
LEASE_S = 3
# A's Redis client waits out a held write (the controller's own timeout is 5 s, retried) so the answer it gets
# is the fencing's, not a timeout: the partition stands for any stall past the lease (a GC pause, a slow query).
PATIENT = "?socket_timeout=30"
DONE = [("start", "canary", 0, 0.0, 10.0), ("promote", "beta", 1, 10.0, 50.0), ("complete", "ga", 2, 50.0, 100.0)]


def _plan(canary_s: float) -> list[dict[str, Any]]:
    return [{"name": "canary", "percent": 10, "min_duration": f"{canary_s:g}s"},
            {"name": "beta", "percent": 50, "min_duration": "2s"}, {"name": "ga", "percent": 100}]  # fmt: skip


class Controller:
    """One `abproxy controller` process, its Redis link through a FaultProxy, and its metrics."""

    def __init__(self, name: str, config: Path, store: str, redis_port: int, tmp_path: Path, *, patient: bool) -> None:
        self.name = name
        self.fault = FaultProxy("127.0.0.1", redis_port)
        self.metrics_port = free_port()
        env = {"REDIS_URL": self.fault.url + (PATIENT if patient else ""), "ABPROXY_STORE_URL": store}
        argv = [sys.executable, "-m", "proxy", "controller", "--config", str(config), "--metrics-port",
                str(self.metrics_port)]  # fmt: skip
        self.process = Process(f"controller-{name}", argv, tmp_path, env)

    def start(self) -> None:
        self.process.start()

    @property
    def pid(self) -> int:
        assert self.process.proc is not None
        return self.process.proc.pid

    def running(self) -> bool:
        if not self.process.alive:
            raise RuntimeError(f"controller {self.name} exited\n{self.process.logs()}")
        return True

    def owns(self, holder: str | None) -> bool:
        """Whether a lock value is this process's owner id (host-pid-random)."""
        return holder is not None and f"-{self.pid}-" in holder

    def lines(self, event: str) -> list[dict[str, Any]]:
        """This process's JSON log lines (stderr) of one event."""
        path = self.process.stderr_path
        text = path.read_text(errors="replace") if path.exists() else ""
        found = []
        for line in text.split("\n")[:-1]:  # complete lines only: the process may be writing the last one now
            if line.startswith("{"):
                record = orjson.loads(line)
                if record.get("event") == event:
                    found.append(record)
        return found

    def decisions(self) -> list[tuple[str, str, str]]:
        """The decisions this process wrote, as it logged them after Redis accepted each."""
        return [(r["action"], r["phase"], r["status"]) for r in self.lines("rollout_decision")]

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0

    def stop(self) -> None:
        self.process.stop()
        self.fault.close()


class Watch:
    """Samples Redis in one MULTI about every 20 ms from a thread, while in its `with`: the lock with Redis's
    clock, and whether the plan, the decisions, the percent and the audit agree (see `inconsistencies`)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.locks: list[tuple[float, str | None, float | None]] = []  # (Redis time ms, holder, lease expiry ms)
        self.problems: list[str] = []
        self.samples = 0
        self.plan_status: str | None = None  # as of the latest sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def snapshot(self) -> dict[str, Any]:
        pipe = self.client.pipeline(transaction=True)
        pipe.time()
        pipe.get(LOCK_KEY)
        pipe.pexpiretime(LOCK_KEY)  # the lease's expiry itself, to the ms: now + PTTL jitters with the clock read
        pipe.hgetall(plan_key(EXPERIMENT))
        pipe.hgetall(state_key(EXPERIMENT))
        pipe.xrange(decisions_key(EXPERIMENT))
        pipe.xrange(audit_key(EXPERIMENT))
        (secs, micros), holder, expires_at, plan, rollout, decisions, audit = pipe.execute()
        now_ms = secs * 1000 + micros / 1000
        return {"now_ms": now_ms, "holder": holder, "expiry_ms": expires_at if expires_at > 0 else None, "plan": plan,
                "rollout": rollout, "decisions": [_record(f) for _, f in decisions],
                "audit": [(float(f["from"]), float(f["to"])) for _, f in audit]}  # fmt: skip

    def _run(self) -> None:
        last: tuple[int, int, str] | None = None
        while not self._stop.is_set():
            try:
                snap = self.snapshot()
            except redis.RedisError as exc:
                self.problems.append(f"the watch could not read Redis: {exc}")
                return
            self.samples += 1
            self.locks.append((snap["now_ms"], snap["holder"], snap["expiry_ms"]))
            self.plan_status = snap["plan"].get("status")
            seen = (len(snap["decisions"]), len(snap["audit"]), snap["plan"].get("rev", ""))
            if seen != last:  # judge each state once
                last = seen
                self.problems += inconsistencies(snap)
            self._stop.wait(0.02)

    def redis_ms(self) -> float:
        """Redis's clock now: the samples whose MULTI ran after this read carry a later time."""
        secs, micros = self.client.time()
        return float(secs * 1000 + micros / 1000)

    def handover(self, old: Controller, new: Controller, since_ms: float) -> None:
        """The lease went from `old` to `new` once, and only after `old`'s ran out (by Redis's clock); in
        the samples Redis took from `since_ms` on (the fault), `old` never renewed it. By Redis's clock, not
        by sample count: a sample read just before the fault may be appended just after it."""
        runs: list[str] = []
        for _, holder, _ in self.locks:
            who = old.name if old.owns(holder) else new.name if new.owns(holder) else "-" if holder is None else "?"
            if not runs or runs[-1] != who:
                runs.append(who)
        assert [r for r in runs if r != "-"] == [old.name, new.name], f"lease holders over time: {runs}"
        expiries = [e for _, h, e in self.locks if old.owns(h) and e is not None]
        first_new = next(t for t, h, _ in self.locks if new.owns(h))
        # TIME is read live, the expiry checked against the command's clock: 2 ms of slack, against a 3,000 ms lease.
        assert first_new >= max(expiries) - 2, f"{new.name} held the lease {max(expiries) - first_new:.0f} ms early"
        after = {e for t, h, e in self.locks if t >= since_ms and old.owns(h) and e is not None}
        assert len(after) <= 1, f"{old.name} renewed through the fault: {after}"


def _record(fields: dict[str, str]) -> dict[str, Any]:
    d = orjson.loads(fields["decision"])
    return {"action": d["action"], "phase_to": d["phase_to"], "status": d["status"], "reason": d["reason"],
            "rev": int(fields["rev"]), "from": float(fields["percent_from"]),
            "to": float(fields["percent_to"])}  # fmt: skip


def inconsistencies(snap: dict[str, Any]) -> list[str]:
    """What disagrees in one atomic snapshot of the plan, its decisions, the live percent and its audit."""
    plan, rollout, decisions, audit = snap["plan"], snap["rollout"], snap["decisions"], snap["audit"]
    moves = [d for d in decisions if d["action"] != "hold"]
    problems = []
    if [m["rev"] for m in moves] != list(range(len(moves))):
        problems.append(f"transition revisions {[m['rev'] for m in moves]}: a step twice or skipped")
    if not moves:
        if plan or audit or "percent" in rollout or decisions:
            problems.append(f"no transition, yet plan {plan}, percent {rollout}, audit {audit}, {decisions}")
        return problems
    last = moves[-1]
    shown = (plan.get("rev"), plan.get("phase_name"), plan.get("status"), plan.get("reason"))
    if shown != (str(last["rev"]), last["phase_to"], last["status"], last["reason"]):
        problems.append(f"plan {shown} is not the last transition {last}")
    if float(rollout.get("percent", "nan")) != last["to"]:
        problems.append(f"percent {rollout.get('percent')} is not the last transition's {last['to']}")
    changes = [(m["from"], m["to"]) for m in moves if m["from"] != m["to"]]
    if audit != changes:
        problems.append(f"audit {audit} is not the transitions' changes of percent {changes}")
    if int(rollout.get("rev", -1)) != len(audit):
        problems.append(f"the rollout's revision {rollout.get('rev')} is not its {len(audit)} audit entries")
    current = None
    for d in decisions:
        if d["action"] != "hold":
            current = d
        elif current is None or (d["rev"], d["phase_to"]) != (current["rev"], current["phase_to"]):
            problems.append(f"a hold at rev {d['rev']} in {d['phase_to']} after {current}: a stale decision")
    return problems


def assert_done_once(watch: Watch) -> dict[str, Any]:
    """The plan finished with each step taken once, Redis consistent at every sample and at the end."""
    snap = watch.snapshot()
    moves = [(d["action"], d["phase_to"], d["rev"], d["from"], d["to"]) for d in snap["decisions"]
             if d["action"] != "hold"]  # fmt: skip
    assert moves == DONE, moves
    assert snap["audit"] == [(0.0, 10.0), (10.0, 50.0), (50.0, 100.0)]
    assert float(snap["rollout"]["percent"]) == 100
    assert (snap["plan"]["status"], snap["plan"]["rev"]) == ("completed", "2")
    assert inconsistencies(snap) == []
    assert watch.samples > 10 and watch.problems == [], watch.problems[:5]
    return snap


def _shown(snap: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(d["action"], d["phase_to"], d["status"]) for d in snap["decisions"]]


class Rig:
    """A redis-server, a migrated SQLite store, and (from `controllers`) a config with a short plan and two
    controllers not yet started: A, whose client waits out a partition, and B."""

    def __init__(self, redis_server: RedisServer, redis_url: str, tmp_path: Path) -> None:
        self.redis_port = redis_server.port
        self.tmp_path = tmp_path
        self.client = redis.Redis.from_url(redis_url, decode_responses=True)
        self.watch = Watch(self.client)
        self.store = f"sqlite:///{tmp_path / 'store.db'}"
        engine = engine_for(self.store)
        migrate(engine)  # as `abproxy collect` would: the controller reads the phase's traffic from it
        engine.dispose()
        self.started: list[Controller] = []

    def controllers(self, canary_s: float) -> tuple[Controller, Controller]:
        # Never started: a controller calls no upstream, the config only names the models.
        config = outcomes_config(MockUpstream("base", self.tmp_path), MockUpstream("finetuned", self.tmp_path))
        config["experiments"][EXPERIMENT]["rollout_plan"] = _plan(canary_s)
        config["controller"] = {"interval_s": 0.5, "lease_s": LEASE_S}
        config_file = self.tmp_path / "controller.yaml"
        config_file.write_text(yaml.safe_dump(config))
        a = Controller("A", config_file, self.store, self.redis_port, self.tmp_path, patient=True)
        b = Controller("B", config_file, self.store, self.redis_port, self.tmp_path, patient=False)
        self.started += [a, b]
        return a, b

    def holder(self) -> str | None:
        value = self.client.get(LOCK_KEY)
        return value if isinstance(value, str) else None

    def plan(self, field: str) -> str | None:
        value = self.client.hget(plan_key(EXPERIMENT), field)
        return value if isinstance(value, str) else None

    def lead(self, a: Controller) -> None:
        """Start A and wait until it holds the lease and so started the plan."""
        a.start()
        wait_until(lambda: a.running() and a.owns(self.holder()), timeout=30, what="A to take the lease")
        wait_until(lambda: self.plan("phase_name") == "canary", timeout=15, what="the plan to start")

    def follow(self, b: Controller, *, as_follower: bool = True) -> None:
        """Start B and wait for its first round: as a follower (A still leads), or either way when A's fault may
        already be under way (B may then start after A's lease ran out, and lead from its first round)."""
        b.start()
        roles = ["follower"] if as_follower else ["follower", "leader"]
        wait_until(lambda: b.running() and sum(b.metric("abproxy_controller_ticks_total", role=r) for r in roles) > 0,
                   timeout=30, what="B to run")  # fmt: skip

    def completed(self) -> None:
        wait_until(lambda: self.plan("status") == "completed", timeout=40, what="B to finish the plan")
        # A leader can take the lease and finish the plan in one round, between two of the watch's samples
        # (CI saw holders A, then none): keep watching until a sample shows the end, which B, still
        # leading, holds the lease through.
        wait_until(lambda: self.watch.plan_status == "completed", timeout=10, what="the watch to see the end")

    def close(self) -> None:
        for c in self.started:
            c.stop()
            print(c.process.logs())  # shown when the test fails
        self.client.close()


@pytest.fixture()
def rig(redis_server: RedisServer, redis_url: str, tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(redis_server, redis_url, tmp_path)
    try:
        yield rig
    finally:
        rig.close()


def _carries_on_as_follower(a: Controller) -> None:
    followed = a.metric("abproxy_controller_ticks_total", role="follower")
    wait_until(lambda: a.metric("abproxy_controller_ticks_total", role="follower") > followed, timeout=15,
               what="A to carry on as a follower")  # fmt: skip
    assert a.metric("abproxy_controller_leader") == 0


@pytest.mark.parametrize("caught", ["promote", "hold"])
def test_a_partitioned_leaders_write_is_refused_and_the_other_leads_after_its_lease(rig: Rig, caught: str) -> None:
    """A's link is cut the moment it sends a write: its promotion (armed before B starts, so A promotes when
    the canary's 5 s are up), or the note of a hold (armed once B follows; the canary lasts 8 s)."""
    a, b = rig.controllers(canary_s=5 if caught == "promote" else 8)
    with rig.watch as watch:
        rig.lead(a)
        if caught == "hold":
            rig.follow(b)
        cut = a.fault.partition_on(f'"action":"{caught}"'.encode())  # orjson: no space after the colon
        if caught == "promote":
            rig.follow(b, as_follower=False)
        assert cut.wait(30), "A never sent the write"
        since = watch.redis_ms()
        logged_before = a.decisions()  # A waits on the held write: it logs nothing more until answered
        wait_until(lambda: b.owns(rig.holder()), timeout=30, what="B to take the lease")
        assert a.metric("abproxy_controller_leader") == 1  # A still believes it leads
        a.fault.heal()  # the held write reaches Redis now, and A gets Redis's answer
        wait_until(lambda: a.lines("controller_lost_lock") or a.decisions() != logged_before, timeout=30,
                   what="Redis to answer A's write")  # fmt: skip
        assert a.decisions() == logged_before, "A wrote a decision after its lease ran out"
        assert a.metric("abproxy_controller_refused_total", experiment=EXPERIMENT, why="lost_lock") == 1
        rig.completed()
        _carries_on_as_follower(a)
    snap = assert_done_once(watch)
    assert a.decisions() == logged_before
    assert _shown(snap) == logged_before + b.decisions()  # each written once, by the then-owner, in order
    if caught == "promote":
        assert ("promote", "beta", "running") in b.decisions()
    watch.handover(a, b, since)
    assert not b.lines("controller_lost_lock")


def test_a_leader_slowed_past_its_lease_is_refused_and_the_other_leads(rig: Rig) -> None:
    """From A's next read of the plan on, each command's round trip takes 3.2 s, longer than the 3 s lease.
    A renewed just before that read, so its write (the promotion: the canary's 3 s are up by then) lands
    after the lease ran out, and is refused. The fault is armed before B starts: a loaded machine took over
    5 s to start B (CI), long enough for A to finish the whole plan before the fault, so B may then lead
    from its first round."""
    a, b = rig.controllers(canary_s=3)
    with rig.watch as watch:
        rig.lead(a)
        slow = a.fault.latency_on(b"HGETALL", 1600)
        assert slow.wait(30), "A never read the plan"
        since = watch.redis_ms()
        logged_before = a.decisions()  # A waits on the slowed read: it logs nothing more until answered
        rig.follow(b, as_follower=False)
        wait_until(lambda: a.lines("controller_lost_lock") or a.decisions() != logged_before, timeout=40,
                   what="Redis to answer A's write")  # fmt: skip
        assert a.decisions() == logged_before, "A wrote a decision after its lease ran out"
        a.fault.heal()
        rig.completed()
        _carries_on_as_follower(a)
    snap = assert_done_once(watch)
    assert _shown(snap) == logged_before + b.decisions()
    watch.handover(a, b, since)


@pytest.mark.parametrize("write", ["lost", "delivered"])
def test_a_leader_killed_mid_promotion_leaves_it_whole_or_undone(rig: Rig, write: str) -> None:
    """A sends its promotion; the link holds it; A is SIGKILLed. Then the write is lost with the link
    (reset), or reaches Redis from the dead process (heal), as TCP delivers bytes sent before a crash."""
    a, b = rig.controllers(canary_s=5)
    with rig.watch as watch:
        rig.lead(a)
        cut = a.fault.partition_on(b'"action":"promote"')
        rig.follow(b, as_follower=False)
        assert cut.wait(30), "A never sent the promotion"
        since = watch.redis_ms()
        logged_before = a.decisions()
        a.process.kill()
        landed = False
        if write == "lost":
            a.fault.reset()
        else:
            # Within A's lease the dead process's promotion is applied; past it, refused. Either is whole.
            lease_left = rig.client.pttl(LOCK_KEY) if a.owns(rig.holder()) else 0
            a.fault.heal()
            wait_until(lambda: a.fault.connections == 0, timeout=15, what="the held write to be delivered")
            landed = rig.plan("phase_name") == "beta"
            if lease_left > 1000:
                assert landed, "the promotion reached Redis within A's lease, yet was not applied"
        rig.completed()
    snap = assert_done_once(watch)
    assert a.decisions() == logged_before  # killed before it could log the promotion
    dead = [("promote", "beta", "running")] if landed else []
    assert _shown(snap) == logged_before + dead + b.decisions()
    assert (("promote", "beta", "running") in b.decisions()) is not landed  # B never repeats it
    watch.handover(a, b, since)


async def test_a_hold_is_noted_only_by_the_lease_holder_at_the_plans_revision(redis_url: str) -> None:
    """The fix the hold-note partition above found: a hold's record is fenced like a transition."""
    client = aioredis.from_url(redis_url, decode_responses=True)
    try:
        store = PlanStore(client, {EXPERIMENT: 0.0})
        plan = [PhaseConfig(name="canary", percent=10), PhaseConfig(name="ga", percent=100)]
        await client.set(LOCK_KEY, "ctl-a")
        start = enter(plan, 0, action="start", by="controller", reason="plan started", clock_now=1.0, wall_now=1.0)
        state = await store.apply(EXPERIMENT, start, expected_rev=-1, lock_owner="ctl-a", previous=None)

        async def hold(owner: str) -> None:
            await store.note(state, action="hold", by="controller", reason="waiting", evidence=None, percent=10.0,
                             lock_owner=owner)  # fmt: skip

        await hold("ctl-a")
        await client.set(LOCK_KEY, "ctl-b")  # a's lease ran out and b took it while a's note was in flight
        with pytest.raises(LostLock):
            await hold("ctl-a")
        promote = enter(plan, 1, action="promote", by="controller", reason="passed", clock_now=2.0, wall_now=2.0)
        await store.apply(EXPERIMENT, promote, expected_rev=state.rev, lock_owner="ctl-b", previous=state)
        with pytest.raises(Conflict):  # decided on the canary, which the plan has left
            await hold("ctl-b")
        recorded = [(r.action, r.rev) for r in reversed(await store.decisions(EXPERIMENT))]
        assert recorded == [("start", 0), ("hold", 0), ("complete", 1)]
    finally:
        await client.aclose()


async def test_a_transition_that_timed_out_is_not_said_to_have_changed_nothing(redis_server: RedisServer,
                                                                               redis_url: str) -> None:  # fmt: skip
    """A write held in a partition past the client's timeout: the error says it may have been applied (it was
    "nothing changed"), and it is, whole, when the partition heals within the lease."""
    plan = [PhaseConfig(name="canary", percent=10), PhaseConfig(name="ga", percent=100)]
    fault = FaultProxy("127.0.0.1", redis_server.port)
    direct = aioredis.from_url(redis_url, decode_responses=True)
    # No retry: the controller's client retries a timeout, each time into the same partition.
    slow = aioredis.Redis(port=fault.port, decode_responses=True, socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
    try:
        await direct.set(LOCK_KEY, "ctl-a", px=60_000)
        start = enter(plan, 0, action="start", by="controller", reason="plan started", clock_now=1.0, wall_now=1.0)
        state = await PlanStore(direct, {EXPERIMENT: 0.0}).apply(EXPERIMENT, start, expected_rev=-1,
                                                                 lock_owner="ctl-a", previous=None)  # fmt: skip
        promote = enter(plan, 1, action="promote", by="controller", reason="passed", clock_now=2.0, wall_now=2.0)
        cut = fault.partition_on(b'"action":"complete"')  # the promotion into the last phase
        with pytest.raises(StateUnavailable, match="may or may not have been applied"):
            await PlanStore(slow, {EXPERIMENT: 0.0}).apply(EXPERIMENT, promote, expected_rev=state.rev,
                                                           lock_owner="ctl-a", previous=state)  # fmt: skip
        assert cut.is_set()
        fault.heal()
        for _ in range(500):
            if await direct.hget(plan_key(EXPERIMENT), "rev") == "1":
                break
            await asyncio.sleep(0.02)
        with redis.Redis.from_url(redis_url, decode_responses=True) as sync:
            snap = Watch(sync).snapshot()
        landed = (snap["plan"]["phase_name"], snap["rollout"]["percent"], snap["audit"])
        assert landed == ("ga", "100", [(0.0, 10.0), (10.0, 100.0)])
        assert inconsistencies(snap) == []
    finally:
        await slow.aclose()
        await direct.aclose()
        fault.close()
