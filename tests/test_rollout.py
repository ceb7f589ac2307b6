"""proxy.rollout: percents in a real Redis, mirrored in memory, fail-static when Redis goes away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from proxy.assignment import bucket, choose_variant, threshold
from proxy.errors import StateUnavailable
from proxy.rollout import (
    AUDIT_MAXLEN,
    CHANNEL,
    RESTORER,
    RolloutCache,
    RolloutState,
    RolloutStore,
    audit_key,
    state_key,
)
from tests.harness import MockUpstream, ProxyServer, RedisServer, proxy_config, wait_until

EXP = "exp"
DEFAULTS = {EXP: 5.0, "other": 0.0}
JUNK_MESSAGES = [
    b"not json", b"[]", b"null", b"{}", b'{"experiment": "exp"}',
    b'{"experiment": "exp", "percent": "abc", "rev": 1, "updated_at": 1}',
    b'{"experiment": "exp", "percent": "30", "rev": "x", "updated_at": 1}',
    b'{"experiment": "exp", "percent": "nan", "rev": 1, "updated_at": 1}',
    b'{"experiment": "exp", "percent": "inf", "rev": 1, "updated_at": 1}',
    b'{"experiment": "exp", "percent": "101", "rev": 1, "updated_at": 1}',
    b'{"experiment": "exp", "percent": "-1", "rev": 1, "updated_at": 1}',
]  # fmt: skip


def _client(url: str) -> aioredis.Redis:
    # The same options the runtime uses: a dead Redis must fail fast, not hang a request.
    return aioredis.from_url(url, decode_responses=True, socket_timeout=0.5, socket_connect_timeout=0.5)


async def eventually(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `predicate` until true; returns the seconds it took, fails after `timeout`."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


@pytest.fixture()
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    redis = _client(redis_url)
    yield redis
    await redis.aclose()


@pytest.fixture()
def store(client: aioredis.Redis) -> RolloutStore:
    return RolloutStore(client, DEFAULTS)


@pytest.fixture()
async def follower(redis_url: str) -> AsyncIterator[Callable[..., Awaitable[RolloutCache]]]:
    """Start caches on their own Redis connections, as another process would; stops them after."""
    started: list[tuple[RolloutCache, aioredis.Redis]] = []

    async def start(url: str = redis_url, resync_interval_s: float = 5.0, timeout: float = 2.0) -> RolloutCache:
        redis = _client(url)
        cache = RolloutCache(RolloutStore(redis, DEFAULTS), DEFAULTS, resync_interval_s=resync_interval_s)
        started.append((cache, redis))
        await cache.start(initial_timeout_s=timeout)
        return cache

    yield start
    for cache, redis in started:
        await cache.stop()
        await redis.aclose()


@pytest.fixture()
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, to stop and start again on the same port."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


class TestRolloutStore:
    async def test_set_then_get(self, store: RolloutStore) -> None:
        """A percent written is read back with who, why, when and a revision."""
        before = time.time()
        state, _ = await store.set_percent(EXP, 25, by="alice", reason="canary")
        read = await store.get(EXP)
        assert read == state
        assert (read.percent, read.source, read.rev, read.updated_by, read.reason) == (
            25.0,
            "redis",
            1,
            "alice",
            "canary",
        )
        assert read.updated_at is not None and before <= read.updated_at <= time.time()

    async def test_returns_previous_percent(self, store: RolloutStore) -> None:
        """set_percent returns the percent it replaced: the config default first, then the last write."""
        _, first = await store.set_percent(EXP, 10, by="a", reason=None)
        _, second = await store.set_percent(EXP, 12.5, by="a", reason=None)
        assert (first, second) == (5.0, 10.0)

    @pytest.mark.parametrize(
        ("percent", "stored"), [(12.5, "12.5"), (33.33, "33.33"), (100, "100"), (0, "0"), (7.0, "7"), (0.01, "0.01")]
    )
    async def test_percent_stored_in_short_form(
        self, store: RolloutStore, client: aioredis.Redis, percent: float, stored: str
    ) -> None:
        """Redis holds the percent as short decimal text, readable by anyone with redis-cli."""
        await store.set_percent(EXP, percent, by="a", reason=None)
        assert await client.hget(state_key(EXP), "percent") == stored
        assert (await store.get(EXP)).percent == percent

    async def test_config_default_when_redis_is_empty(self, store: RolloutStore) -> None:
        """With nothing in Redis, the config's rollout_percent is reported, marked source "config"."""
        state = await store.get(EXP)
        assert (state.percent, state.source, state.rev, state.updated_at) == (5.0, "config", 0, None)

    async def test_snapshot_reads_every_experiment(self, store: RolloutStore) -> None:
        """snapshot() returns all experiments at once, Redis values and config defaults mixed."""
        await store.set_percent("other", 42, by="a", reason=None)
        snap = await store.snapshot()
        assert set(snap) == set(DEFAULTS)
        assert (snap["other"].percent, snap["other"].source) == (42.0, "redis")
        assert (snap[EXP].percent, snap[EXP].source) == (5.0, "config")

    async def test_write_is_published(self, store: RolloutStore, client: aioredis.Redis) -> None:
        """Each write publishes one message with experiment, percent, rev and who."""
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(CHANNEL)
        await store.set_percent(EXP, 30, by="bob", reason="ramp")
        message = None
        for _ in range(100):
            message = await pubsub.get_message(timeout=0.05)
            if message is not None:
                break
        await pubsub.aclose()
        assert message is not None
        body = orjson.loads(message["data"])
        assert (body["experiment"], body["percent"], body["rev"], body["updated_by"], body["reason"]) == (
            EXP, "30", 1, "bob", "ramp",
        )  # fmt: skip


