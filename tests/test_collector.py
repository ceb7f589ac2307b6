"""proxy.store.collector and `abproxy collect`: a real Redis consumer group into a real store."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis
import structlog
import yaml
from click.testing import CliRunner, Result
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import ProgrammingError, SQLAlchemyError
from structlog.testing import capture_logs

from proxy.cli import main
from proxy.event_stream import entry_fields
from proxy.store import rollup
from proxy.store.collector import Collector
from proxy.store.db import Store, engine_for, head_revision, migrate
from proxy.store.schema import feedback, requests, rollup_days, rollup_requests
from tests.harness import PostgresServer, Process, wait_until
from tests.test_store import T0, feedback_event, request_event

KEY = "abproxy:events"
GROUP = "abproxy-collector"
ABPROXY = Path(sys.executable).parent / "abproxy"


def add(client: redis.Redis, events: list[dict[str, Any]]) -> list[str]:
    """XADD each event the way the proxy's RedisStreamSink does; returns the entry ids."""
    pipe = client.pipeline(transaction=False)
    for event in events:
        pipe.xadd(KEY, entry_fields(event.get("request_id") or event.get("feedback_id") or "-", orjson.dumps(event)))
    return [eid.decode() for eid in pipe.execute()]


def pending(client: redis.Redis) -> int:
    return int(client.xpending(KEY, GROUP)["pending"])


def request_ids(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(select(requests.c.request_id)).scalars())


def feedback_values(engine: Engine) -> dict[tuple[str, str], float]:
    with engine.connect() as conn:
        return {(r.subject, r.metric): r.value for r in conn.execute(select(feedback))}


@pytest.fixture(autouse=True)
def structlog_defaults() -> Iterator[None]:
    """Default structlog config, so no logger gets cached by an earlier in-process configure_logging
    (capture_logs could not see it) and these tests leave the configuration as they found it."""
    saved = structlog.get_config()
    structlog.reset_defaults()
    yield
    structlog.configure(**saved)


@pytest.fixture()
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture()
async def async_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture()
def engine(store_url: str) -> Iterator[Engine]:
    engine = engine_for(store_url)
    migrate(engine)
    yield engine
    engine.dispose()


