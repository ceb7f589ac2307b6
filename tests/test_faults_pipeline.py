"""The event pipeline under faults: proxy -> Redis Stream -> `abproxy collect` -> store, every part a real process.

Each test sends several hundred requests (16 at a time, some streamed) through a real proxy while one
part of the pipeline is killed and brought back, then checks the store request by request: exactly one
row per request id the proxy answered, none missing, none extra. The proxy's event counters must show
nothing dropped and the collector's `abproxy_collector_events_lost_total` nothing lost. No timing is
asserted; waits are generous upper bounds.

    collector SIGKILLed mid-load, restarted       its unacked batch is read again; duplicates are absorbed
    Redis (AOF, appendfsync always) SIGKILLed     the proxy keeps its events and retries them; the
                                                  collector backs off and resumes where the group was
    PostgreSQL stopped hard (immediate), restarted the collector backs off, acks nothing until it commits
    the collector down past the stream's MAXLEN   what was trimmed unread is counted, the rest stored
"""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from proxy.store.db import engine_for
from proxy.store.schema import requests
from tests.harness import (
    MockUpstream,
    PostgresServer,
    Process,
    ProxyServer,
    RedisServer,
    free_port,
    metric_value,
    proxy_config,
    wait_until,
)

REQUESTS = 900
CONCURRENCY = 16
KEY = "abproxy:events"
GROUP = "abproxy-collector"
# Persistence as the README recommends for the event stream: every write on disk before its reply.
AOF_ALWAYS = ["--appendonly", "yes", "--appendfsync", "always"]


class Pipeline:
    """A proxy writing events to a Redis Stream, and `abproxy collect` (consumer c1) storing them."""

    def __init__(
        self, upstreams: tuple[MockUpstream, MockUpstream], redis_url: str, store_url: str, tmp_path: Path,
        **stream: Any,
    ) -> None:  # fmt: skip
        config = proxy_config(
            *upstreams,
            events={"redis_stream": {"enabled": True, "timeout_s": 0.5, **stream}},
            collector={"group": GROUP, "batch_size": 100, "block_ms": 200},
        )
        self.proxy = ProxyServer(config, tmp_path, redis_url)
        self.metrics_port = free_port()
        config_file = tmp_path / f"proxy-{self.proxy.port}.yaml"
        argv = [sys.executable, "-m", "proxy", "collect", "--config", str(config_file), "--consumer", "c1",
                "--metrics-port", str(self.metrics_port)]  # fmt: skip
        env = {"REDIS_URL": redis_url, "ABPROXY_STORE_URL": store_url}
        self.collector = Process(f"collector-{self.metrics_port}", argv, tmp_path, env)
        self.engine = engine_for(store_url)

    def stop(self) -> None:
        self.proxy.stop()
        self.collector.stop()
        self.engine.dispose()

    def stored(self) -> dict[str, int] | None:
        """Rows per request id in the store; None while it cannot be read (down, or not migrated yet)."""
        try:
            with self.engine.connect() as conn:
                if not sa.inspect(conn).has_table("requests"):
                    return None
                query = sa.select(requests.c.request_id, sa.func.count()).group_by(requests.c.request_id)
                return {request_id: count for request_id, count in conn.execute(query)}
        except SQLAlchemyError:
            return None

    def collector_ready(self) -> bool:
        """Migrated the store and serving its metrics: from now on it reads the stream."""
        assert self.collector.alive, self.collector.logs()
        return self.stored() is not None and self.lost(default=None) is not None

    def lost(self, reason: str = "trimmed_unread", default: float | None = 0.0) -> float | None:
        try:
            text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        except httpx.HTTPError:
            return default
        return metric_value(text, "abproxy_collector_events_lost_total", reason=reason)

    def held(self) -> float:
        """Events on stdout but not (yet) in Redis: what the Redis sink holds for a retry."""
        text = self.proxy.metrics_text()
        written = {sink: metric_value(text, "abproxy_events_total", sink=sink) for sink in ("stdout", "redis")}
        return written["stdout"] - written["redis"]

    def dropped(self) -> float:
        """Events the proxy's Redis sink dropped, for any reason."""
        return metric_value(self.proxy.metrics_text(), "abproxy_events_dropped_total", sink="redis")

    def assert_stored_exactly(self, answered: list[str]) -> None:
        """Every answered request id stored once, and nothing else (waits for the collector to catch up)."""
        wanted = set(answered)
        assert len(wanted) == len(answered), "request ids repeat"

        def complete() -> bool:
            stored = self.stored()
            return stored is not None and set(stored) >= wanted

        try:
            wait_until(complete, timeout=60, interval=0.2, what="every answered request stored")
        except TimeoutError:
            missing = len(wanted - set(self.stored() or {}))
            raise AssertionError(f"{missing} answered requests not stored\n{self.collector.logs()}") from None
        stored = self.stored()
        assert stored is not None
        assert set(stored) == wanted, f"extra rows: {sorted(set(stored) - wanted)[:5]}"
        assert all(count == 1 for count in stored.values())