class TestAudit:
    async def test_newest_first_with_every_field(self, store: RolloutStore) -> None:
        """The audit lists changes newest first, each with from, to, by, reason and when."""
        before = time.time()
        await store.set_percent(EXP, 10, by="alice", reason="canary")
        await store.set_percent(EXP, 25, by="bob", reason=None)
        await store.set_percent(EXP, 50, by="carol", reason="looks good")
        entries = await store.audit(EXP)
        rows = [(e.from_percent, e.to_percent, e.by, e.reason) for e in entries]
        assert rows == [(25, 50, "carol", "looks good"), (10, 25, "bob", None), (5, 10, "alice", "canary")]
        assert all(before <= e.at <= time.time() for e in entries)
        assert entries[0].at >= entries[1].at >= entries[2].at
        assert len({e.id for e in entries}) == 3

    async def test_first_change_starts_from_config_default(self, store: RolloutStore) -> None:
        """The first audit entry's `from` is the config default that was in force."""
        await store.set_percent(EXP, 20, by="a", reason=None)
        (entry,) = await store.audit(EXP)
        assert (entry.from_percent, entry.to_percent) == (DEFAULTS[EXP], 20)

    async def test_per_experiment(self, store: RolloutStore) -> None:
        """Each experiment has its own history."""
        await store.set_percent(EXP, 20, by="a", reason=None)
        assert await store.audit("other") == []

    async def test_count_limits_newest(self, store: RolloutStore) -> None:
        """audit(count=n) returns the n newest changes."""
        for p in range(1, 11):
            await store.set_percent(EXP, p, by="a", reason=None)
        assert [e.to_percent for e in await store.audit(EXP, count=3)] == [10, 9, 8]

    async def test_survives_many_writes_capped_approximately(self, store: RolloutStore, client: aioredis.Redis) -> None:
        """A long history is trimmed to about AUDIT_MAXLEN entries, keeping every recent change."""
        async with client.pipeline(transaction=False) as pipe:
            for i in range(AUDIT_MAXLEN + 1_500):  # an old history, written fast by hand
                pipe.xadd(audit_key(EXP), {"from": "0", "to": "1", "by": f"old-{i}", "at": "1.0", "reason": ""})
            await pipe.execute()
        for i in range(200):
            await store.set_percent(EXP, (i % 100) + 0.5, by=f"writer-{i}", reason=None)
        length = await client.xlen(audit_key(EXP))
        assert AUDIT_MAXLEN <= length <= AUDIT_MAXLEN + 500, length  # "~": trimmed a whole node at a time
        recent = await store.audit(EXP, count=200)
        assert [e.by for e in recent] == [f"writer-{i}" for i in reversed(range(200))]