async def until(predicate: Callable[[], bool], task: asyncio.Task[None], timeout: float = 20.0) -> None:
    """Wait for `predicate` while `task` keeps running (it must not exit on its own)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert not task.done(), task
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def _current_days(engine: Engine) -> list[int]:
    d = rollup_days.c
    with engine.connect() as conn:
        rows = conn.execute(select(d.day).where(d.built_gen == d.gen).order_by(d.day))
        return [day for (day,) in rows]


def collector(client: aioredis.Redis, engine: Engine, consumer: str = "c1", **options: Any) -> Collector:
    return Collector(client, Store(engine), key=KEY, group=GROUP, consumer=consumer, **options)


class TestCollector:
    async def test_writes_then_acks(self, sync_redis: redis.Redis, async_redis: aioredis.Redis, engine: Engine) -> None:
        """Requests and feedback reach the store once each, and every entry is acked."""
        events = [request_event(f"r{i}") for i in range(30)]
        events += [request_event("r3"), request_event("rej", experiment=None)]
        events += [feedback_event("thumbs", 1.0, T0 + 1, request_id="r1"), feedback_event("thumbs", 0.0, T0)]
        add(sync_redis, events)
        c = collector(async_redis, engine, batch_size=7)
        assert await c.drain() == len(events)
        assert request_ids(engine) == {f"r{i}" for i in range(30)}
        assert feedback_values(engine) == {("req:r1", "thumbs"): 1.0, ("req:req-1", "thumbs"): 0.0}
        assert pending(sync_redis) == 0
        assert (c.processed, c.stored, c.duplicates, c.skipped, c.feedback) == (34, 30, 1, 1, 2)

    async def test_run_builds_the_rollup_of_days_that_are_over(
        self, sync_redis: redis.Redis, async_redis: aioredis.Redis, engine: Engine
    ) -> None:
        """Between batches, every rollup_interval_s: days past are built; a later write to one of
        them marks it again and the next build catches it up."""
        days = [rollup.utc_day(T0) - k for k in (3, 2, 1)]
        add(sync_redis, [request_event(f"r{k}", ts=day * rollup.DAY_S + 3600) for k, day in enumerate(days)])
        c = collector(async_redis, engine, rollup_interval_s=0.05, rollup_settle_s=0)
        stop = asyncio.Event()
        task = asyncio.create_task(c.run(stop))
        try:
            await until(lambda: _current_days(engine) == days, task)
            add(sync_redis, [request_event("late", ts=days[0] * rollup.DAY_S + 7200)])
            await until(lambda: request_ids(engine) >= {"late"} and _current_days(engine) == days, task)
            with engine.connect() as conn:
                n = conn.execute(select(func.sum(rollup_requests.c.requests)).where(rollup_requests.c.day == days[0]))
                assert n.scalar_one() == 2
        finally:
            stop.set()
            await task

    async def test_failed_write_is_not_acked_and_is_retried_first(
        self, sync_redis: redis.Redis, async_redis: aioredis.Redis, engine: Engine
    ) -> None:
        """A batch whose transaction fails stays pending, stores nothing, and is the next batch written."""
        add(sync_redis, [request_event("r1"), feedback_event("thumbs", 1.0, T0, request_id="r1")])
        feedback.drop(engine)
        c = collector(async_redis, engine)
        with pytest.raises(SQLAlchemyError, match="feedback"):
            await c.step()
        assert pending(sync_redis) == 2
        assert request_ids(engine) == set()  # one transaction: the requests row rolled back too
        add(sync_redis, [request_event("r2")])
        feedback.create(engine)
        assert await c.step() == 2  # its own pending entries first, not the new one
        assert request_ids(engine) == {"r1"}
        assert await c.step() == 1
        assert request_ids(engine) == {"r1", "r2"}
        assert feedback_values(engine) == {("req:r1", "thumbs"): 1.0}
        assert pending(sync_redis) == 0

    async def test_run_survives_a_store_that_refuses(
        self, sync_redis: redis.Redis, async_redis: aioredis.Redis, engine: Engine, closed_port: int
    ) -> None:
        """run() logs database errors and retries without acking until the store is back."""
        add(sync_redis, [request_event(f"r{i}") for i in range(5)])
        c = collector(async_redis, engine, block_ms=50)
        c.store = Store(engine_for(f"postgresql://nobody@127.0.0.1:{closed_port}/abproxy"))
        stop = asyncio.Event()
        with capture_logs() as logs:
            task = asyncio.create_task(c.run(stop))
            await until(lambda: sum(entry["event"] == "collector_error" for entry in logs) >= 2, task)
            assert pending(sync_redis) == 5
            c.store = Store(engine)
            await until(lambda: pending(sync_redis) == 0, task)
            stop.set()
            await asyncio.wait_for(task, 10)
        assert request_ids(engine) == {f"r{i}" for i in range(5)}
        assert any(entry["event"] == "collector_recovered" for entry in logs)

    @pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
    async def test_malformed_entries_are_acked_and_counted(
        self, sync_redis: redis.Redis, async_redis: aioredis.Redis, engine: Engine
    ) -> None:
        """Entries that can never be stored are logged, counted and acked; their neighbours are stored."""
        add(sync_redis, [request_event("before")])
        sync_redis.xadd(KEY, {"request_id": "x", "schema_version": 1})  # no event
        sync_redis.xadd(KEY, {"request_id": "x", "schema_version": 1, "event": b"{not json"})
        sync_redis.xadd(KEY, {"request_id": "x", "schema_version": 1, "event": b"[1, 2]"})
        sync_redis.xadd(KEY, {"request_id": "x", "schema_version": "one", "event": b"{}"})
        sync_redis.xadd(KEY, {"request_id": "x", "schema_version": 0, "event": orjson.dumps(request_event("v0"))})
        add(sync_redis, [request_event("no-variant", variant=None), {"kind": "feedback", "level": "request"}])
        add(sync_redis, [request_event("after")])
        c = collector(async_redis, engine)
        with capture_logs() as logs:
            await c.drain()
        assert c.malformed == 7
        assert sum(entry["event"] == "collector_malformed_entry" for entry in logs) == 7
        assert request_ids(engine) == {"before", "after"}
        assert pending(sync_redis) == 0

    @pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
    async def test_newer_schema_version_stays_pending(
        self, sync_redis: redis.Redis, async_redis: aioredis.Redis, engine: Engine
    ) -> None:
        """Entries of schema_version 2 are logged and left pending, for this and later collectors."""
        add(sync_redis, [request_event("r1")])
        newer = sync_redis.xadd(KEY, {"request_id": "r2", "schema_version": 2, "event": orjson.dumps({"v": 2})})
        add(sync_redis, [request_event("r3")])
        with capture_logs() as logs:
            c = collector(async_redis, engine)
            await c.drain()
            again = collector(async_redis, engine, consumer="c2", claim_idle_ms=1)
            await asyncio.sleep(0.01)
            await again.drain()  # claims the v2 entry, and leaves it pending too
        assert request_ids(engine) == {"r1", "r3"}
        assert (c.newer, again.newer) == (1, 1)
        assert [e["message_id"] for e in sync_redis.xpending_range(KEY, GROUP, "-", "+", 10)] == [newer]
        assert any(entry["event"] == "collector_newer_schema" for entry in logs)

    @pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
    async def test_takes_over_a_dead_consumers_batch(
        self, sync_redis: redis.Redis, async_redis: aioredis.Redis, engine: Engine
    ) -> None:
        """Entries another consumer read and never acked are claimed once idle, and stored."""
        add(sync_redis, [request_event(f"r{i}") for i in range(10)])
        await async_redis.xgroup_create(KEY, GROUP, id="0")
        await async_redis.xreadgroup(GROUP, "dead", {KEY: ">"}, count=4)  # then it "dies"
        add(sync_redis, [request_event("r10")])
        await asyncio.sleep(0.01)
        c = collector(async_redis, engine, consumer="live", claim_idle_ms=1)
        await c.drain()
        assert request_ids(engine) == {f"r{i}" for i in range(11)}
        assert pending(sync_redis) == 0

    @pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
    async def test_entries_trimmed_while_pending_are_acked(
        self, sync_redis: redis.Redis, async_redis: aioredis.Redis, engine: Engine
    ) -> None:
        """A pending entry deleted from the stream (MAXLEN) is acked: there is nothing left to store."""
        ids = add(sync_redis, [request_event("r1"), request_event("r2")])
        await async_redis.xgroup_create(KEY, GROUP, id="0")
        await async_redis.xreadgroup(GROUP, "c1", {KEY: ">"})
        sync_redis.xdel(KEY, ids[0])
        c = collector(async_redis, engine)
        await c.drain()
        assert request_ids(engine) == {"r2"}
        assert pending(sync_redis) == 0
        assert lost(c, "trimmed_pending") == 1 and lost(c, "trimmed_unread") == 0


def add_trimmed(client: redis.Redis, ids: range, maxlen: int, *, approximate: bool = False) -> None:
    """XADD request events with MAXLEN (exact unless `approximate`, which is what the proxy uses)."""
    pipe = client.pipeline(transaction=False)
    for i in ids:
        event = request_event(f"r{i}")
        pipe.xadd(KEY, entry_fields(event["request_id"], orjson.dumps(event)), maxlen=maxlen, approximate=approximate)
    pipe.execute()


def lost(c: Collector, reason: str) -> float:
    return float(c.metrics.events_lost.labels(reason)._value.get())


def lag(client: redis.Redis) -> int:
    return int(next(g for g in client.xinfo_groups(KEY) if g["name"] == GROUP.encode())["lag"])


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
class TestLostToTrim:
    """Entries MAXLEN trimmed before the group read them: counted once, in abproxy_collector_events_lost_total."""

    async def test_entries_trimmed_while_the_collector_was_stopped_are_counted(
        self, sync_redis: redis.Redis, async_redis: aioredis.Redis, engine: Engine
    ) -> None:
        """maxlen 10, collector stopped, 25 events: 15 counted lost, 10 stored; later gaps add up; lag back to 0."""
        c = collector(async_redis, engine, batch_size=4)
        assert await c.drain() == 0  # the group exists, at the stream's start
        add_trimmed(sync_redis, range(25), maxlen=10)
        with capture_logs() as logs:
            assert await c.drain() == 10
        assert lost(c, "trimmed_unread") == 15 and c.lost == 15
        assert request_ids(engine) == {f"r{i}" for i in range(15, 25)}
        warnings = [entry for entry in logs if entry["event"] == "collector_events_lost"]
        assert [(w["entries"], w["reason"], w["log_level"]) for w in warnings] == [(15, "trimmed_unread", "warning")]
        assert lag(sync_redis) == 0  # Redis 7.0 alone would report the 15 as lag from now on

        add_trimmed(sync_redis, range(25, 30), maxlen=10)  # within the bound: nothing lost
        assert await c.drain() == 5
        assert lost(c, "trimmed_unread") == 15
        add_trimmed(sync_redis, range(30, 45), maxlen=10)  # 15 more while it is stopped: 5 lost
        assert await c.drain() == 10
        assert lost(c, "trimmed_unread") == 20
        assert len(request_ids(engine)) == 45 - 20
        assert lag(sync_redis) == 0 and pending(sync_redis) == 0
        assert lost(c, "trimmed_pending") == 0

    async def test_a_group_created_after_the_trim_counts_it_too(
        self, sync_redis: redis.Redis, async_redis: aioredis.Redis, engine: Engine
    ) -> None:
        """The first collector ever, started after 30 events went into a stream of maxlen 8: 22 lost."""
        add_trimmed(sync_redis, range(30), maxlen=8)
        c = collector(async_redis, engine)
        assert await c.drain() == 8
        assert lost(c, "trimmed_unread") == 22

    async def test_approximate_trim_lost_plus_stored_is_every_event(
        self, sync_redis: redis.Redis, async_redis: aioredis.Redis, engine: Engine
    ) -> None:
        """MAXLEN ~ 50 (whole nodes are dropped): whatever it kept is stored, the rest counted, exactly."""
        c = collector(async_redis, engine, batch_size=37)
        await c.drain()
        add_trimmed(sync_redis, range(1000), maxlen=50, approximate=True)
        kept = sync_redis.xlen(KEY)
        assert kept < 1000
        await c.drain()
        assert len(request_ids(engine)) == kept
        assert lost(c, "trimmed_unread") == 1000 - kept

    async def test_collectors_sharing_the_group_count_a_gap_once(
        self, sync_redis: redis.Redis, async_redis: aioredis.Redis, engine: Engine, redis_url: str
    ) -> None:
        """Two consumers draining at once after a gap: their counts sum to the gap, never twice it."""
        first = collector(async_redis, engine, consumer="c1", batch_size=5)
        await first.drain()
        add_trimmed(sync_redis, range(200), maxlen=40)
        other_client = aioredis.from_url(redis_url)
        try:
            second = collector(other_client, engine, consumer="c2", batch_size=5)
            await asyncio.gather(first.drain(), second.drain())
        finally:
            await other_client.aclose()
        assert lost(first, "trimmed_unread") + lost(second, "trimmed_unread") == 160
        assert len(request_ids(engine)) == 40


# -- abproxy collect / store migrate, as real processes ---------------------------------------
def collect_config(tmp_path: Path, store_url: str, **collector_options: Any) -> Path:
    """The smallest valid config: the upstream key it names is unset, which `collect` must not need."""
    config = {
        "upstreams": {"up": {"base_url": "http://127.0.0.1:9/v1", "api_key_env": "ABPROXY_TEST_UNSET_KEY"}},
        "models": {"m": {"upstream": "up", "model": "gpt-4o-mini"}},
        "experiments": {"sales-companion": {"aliases": ["sales-companion"], "control": "m", "treatment": "m"}},
        "events": {"redis_stream": {"enabled": True, "key": KEY}},
        "store": {"url": store_url},
        "collector": {"group": GROUP, **collector_options},
    }
    path = tmp_path / f"collect-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def abproxy_argv(*args: str) -> list[str]:
    return [str(ABPROXY), *args] if ABPROXY.exists() else [sys.executable, "-m", "proxy", *args]


def clean_env(**env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ABPROXY_") and k != "REDIS_URL"}
    return {**base, **env}


def run_abproxy(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(abproxy_argv(*args), capture_output=True, text=True, timeout=60, env=clean_env(**env))


class TestCollectCommand:
    def test_once_drains_into_sqlite(self, sync_redis: redis.Redis, redis_url: str, tmp_path: Path) -> None:
        """`collect --once` migrates the store, stores what the stream holds, acks it, and exits 0."""
        add(sync_redis, [request_event(f"r{i}") for i in range(20)] + [feedback_event("thumbs", 1.0, T0)])
        db = tmp_path / "from-flag.db"
        config = collect_config(tmp_path, f"sqlite:///{tmp_path / 'from-config.db'}")
        done = run_abproxy("collect", "--once", "--config", str(config), "--store", f"sqlite:///{db}",
                           REDIS_URL=redis_url)  # fmt: skip
        assert done.returncode == 0, done.stderr
        engine = engine_for(f"sqlite:///{db}")
        try:
            assert request_ids(engine) == {f"r{i}" for i in range(20)}
            assert feedback_values(engine) == {("req:req-1", "thumbs"): 1.0}
        finally:
            engine.dispose()
        assert pending(sync_redis) == 0
        assert not (tmp_path / "from-config.db").exists()  # --store wins over store.url
        assert '"collector_stopped"' in done.stderr
        # Its start-up heap (SQLAlchemy, Alembic, redis-py) is frozen out of the cyclic GC's scans.
        ready = next(json.loads(line) for line in done.stderr.splitlines() if '"store_ready"' in line)
        assert ready["gc_frozen_objects"] > 10_000

    def test_store_url_from_the_environment(self, sync_redis: redis.Redis, redis_url: str, tmp_path: Path) -> None:
        """Without --store, ABPROXY_STORE_URL overrides the config's store.url."""
        add(sync_redis, [request_event("r1")])
        config = collect_config(tmp_path, f"sqlite:///{tmp_path / 'from-config.db'}")
        db = tmp_path / "from-env.db"
        done = run_abproxy("collect", "--once", "--config", str(config), REDIS_URL=redis_url,
                           ABPROXY_STORE_URL=f"sqlite:///{db}")  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert db.exists() and not (tmp_path / "from-config.db").exists()

    def test_store_migrate_prints_the_revision(self, tmp_path: Path) -> None:
        """`store migrate` creates the tables and prints the revision; again, it changes nothing."""
        url = f"sqlite:///{tmp_path / 'store.db'}"
        for _ in range(2):
            result = invoke("store", "migrate", "--store", url)
            assert result.exit_code == 0, result.output
            assert f"at revision {head_revision()}" in result.stdout

    def test_errors_are_one_line(self, tmp_path: Path) -> None:
        """A bad config, an unsupported store URL or an unreachable store print one line and exit non-zero."""
        config = collect_config(tmp_path, "sqlite:///x.db")
        for args in (
            ["collect", "--config", str(tmp_path / "missing.yaml")],
            ["collect", "--config", str(config), "--store", "mysql://u@db/abproxy"],
            ["store", "migrate", "--store", "postgresql://nobody@127.0.0.1:1/abproxy"],
            ["store", "migrate"],
        ):
            result = invoke(*args)
            assert result.exit_code != 0, args
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def invoke(*args: str) -> Result:
    """In-process, for commands that fail before `collect` configures logging (or never do)."""
    return CliRunner().invoke(main, list(args), env={"ABPROXY_CONFIG": None, "ABPROXY_STORE_URL": None})