@pytest.fixture()
def database(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh database on the shared PostgreSQL cluster."""
    name = f"pipe_{uuid.uuid4().hex[:8]}"
    url = postgres_server.create_database(name)
    yield url
    postgres_server.drop_database(name)


async def _send(client: httpx.AsyncClient, url: str, i: int) -> tuple[int, str | None]:
    body: dict[str, Any] = {"model": "sales-companion", "user": f"pipe-{i % 300}", "stream": i % 4 == 0,
                            "messages": [{"role": "user", "content": f"question {i}"}]}  # fmt: skip
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        await response.aread()
    return response.status_code, response.headers.get("x-request-id")


async def _load(url: str, n: int, at: dict[int, Callable[[], None]]) -> list[tuple[int, str | None]]:
    """n requests, CONCURRENCY at a time; `at[k]()` runs in a thread when request k is taken (the others go on)."""
    queue = list(reversed(range(n)))
    results: list[tuple[int, str | None]] = []
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def worker() -> None:
            while queue:
                i = queue.pop()
                action = at.pop(i, None)
                if action is not None:
                    await asyncio.to_thread(action)
                results.append(await _send(client, url, i))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return results


def _answered(results: list[tuple[int, str | None]]) -> list[str]:
    """The request ids of the load, each answered 200 (no fault here may cost a request)."""
    assert len(results) == REQUESTS
    assert [status for status, _ in results if status != 200] == []
    ids = [request_id for _, request_id in results]
    assert all(ids)
    return [i for i in ids if i]


def _logged(process: Process, event: str) -> bool:
    return f'"event": "{event}"' in process.stderr_path.read_text()


def _pending(redis_url: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.xpending(KEY, GROUP)["pending"])
    finally:
        client.close()


@pytest.mark.slow
def test_collector_killed_mid_load_and_restarted_stores_each_request_once(
    upstreams: tuple[MockUpstream, MockUpstream], redis_url: str, database: str, tmp_path: Path
) -> None:
    """SIGKILL at a third of the load, restarted (same consumer name) at two thirds: each request stored once."""
    pipeline = Pipeline(upstreams, redis_url, database, tmp_path)
    try:
        pipeline.proxy.start()
        pipeline.collector.start()
        wait_until(pipeline.collector_ready, timeout=60, what="the collector")
        stored_at_kill: list[int] = []

        def kill() -> None:
            wait_until(lambda: bool(pipeline.stored()), timeout=30, what="rows stored before the kill")
            pipeline.collector.kill()
            stored_at_kill.append(len(pipeline.stored() or {}))

        at = {REQUESTS // 3: kill, 2 * REQUESTS // 3: pipeline.collector.start}
        results = asyncio.run(_load(pipeline.proxy.url, REQUESTS, at))
        assert not at, "every fault was injected"
        answered = _answered(results)
        assert 0 < stored_at_kill[0] < REQUESTS

        pipeline.assert_stored_exactly(answered)
        wait_until(lambda: _pending(redis_url) == 0, timeout=30, what="every entry acked")
        assert pipeline.dropped() == 0
        assert pipeline.lost() == 0
        assert pipeline.collector.proc is not None and pipeline.collector.alive
    finally:
        pipeline.stop()


@pytest.mark.slow
def test_redis_with_aof_killed_mid_load_and_restarted_loses_no_event(
    upstreams: tuple[MockUpstream, MockUpstream], database: str, tmp_path: Path
) -> None:
    """Redis (appendonly, appendfsync always) SIGKILLed under load: the proxy holds and retries its events, the
    restarted Redis has the stream and the group's position back, and the store gets each request once."""
    own_redis = RedisServer(tmp_path, extra_args=AOF_ALWAYS)  # its own: this test kills it
    own_redis.start()
    pipeline = Pipeline(upstreams, own_redis.url, database, tmp_path)
    try:
        pipeline.proxy.start()
        pipeline.collector.start()
        wait_until(pipeline.collector_ready, timeout=60, what="the collector")

        def kill() -> None:
            wait_until(lambda: bool(pipeline.stored()), timeout=30, what="rows stored before the kill")
            own_redis.kill()

        def restart() -> None:
            # Down until both sides have run into it (the proxy's sink failed a write, the collector a
            # read) and the proxy holds at least 100 events Redis has not taken.
            def noticed() -> bool:
                proxy_failed = _logged(pipeline.proxy, "event_sink_failing")
                return proxy_failed and _logged(pipeline.collector, "collector_error") and pipeline.held() >= 100

            wait_until(noticed, timeout=30, what="the outage noticed")
            own_redis.start()  # same port and data directory: the AOF is read back

        at = {REQUESTS // 3: kill, 2 * REQUESTS // 3: restart}
        results = asyncio.run(_load(pipeline.proxy.url, REQUESTS, at))
        assert not at, "every fault was injected"
        answered = _answered(results)

        pipeline.assert_stored_exactly(answered)
        wait_until(lambda: _pending(own_redis.url) == 0, timeout=30, what="every entry acked")
        # The proxy kept what Redis could not take and wrote it once Redis was back: nothing dropped.
        assert pipeline.dropped() == 0
        assert pipeline.lost() == 0
        assert _logged(pipeline.proxy, "event_sink_recovered") and _logged(pipeline.collector, "collector_recovered")
        # Every event reached the stream (a retried batch may have put some there twice).
        client = redis.Redis.from_url(own_redis.url)
        try:
            in_stream = {fields[b"request_id"].decode() for _id, fields in client.xrange(KEY)}
        finally:
            client.close()
        assert in_stream >= set(answered)
    finally:
        pipeline.stop()
        own_redis.stop()


@pytest.mark.slow
def test_postgres_stopped_hard_mid_load_and_restarted_stores_each_request_once(
    upstreams: tuple[MockUpstream, MockUpstream], redis_url: str, tmp_path: Path
) -> None:
    """PostgreSQL stopped hard under load: the collector backs off, acks nothing uncommitted, and catches up."""
    # Its own cluster: this test kills it. synchronous_commit on (PostgreSQL's default; the shared
    # test cluster turns it off for speed): a commit the collector saw succeed must survive the crash,
    # for the collector acks the batch on that word.
    server = PostgresServer(tmp_path, settings={"synchronous_commit": "on"})
    server.start()
    pipeline = Pipeline(upstreams, redis_url, server.url, tmp_path)
    try:
        pipeline.proxy.start()
        pipeline.collector.start()
        wait_until(pipeline.collector_ready, timeout=60, what="the collector")

        def crash() -> None:
            wait_until(lambda: bool(pipeline.stored()), timeout=30, what="rows stored before the crash")
            server.stop(signal.SIGQUIT)  # `pg_ctl stop -m immediate`: no checkpoint, crash recovery at start

        def restart() -> None:
            wait_until(lambda: _logged(pipeline.collector, "collector_error"), timeout=30, what="the outage noticed")
            server.start()  # crash recovery from the WAL

        at = {REQUESTS // 3: crash, 2 * REQUESTS // 3: restart}
        results = asyncio.run(_load(pipeline.proxy.url, REQUESTS, at))
        assert not at, "every fault was injected"
        answered = _answered(results)

        pipeline.assert_stored_exactly(answered)
        wait_until(lambda: _pending(redis_url) == 0, timeout=30, what="every entry acked")
        assert pipeline.dropped() == 0
        assert pipeline.lost() == 0
        assert _logged(pipeline.collector, "collector_recovered")
        assert pipeline.collector.alive
    finally:
        pipeline.stop()
        server.remove()


@pytest.mark.slow
def test_collector_down_past_the_streams_bound_counts_what_was_trimmed(
    upstreams: tuple[MockUpstream, MockUpstream], redis_url: str, tmp_path: Path
) -> None:
    """maxlen 50 and no collector for 400 requests: it stores what the stream kept and counts the rest lost."""
    pipeline = Pipeline(upstreams, redis_url, f"sqlite:///{tmp_path / 'store.db'}", tmp_path, maxlen=50)
    try:
        pipeline.proxy.start()
        sent = 400
        results = asyncio.run(_load(pipeline.proxy.url, sent, {}))
        answered = {request_id for status, request_id in results if status == 200 and request_id}
        assert len(answered) == sent
        wait_until(lambda: metric_value(pipeline.proxy.metrics_text(), "abproxy_events_total", sink="redis") >= sent,
                   timeout=30, what="every event in the stream")  # fmt: skip
        client = redis.Redis.from_url(redis_url)
        kept = client.xlen(KEY)
        client.close()
        assert 50 <= kept < sent  # MAXLEN ~ trims whole nodes: at least maxlen are kept

        pipeline.collector.start()
        wait_until(lambda: pipeline.lost(default=None) == sent - kept, timeout=60,
                   what=f"the trimmed entries counted\n{pipeline.collector.logs()}")  # fmt: skip
        wait_until(lambda: len(pipeline.stored() or {}) == kept, timeout=60, what="the kept entries stored")
        stored = pipeline.stored() or {}
        assert set(stored) <= answered and len(stored) + (pipeline.lost() or 0) == sent
        assert _logged(pipeline.collector, "collector_events_lost")
        assert pipeline.dropped() == 0
    finally:
        pipeline.stop()