class TestCacheFollowsRedis:
    def test_config_defaults_before_start(self, store: RolloutStore) -> None:
        """Before Redis is read, the cache routes by the config defaults and is not loaded."""
        cache = RolloutCache(store, DEFAULTS)
        assert cache.thresholds == {EXP: 500, "other": 0}
        assert {n: s.source for n, s in cache.states.items()} == {EXP: "config", "other": "config"}
        assert cache.loaded is False and cache.connected is None

    async def test_start_reads_redis_first(self, store: RolloutStore, follower: Any) -> None:
        """start() waits for the first read, so a started cache already routes by Redis."""
        await store.set_percent(EXP, 30, by="a", reason=None)
        cache: RolloutCache = await follower()
        assert cache.loaded is True and cache.connected is True
        assert cache.thresholds[EXP] == 3_000
        assert cache.states[EXP].source == "redis"

    async def test_change_reaches_another_cache_within_a_second(self, store: RolloutStore, follower: Any) -> None:
        """A write through one store reaches a cache on another connection by pub/sub, well under 1 s."""
        cache: RolloutCache = await follower(resync_interval_s=60)  # no resync can help here
        await store.set_percent(EXP, 40, by="alice", reason="ramp")
        took = await eventually(lambda: cache.thresholds[EXP] == 4_000, 1.0, "pub/sub change")
        assert took < 1.0
        assert (cache.states[EXP].updated_by, cache.states[EXP].reason, cache.states[EXP].rev) == ("alice", "ramp", 1)

    async def test_every_change_in_order(self, store: RolloutStore, follower: Any) -> None:
        """A burst of changes ends on the last one in every follower."""
        caches = [await follower(resync_interval_s=60) for _ in range(3)]
        for p in (10, 20, 30, 40, 33.33):
            await store.set_percent(EXP, p, by="a", reason=None)
        for cache in caches:
            await eventually(lambda c=cache: c.thresholds[EXP] == 3_333, 1.0, "last change")  # type: ignore[misc]

    async def test_resync_heals_a_write_without_publish(self, client: aioredis.Redis, follower: Any) -> None:
        """A percent written straight into Redis (no publish) is picked up by the periodic re-read."""
        cache: RolloutCache = await follower(resync_interval_s=0.2)
        await client.hset(state_key(EXP), mapping={"percent": "42", "rev": "9", "updated_by": "redis-cli"})
        await eventually(lambda: cache.thresholds[EXP] == 4_200, 1.0, "resync")
        assert cache.states[EXP].rev == 9

    async def test_lost_state_is_restored_not_reverted(self, client: aioredis.Redis, follower: Any) -> None:
        """A served percent that vanishes from Redis is written back (audited), never reverted to the default."""
        store = RolloutStore(client, DEFAULTS)
        cache: RolloutCache = await follower(resync_interval_s=0.2)
        await store.set_percent(EXP, 42, by="ops", reason="beta")
        await eventually(lambda: cache.thresholds[EXP] == 4_200, 1.0, "42 %")
        await client.delete(state_key(EXP))
        await eventually(lambda: cache.states[EXP].updated_by == RESTORER, 1.0, "restore")
        assert cache.thresholds[EXP] == 4_200
        assert (await client.hget(state_key(EXP), "percent")) == "42"
        newest = (await store.audit(EXP))[0]
        assert (newest.to_percent, newest.by) == (42, RESTORER) and "lost" in (newest.reason or "")

    async def test_malformed_message_is_ignored(
        self, store: RolloutStore, client: aioredis.Redis, follower: Any
    ) -> None:
        """Garbage on the channel changes nothing and the cache keeps following real changes."""
        cache: RolloutCache = await follower(resync_interval_s=60)
        before = cache.thresholds
        for junk in JUNK_MESSAGES:
            await client.publish(CHANNEL, junk)
        await store.set_percent(EXP, 15, by="a", reason=None)
        await eventually(lambda: cache.thresholds[EXP] == 1_500, 1.0, "the real change after the junk")
        assert cache.thresholds["other"] == before["other"]
        assert cache._task is not None and not cache._task.done()