class TestKill:
    """SIGKILL `abproxy collect` mid-batch on PostgreSQL; a restarted one stores every event exactly once."""

    @pytest.mark.parametrize("restart_as", ["new-consumer", "same-consumer"])
    def test_kill_and_restart(
        self, restart_as: str, postgres_server: PostgresServer, sync_redis: redis.Redis, redis_url: str,
        tmp_path: Path,
    ) -> None:
        """Every unique request stored once, the newest feedback value per subject, nothing pending."""
        rng = random.Random(7)
        unique = [request_event(f"req-{i:05d}", ts=T0 + i) for i in range(4000)]
        duplicates = [dict(rng.choice(unique)) for _ in range(500)]
        feedbacks = [
            feedback_event(rng.choice(["thumbs", "rating"]), float(rng.randint(0, 5)), T0 + n * 0.001,
                           request_id=f"req-{rng.randrange(50):05d}")
            for n in rng.sample(range(100_000), 500)
        ]  # fmt: skip
        events = unique + duplicates + feedbacks
        rng.shuffle(events)
        add(sync_redis, events)
        newest: dict[tuple[str, str], tuple[float, float]] = {}
        for fb in feedbacks:
            key = (f"req:{fb['request_id']}", fb["metric"])
            newest[key] = max(newest.get(key, (-1.0, 0.0)), (fb["ts"], fb["value"]))

        database = f"kill_{uuid.uuid4().hex[:8]}"
        url = postgres_server.create_database(database)
        # A restarted collector of a new name claims the dead one's batch after 300 ms idle; one
        # of the same name must read its own pending entries first (it could not claim for an hour).
        claim_idle_ms = 300 if restart_as == "new-consumer" else 3_600_000
        # No rollup builds: the lock below must catch a batch's write, not a build's read.
        config = collect_config(tmp_path, url, batch_size=100, block_ms=100, claim_idle_ms=claim_idle_ms,
                                rollup_interval_s=0)  # fmt: skip
        env = clean_env(REDIS_URL=redis_url)
        first = Process("collect-a", abproxy_argv("collect", "--config", str(config), "--consumer", "a"), tmp_path, env)
        second_name = "b" if restart_as == "new-consumer" else "a"
        second = Process(
            "collect-b", abproxy_argv("collect", "--config", str(config), "--consumer", second_name), tmp_path, env
        )
        engine = engine_for(url)
        try:
            first.start()
            wait_until(lambda: _count(engine) > 0, timeout=60, what=f"first rows\n{first.logs()}")
            # Hold the tables so the collector is caught with a batch read and not yet committed.
            with engine.connect() as lock:
                lock.execute(text("LOCK TABLE requests, feedback IN ACCESS EXCLUSIVE MODE"))
                stored_before_kill = lock.execute(select(func.count()).select_from(requests)).scalar_one()
                wait_until(lambda: _waiting_on_locks(engine) > 0, timeout=30, what="the collector to wait")
                held = sync_redis.xpending_range(KEY, GROUP, "-", "+", 1000, consumername="a")
                first.kill()
                lock.rollback()
            assert first.proc is not None and first.proc.returncode == -9
            assert 0 < stored_before_kill < len(unique)
            assert held, "the killed collector held no batch"

            second.start()
            wait_until(lambda: pending(sync_redis) == 0 and _count(engine) == len(unique), timeout=60,
                       what=f"the restarted collector to finish\n{second.logs()}")  # fmt: skip
            second.stop()
            assert second.proc is not None and second.proc.returncode == 0, second.logs()
            assert request_ids(engine) == {event["request_id"] for event in unique}
            assert feedback_values(engine) == {key: value for key, (_ts, value) in newest.items()}
            assert pending(sync_redis) == 0
            if restart_as == "new-consumer":
                assert "collector_claimed" in second.stderr_path.read_text()
        finally:
            first.kill()
            second.kill()
            engine.dispose()
            postgres_server.drop_database(database)


def _count(engine: Engine) -> int:
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(requests)).scalar_one())
    except ProgrammingError:  # the collector has not created the table yet
        return 0


def _waiting_on_locks(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM pg_locks WHERE NOT granted")).scalar_one())