class TestCacheUnits:
    """The cache's update rules, driven directly (no background task)."""

    def _cache(self, store: RolloutStore) -> RolloutCache:
        return RolloutCache(store, DEFAULTS)

    def test_snapshot_does_not_regress_a_newer_message(self, store: RolloutStore) -> None:
        """A snapshot started before a pub/sub message arrived cannot undo that message."""
        cache = self._cache(store)
        started_at = time.monotonic()
        newer = RolloutState(EXP, 40, "redis", rev=2)
        cache.apply(newer, received_at=started_at + 0.001)
        stale = RolloutState(EXP, 20, "redis", rev=1)
        cache._apply_snapshot({EXP: stale, "other": RolloutState("other", 7, "redis", rev=1)}, started_at)
        assert cache.states[EXP] == newer and cache.thresholds[EXP] == 4_000
        assert cache.thresholds["other"] == 700  # the rest of the snapshot still applies
        assert cache.loaded is True

    def test_snapshot_started_after_a_message_wins(self, store: RolloutStore) -> None:
        """A snapshot that began after the last message is the newer truth and is installed."""
        cache = self._cache(store)
        cache.apply(RolloutState(EXP, 40, "redis", rev=2), received_at=100.0)
        later = RolloutState(EXP, 60, "redis", rev=3)
        cache._apply_snapshot({EXP: later, "other": RolloutState("other", 0, "config")}, started_at=100.5)
        assert cache.states[EXP] == later and cache.thresholds[EXP] == 6_000

    @pytest.mark.parametrize("data", JUNK_MESSAGES)
    def test_malformed_message_changes_nothing(self, store: RolloutStore, data: bytes) -> None:
        """A message that is not a valid change is logged and ignored; the state is untouched."""
        cache = self._cache(store)
        states, thresholds = cache.states, cache.thresholds
        with capture_logs() as logs:
            cache._apply_message(data)
        assert cache.states is states and cache.thresholds is thresholds
        assert [e["event"] for e in logs] == ["rollout_message_ignored"]

    def test_message_for_unknown_experiment_is_ignored(self, store: RolloutStore) -> None:
        """A change for an experiment this process does not run is dropped, not added."""
        cache = self._cache(store)
        cache._apply_message(b'{"experiment": "elsewhere", "percent": "50", "rev": 1, "updated_at": 1}')
        assert set(cache.thresholds) == set(DEFAULTS)

    def test_valid_message_is_applied(self, store: RolloutStore) -> None:
        """A well-formed message installs the new percent with its metadata."""
        cache = self._cache(store)
        cache._apply_message(b'{"experiment": "exp", "percent": "12.5", "rev": 4, "updated_at": 1.5, '
                             b'"updated_by": "bob", "reason": ""}')  # fmt: skip
        assert cache.thresholds[EXP] == 1_250
        assert cache.states[EXP] == RolloutState(EXP, 12.5, "redis", 4, 1.5, "bob", None)

    def test_thresholds_replaced_never_mutated(self, store: RolloutStore) -> None:
        """Every update installs new dicts; a reader holding the old one never sees it change."""
        cache = self._cache(store)
        old_thresholds, old_states = cache.thresholds, cache.states
        frozen = dict(old_thresholds), dict(old_states)
        cache.apply(RolloutState(EXP, 40, "redis", rev=1))
        assert cache.thresholds is not old_thresholds and cache.states is not old_states
        assert (old_thresholds, old_states) == frozen
        middle = cache.thresholds
        cache._apply_snapshot({EXP: RolloutState(EXP, 60, "redis", rev=2), "other": RolloutState("other", 1, "redis")},
                              started_at=time.monotonic() + 1)  # fmt: skip
        assert cache.thresholds is not middle and middle[EXP] == 4_000

    def test_on_change_sees_changes_only(self, store: RolloutStore) -> None:
        """The listener hears every default at start, then each real change, not a no-op re-read."""
        heard: list[tuple[str, float]] = []
        cache = RolloutCache(store, DEFAULTS, on_change=lambda s: heard.append((s.experiment, s.percent)))
        assert sorted(heard) == [(EXP, 5.0), ("other", 0.0)]
        heard.clear()
        snapshot = {EXP: RolloutState(EXP, 30, "redis", rev=1), "other": cache.states["other"]}
        cache._apply_snapshot(snapshot, started_at=time.monotonic())
        cache._apply_snapshot(dict(snapshot), started_at=time.monotonic())
        assert heard == [(EXP, 30.0)]


class TestFailStatic:
    async def test_outage_keeps_percents_and_recovers(self, own_redis: RedisServer, follower: Any) -> None:
        """Redis stops: the cache keeps 30 %, writes fail cleanly; Redis returns empty: 30 % restored, writes flow."""
        cache: RolloutCache = await follower(own_redis.url, resync_interval_s=0.3)
        writer = _client(own_redis.url)
        store = RolloutStore(writer, DEFAULTS)
        try:
            await store.set_percent(EXP, 30, by="a", reason=None)
            await eventually(lambda: cache.thresholds[EXP] == 3_000, 1.0, "30 %")

            own_redis.stop()
            await eventually(lambda: cache.connected is False, 3.0, "outage noticed")
            with pytest.raises(StateUnavailable) as info:
                await store.set_percent(EXP, 80, by="a", reason=None)
            assert info.value.status_code == 503
            await asyncio.sleep(0.7)  # a few reconnect attempts and resync periods
            assert cache.thresholds[EXP] == 3_000 and cache.states[EXP].percent == 30
            assert cache.loaded is True and cache.connected is False

            own_redis.start()  # no persistence: it comes back empty
            await eventually(lambda: cache.connected is True, 5.0, "reconnect")
            await eventually(lambda: cache.states[EXP].updated_by == RESTORER, 1.0, "restored into the empty Redis")
            assert cache.thresholds[EXP] == 3_000

            state, previous = await store.set_percent(EXP, 55, by="a", reason="after outage")
            assert previous == 30 and state.rev > 1
            await eventually(lambda: cache.thresholds[EXP] == 5_500, 1.0, "a write after recovery")
        finally:
            await writer.aclose()

    async def test_reads_fail_cleanly_while_down(self, own_redis: RedisServer) -> None:
        """get, snapshot and audit raise StateUnavailable (503) when Redis is down, never a redis error."""
        redis = _client(own_redis.url)
        store = RolloutStore(redis, DEFAULTS)
        try:
            own_redis.stop()
            for call in (store.get(EXP), store.snapshot(), store.audit(EXP)):
                with pytest.raises(StateUnavailable):
                    await call
        finally:
            await redis.aclose()

    async def test_not_loaded_until_redis_is_reachable(self, tmp_path: Path, follower: Any) -> None:
        """A cache started with Redis down routes by defaults, is not loaded, and loads once Redis is up."""
        server = RedisServer(tmp_path)  # its port is chosen but nothing listens yet
        try:
            cache: RolloutCache = await follower(server.url, resync_interval_s=0.3, timeout=0.3)
            assert cache.loaded is False and cache.connected is False
            assert cache.thresholds[EXP] == 500
            server.start()
            await eventually(lambda: cache.loaded, 5.0, "first read after Redis came up")
            assert cache.connected is True
        finally:
            server.stop()

    async def test_corrupt_value_in_redis_keeps_last_percents(
        self, store: RolloutStore, client: aioredis.Redis, follower: Any
    ) -> None:
        """A percent that is not a valid number in Redis is never routed by; the follower survives."""
        cache: RolloutCache = await follower(resync_interval_s=0.2)
        await store.set_percent(EXP, 30, by="a", reason=None)
        await eventually(lambda: cache.thresholds[EXP] == 3_000, 1.0, "30 %")
        for junk in ("nan", "abc", "250"):
            await client.hset(state_key(EXP), "percent", junk)
            await asyncio.sleep(0.5)  # two resync periods
            assert cache.thresholds[EXP] == 3_000, junk
            assert cache._task is not None and not cache._task.done()
            with pytest.raises(StateUnavailable):
                await store.get(EXP)
        await store.set_percent(EXP, 45, by="a", reason="repair")
        await eventually(lambda: cache.thresholds[EXP] == 4_500, 1.0, "repair")


# -- process level ---------------------------------------------------------------------------
GAUGE_40 = 'abproxy_rollout_percent{experiment="sales-companion"} 40.0'


def _start_all(*servers: ProxyServer) -> None:
    with ThreadPoolExecutor(len(servers)) as pool:
        list(pool.map(lambda s: s.start(), servers))


def _variant(server: ProxyServer, user: str) -> str:
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "sales-companion", "messages": [{"role": "user", "content": "hi"}], "user": user},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return response.headers["x-abproxy-variant"]


def _log_events(server: ProxyServer, name: str) -> int:
    return sum(f'"event": "{name}"' in line for line in server.stderr_path.read_text().splitlines())


class TestTwoProcesses:
    def test_change_on_one_instance_reaches_the_other(
        self, upstreams: tuple[MockUpstream, MockUpstream], redis_url: str, tmp_path: Path
    ) -> None:
        """PUT on instance A shows on instance B's /metrics within 1 s, and B's admin API and audit agree."""
        a = ProxyServer(proxy_config(*upstreams), tmp_path, redis_url)
        b = ProxyServer(proxy_config(*upstreams), tmp_path, redis_url)
        try:
            _start_all(a, b)
            assert GAUGE_40 not in b.metrics_text()
            with a.admin() as admin:
                response = admin.put(
                    "/admin/experiments/sales-companion/rollout",
                    json={"percent": 40, "reason": "ramp"},
                    headers={"X-Abproxy-Actor": "tester"},
                )
            sent = time.monotonic()
            assert response.status_code == 200, response.text
            wait_until(lambda: GAUGE_40 in b.metrics_text(), timeout=1.0, interval=0.01, what="B's gauge at 40")
            assert time.monotonic() - sent < 1.0

            with b.admin() as admin:
                state = admin.get("/admin/experiments/sales-companion").json()
                audit = admin.get("/admin/experiments/sales-companion/audit").json()
            assert (state["percent"], state["source"], state["updated_by"], state["reason"]) == (
                40,
                "redis",
                "tester",
                "ramp",
            )
            first = audit["entries"][0]
            assert (first["from"], first["to"], first["by"], first["reason"]) == (0, 40, "tester", "ramp")
        finally:
            a.stop()
            b.stop()


class TestProcessFailStatic:
    def test_outage_and_recovery(self, upstreams: tuple[MockUpstream, MockUpstream], tmp_path: Path) -> None:
        """Redis killed: routing and readiness hold, one log line; Redis back: admin writes route again."""
        own = RedisServer(tmp_path)
        own.start()
        experiment = {"aliases": ["sales-companion", "gpt-4o-mini"], "control": "base", "treatment": "finetuned",
                      "salt": "sales-v2", "rollout_percent": 50}  # fmt: skip
        server = ProxyServer(proxy_config(*upstreams, experiments={"sales-companion": experiment}), tmp_path, own.url)
        users = [f"user-{i}" for i in range(16)]
        at_50 = {u: choose_variant(bucket("sales-v2", u), threshold(50)) for u in users}
        assert set(at_50.values()) == {"control", "treatment"}  # so 50 % is told apart from 0 and 100
        try:
            server.start()
            server.set_percent(100)
            assert {_variant(server, u) for u in users} == {"treatment"}

            own.kill()
            deadline = time.monotonic() + 2.0  # several reconnect attempts while requests keep coming
            while time.monotonic() < deadline:
                assert {_variant(server, u) for u in users} == {"treatment"}
                assert httpx.get(f"{server.url}/readyz").status_code == 200
            ready = httpx.get(f"{server.url}/readyz").json()
            assert (ready["rollout_loaded"], ready["redis_connected"]) == (True, False)
            assert _log_events(server, "rollout_store_unavailable") == 1, server.logs()

            own.start()  # empty (no persistence): the proxy writes back the 100 % it served, not the config's 50 %
            wait_until(lambda: httpx.get(f"{server.url}/readyz").json()["redis_connected"], timeout=5, what="reconnect")
            with server.admin() as admin:
                wait_until(lambda: admin.get("/admin/experiments/sales-companion").json()["updated_by"] == RESTORER,
                           timeout=3, what="restore")  # fmt: skip
            assert {_variant(server, u) for u in users} == {"treatment"}

            def set_zero() -> bool:
                with server.admin() as admin:
                    return (
                        admin.put("/admin/experiments/sales-companion/rollout", json={"percent": 0}).status_code == 200
                    )

            wait_until(set_zero, timeout=5, what="admin write after recovery")
            assert {_variant(server, u) for u in users} == {"control"}
            assert _log_events(server, "rollout_store_unavailable") == 1
            assert _log_events(server, "rollout_store_connected") == 2
        finally:
            server.stop()
            own.stop()

    def test_not_ready_until_redis_answers(self, upstreams: tuple[MockUpstream, MockUpstream], tmp_path: Path) -> None:
        """A proxy started with Redis down is alive but not ready, and becomes ready when Redis starts."""
        own = RedisServer(tmp_path)
        server = ProxyServer(proxy_config(*upstreams), tmp_path, own.url)
        try:
            server.start(wait_ready=False)
            assert httpx.get(f"{server.url}/healthz").status_code == 200
            response = httpx.get(f"{server.url}/readyz")
            assert response.status_code == 503 and response.json()["rollout_loaded"] is False
            own.start()
            wait_until(lambda: httpx.get(f"{server.url}/readyz").status_code == 200, timeout=5, what="ready")
        finally:
            server.stop()
            own.stop()
