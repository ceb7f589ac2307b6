"""The per-request event stream: its fields, the stdout and Redis Stream sinks, readers and the CLI."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from sqlalchemy import select
from structlog.testing import capture_logs

from proxy.event_stream import SCHEMA_VERSION, ConsumerGroupReader, decode_entry, entry_fields, tail
from proxy.events import EventLog, RedisStreamSink, StdoutSink
from proxy.events_tail import format_line, matches
from proxy.metrics import Metrics
from proxy.store.collector import Collector
from proxy.store.db import Store, engine_for, migrate
from proxy.store.schema import requests
from tests.harness import MockUpstream, ProxyServer, RedisServer, proxy_config, wait_until
from tests.harness import metric_value as _sample
from tests.test_store import request_event

STREAM_KEY = "abproxy:events"


def _client(proxy: ProxyServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="client-key", max_retries=0)


def _stream_config(upstreams: tuple[MockUpstream, MockUpstream], **stream: Any) -> dict[str, Any]:
    return proxy_config(*upstreams, events={"redis_stream": {"enabled": True, **stream}})


def _stream_events(url: str, key: str = STREAM_KEY) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(url)
    try:
        return [decode_entry(eid, fields).event for eid, fields in client.xrange(key)]
    finally:
        client.close()


@contextmanager
def _proxy_on_own_redis(
    upstreams: tuple[MockUpstream, MockUpstream], tmp_path: Path
) -> Iterator[tuple[RedisServer, ProxyServer]]:
    """A Redis of its own (to kill or pause) and a proxy with a short-timeout stream sink on it."""
    own_redis = RedisServer(tmp_path)
    own_redis.start()
    proxy = ProxyServer(_stream_config(upstreams, timeout_s=0.2), tmp_path, own_redis.url)
    proxy.start()
    try:
        yield own_redis, proxy
    finally:
        proxy.stop()
        own_redis.stop()


@pytest.fixture(scope="module")
def stream_proxy(
    upstreams: tuple[MockUpstream, MockUpstream], redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyServer]:
    """A proxy writing events to stdout and to the shared Redis's stream, at 50 % rollout."""
    server = ProxyServer(_stream_config(upstreams), tmp_path_factory.mktemp("stream"), redis_server.url)
    server.start()
    server.set_percent(50)
    yield server
    server.stop()


class TestEventFields:
    def test_non_streaming_event_has_the_documented_fields(self, stream_proxy: ProxyServer) -> None:
        """A plain completion's event carries the schema version, time, upstream status and finish reason."""
        raw = _client(stream_proxy).chat.completions.with_raw_response.create(
            model="sales-companion", messages=[{"role": "user", "content": "hi"}], user="fields-user-1"
        )
        request_id = raw.headers["x-request-id"]
        wait_until(lambda: any(e["request_id"] == request_id for e in stream_proxy.events()), what="event")
        event = next(e for e in stream_proxy.events() if e["request_id"] == request_id)
        assert event["schema_version"] == SCHEMA_VERSION
        assert datetime.fromisoformat(event["time"]).timestamp() == pytest.approx(event["ts"], abs=0.001)
        assert event["endpoint"] == "chat.completions" and event["stream"] is False
        assert event["status"] == 200 and event["upstream_status"] == 200
        assert event["error"] is None and event["finish_reason"] == "stop"
        assert event["variant"] == raw.headers["x-abproxy-variant"]
        assert event["completion_tokens"] > 0 and event["cost_usd"] > 0
        assert "fields-user-1" not in json.dumps(event)  # only the keyed hash of the user

    def test_stream_event_has_finish_reason_and_ttft(self, stream_proxy: ProxyServer) -> None:
        """A stream's event has the finish reason of its last content chunk and a time to first token."""
        stream = _client(stream_proxy).chat.completions.create(
            model="sales-companion", messages=[{"role": "user", "content": "hi"}], user="fields-user-2",
            stream=True, max_tokens=5,
        )
        request_id = stream.response.headers["x-request-id"]
        for _ in stream:
            pass
        wait_until(lambda: any(e["request_id"] == request_id for e in stream_proxy.events()), what="event")
        event = next(e for e in stream_proxy.events() if e["request_id"] == request_id)
        assert event["stream"] is True and event["upstream_status"] == 200
        assert event["finish_reason"] == "length" and event["ttft_ms"] is not None

    def test_upstream_error_event_names_status_and_reason(self, stream_proxy: ProxyServer) -> None:
        """An upstream 500 is recorded with its upstream status and reason 5xx, and no finish reason."""
        client = _client(stream_proxy)
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(
                model="sales-companion", messages=[{"role": "user", "content": "x"}], user="fields-user-3",
                extra_body={"mock_status": 500},
            )
        request_id = info.value.response.headers["x-request-id"]
        wait_until(lambda: any(e["request_id"] == request_id for e in stream_proxy.events()), what="event")
        event = next(e for e in stream_proxy.events() if e["request_id"] == request_id)
        assert (event["status"], event["upstream_status"], event["error"]) == (500, 500, "5xx")
        assert event["finish_reason"] is None


class TestRedisStreamSink:
    def test_every_request_lands_in_the_stream_with_its_request_id(
        self, stream_proxy: ProxyServer, redis_server: RedisServer
    ) -> None:
        """Each request's event is XADDed once, keyed by its request id, equal to the stdout event."""
        client = _client(stream_proxy)
        ids = []
        for i in range(20):
            raw = client.chat.completions.with_raw_response.create(
                model="sales-companion", messages=[{"role": "user", "content": "hi"}], user=f"stream-user-{i}"
            )
            ids.append(raw.headers["x-request-id"])
        wait_until(lambda: set(ids) <= {e["request_id"] for e in _stream_events(redis_server.url)}, what="xadd")
        in_stream = {e["request_id"]: e for e in _stream_events(redis_server.url)}
        on_stdout = {e["request_id"]: e for e in stream_proxy.events()}
        assert all(in_stream[i] == on_stdout[i] for i in ids)
        assert {in_stream[i]["variant"] for i in ids} == {"control", "treatment"}
        entries = redis.Redis.from_url(redis_server.url).xrange(STREAM_KEY)
        fields = {eid: f for eid, f in entries}
        assert all(f[b"schema_version"] == str(SCHEMA_VERSION).encode() for f in fields.values())
        assert [f[b"request_id"].decode() for f in fields.values()].count(ids[0]) == 1

    def test_stream_is_trimmed_approximately(
        self, upstreams: tuple[MockUpstream, MockUpstream], redis_url: str, tmp_path: Path
    ) -> None:
        """With maxlen 50, 400 events leave the stream far shorter than 400 but at least 50 long."""
        proxy = ProxyServer(_stream_config(upstreams, maxlen=50), tmp_path, redis_url)
        proxy.start()
        try:
            client = _client(proxy)
            for i in range(400):
                client.embeddings.create(model="sales-companion", input="x", user=f"trim-{i}")
            wait_until(
                lambda: _sample(proxy.metrics_text(), "abproxy_events_total", sink="redis") >= 400, what="written"
            )
        finally:
            proxy.stop()
        length = redis.Redis.from_url(redis_url).xlen(STREAM_KEY)
        assert 50 <= length < 400

    def test_redis_down_then_back_loses_no_event(
        self, upstreams: tuple[MockUpstream, MockUpstream], tmp_path: Path
    ) -> None:
        """With its Redis killed, the proxy answers every request and keeps the events; back, it writes them all."""
        with _proxy_on_own_redis(upstreams, tmp_path) as (own_redis, proxy):
            client = _client(proxy)
            client.chat.completions.create(model="sales-companion", messages=[{"role": "user", "content": "a"}])
            wait_until(lambda: _sample(proxy.metrics_text(), "abproxy_events_total", sink="redis") >= 1, what="xadd")
            own_redis.kill()
            ids = []
            for i in range(30):
                raw = client.chat.completions.with_raw_response.create(
                    model="sales-companion", messages=[{"role": "user", "content": "b"}], user=f"down-{i}"
                )
                assert raw.parse().choices[0].message.content
                ids.append(raw.headers["x-request-id"])
            # stdout kept every event (its own sink flushes on its own schedule: wait for it)
            wait_until(lambda: len(proxy.events()) >= 31, timeout=10, what="stdout events")
            assert _sample(proxy.metrics_text(), "abproxy_events_total", sink="redis") == 1
            own_redis.start()  # empty (no persistence): what arrives now is what the proxy kept
            wait_until(lambda: set(ids) <= {e["request_id"] for e in _stream_events(own_redis.url)}, timeout=20,
                       what=f"the kept events written\n{proxy.logs()}")  # fmt: skip
            metrics = proxy.metrics_text()
            assert _sample(metrics, "abproxy_events_dropped_total", sink="redis") == 0
            assert _sample(metrics, "abproxy_events_total", sink="redis") == 31
            assert '"event_sink_failing"' in proxy.stderr_path.read_text()
            wait_until(lambda: '"event_sink_recovered"' in proxy.stderr_path.read_text(), what="recovery logged")

    def test_outage_beyond_the_buffer_drops_exactly_the_overflow(
        self, upstreams: tuple[MockUpstream, MockUpstream], tmp_path: Path
    ) -> None:
        """max_buffered 10, Redis down for 25 requests: exactly 15 counted buffer_full, the 10 kept written after."""
        own_redis = RedisServer(tmp_path)
        own_redis.start()
        proxy = ProxyServer(_stream_config(upstreams, timeout_s=0.2, max_buffered=10), tmp_path, own_redis.url)
        proxy.start()
        try:
            client = _client(proxy)
            own_redis.kill()
            ids = []
            for i in range(25):
                raw = client.chat.completions.with_raw_response.create(
                    model="sales-companion", messages=[{"role": "user", "content": "b"}], user=f"over-{i}"
                )
                ids.append(raw.headers["x-request-id"])
            wait_until(lambda: len(proxy.events()) >= 25, timeout=10, what="stdout events")
            dropped = _sample(proxy.metrics_text(), "abproxy_events_dropped_total", sink="redis", reason="buffer_full")
            assert dropped == 15
            own_redis.start()
            wait_until(lambda: _sample(proxy.metrics_text(), "abproxy_events_total", sink="redis") >= 10, timeout=20,
                       what="the kept events written")  # fmt: skip
            in_stream = [e["request_id"] for e in _stream_events(own_redis.url)]
            assert len(in_stream) == 10 and set(in_stream) <= set(ids)
            metrics = proxy.metrics_text()
            assert _sample(metrics, "abproxy_events_dropped_total", sink="redis", reason="buffer_full") == 15
            assert _sample(metrics, "abproxy_events_dropped_total", sink="redis", reason="sink_error") == 0
            assert '"event_buffer_full"' in proxy.stderr_path.read_text()
        finally:
            proxy.stop()
            own_redis.stop()

    def test_slow_redis_does_not_hold_requests(
        self, upstreams: tuple[MockUpstream, MockUpstream], tmp_path: Path
    ) -> None:
        """While Redis stalls every write (CLIENT PAUSE), requests are still answered; the events wait, then land."""
        with _proxy_on_own_redis(upstreams, tmp_path) as (own_redis, proxy):
            control = redis.Redis.from_url(own_redis.url)
            # Paused far longer than the client waits: a request that waited on Redis would time out.
            control.execute_command("CLIENT", "PAUSE", "60000", "WRITE")
            ids = []
            try:
                client = _client(proxy).with_options(timeout=10)
                for _ in range(30):
                    raw = client.chat.completions.with_raw_response.create(
                        model="sales-companion", messages=[{"role": "user", "content": "x"}]
                    )
                    assert raw.parse().choices[0].message.content
                    ids.append(raw.headers["x-request-id"])
                wait_until(lambda: '"event_sink_failing"' in proxy.stderr_path.read_text(), timeout=10,
                           what="the stalled write noticed")  # fmt: skip
            finally:
                control.execute_command("CLIENT", "UNPAUSE")
                control.close()
            # A timed-out pipeline may still have been applied: some events can be in the stream twice.
            wait_until(lambda: set(ids) <= {e["request_id"] for e in _stream_events(own_redis.url)}, timeout=20,
                       what="the stalled events written")  # fmt: skip
            assert _sample(proxy.metrics_text(), "abproxy_events_dropped_total", sink="redis") == 0


class TestEventLog:
    async def test_full_buffer_drops_and_counts(self) -> None:
        """Past its bound a sink's buffer drops events and counts them as buffer_full."""
        out = io.BytesIO()
        metrics = Metrics(CollectorRegistry())
        log = EventLog([(StdoutSink(out), 3)], metrics)
        for i in range(5):
            log.emit({"request_id": f"r{i}"})
        await log.flush()
        assert [json.loads(line)["request_id"] for line in out.getvalue().splitlines()] == ["r0", "r1", "r2"]
        assert metrics.events_dropped.labels("stdout", "buffer_full")._value.get() == 2
        assert metrics.events.labels("stdout")._value.get() == 3

    async def test_failing_sink_keeps_its_events_and_loses_them_only_at_shutdown(self) -> None:
        """A sink that raises keeps its events (the other sink gets every one); at stop they are counted sink_error."""
        out = io.BytesIO()
        metrics = Metrics(CollectorRegistry())
        log = EventLog([(Flaky(fail=1000), 100), (StdoutSink(out), 100)], metrics)
        for i in range(5):
            log.emit({"request_id": f"r{i}"})
        await log.flush()
        await log.flush()
        assert len(out.getvalue().splitlines()) == 5
        assert metrics.events_dropped.labels("flaky", "sink_error")._value.get() == 0
        with capture_logs() as logs:
            await log.stop()
        assert metrics.events_dropped.labels("flaky", "sink_error")._value.get() == 5
        assert metrics.events.labels("flaky")._value.get() == 0
        lost = [entry for entry in logs if entry["event"] == "event_sink_lost_at_shutdown"]
        assert [(entry["sink"], entry["events"]) for entry in lost] == [("flaky", 5)]

    async def test_failed_batch_is_retried_first_and_in_order(self) -> None:
        """Batches a sink refused are written when it recovers, before newer events, each once, none dropped."""
        sink = Flaky(fail=3)
        metrics = Metrics(CollectorRegistry())
        log = EventLog([(sink, 100)], metrics)
        for i in range(5):
            log.emit({"request_id": f"r{i}"})
        for _ in range(3):  # three failed tries of the first batch: nothing written, nothing lost
            await log.flush()
        assert sink.written == [] and sink.calls == 3
        for i in range(5, 8):
            log.emit({"request_id": f"r{i}"})
        await log.flush()
        assert sink.written == [f"r{i}" for i in range(8)]
        assert metrics.events.labels("flaky")._value.get() == 8
        assert metrics.events_dropped.labels("flaky", "buffer_full")._value.get() == 0
        assert metrics.events_dropped.labels("flaky", "sink_error")._value.get() == 0

    async def test_the_bound_counts_the_batch_held_for_a_retry(self) -> None:
        """Bound 5 while the sink fails: the oldest 5 are kept (the failed batch too), every newer one counted."""
        sink = Flaky(fail=2)
        metrics = Metrics(CollectorRegistry())
        log = EventLog([(sink, 5)], metrics)
        for i in range(8):
            log.emit({"request_id": f"r{i}"})
        await log.flush()  # fails: the batch goes back to the front
        for i in range(8, 10):
            log.emit({"request_id": f"r{i}"})
        assert metrics.events_dropped.labels("flaky", "buffer_full")._value.get() == 5
        await log.flush()  # fails again
        await log.flush()
        assert sink.written == [f"r{i}" for i in range(5)]
        log.emit({"request_id": "after"})  # room again
        await log.stop()
        assert sink.written == [*(f"r{i}" for i in range(5)), "after"]
        assert metrics.events_dropped.labels("flaky", "buffer_full")._value.get() == 5
        assert metrics.events_dropped.labels("flaky", "sink_error")._value.get() == 0

    async def test_periodic_retry_waits_for_the_sinks_retry_delay(self) -> None:
        """The drain task tries a failed sink again only after its retry_after_s, then delivers everything."""
        sink = Flaky(fail=1, retry_after_s=0.3)
        log = EventLog([(sink, 100)], Metrics(CollectorRegistry()), flush_interval_s=0.01)
        await log.start()
        try:
            for i in range(3):
                log.emit({"request_id": f"r{i}"})
            deadline = asyncio.get_running_loop().time() + 10
            while len(sink.written) < 3:
                assert asyncio.get_running_loop().time() < deadline, "never retried"
                await asyncio.sleep(0.01)
            assert sink.calls == 3  # one failure, then the two batches (size 2): not a try per 10 ms tick
        finally:
            await log.stop()
        assert sink.written == ["r0", "r1", "r2"]

    async def test_a_batch_cancelled_mid_write_is_kept_for_the_final_flush(self) -> None:
        """Shutdown cancels a write that hangs; the batch goes back and the final flush writes it."""
        sink = Flaky(fail=0, hang_first=True)
        metrics = Metrics(CollectorRegistry())
        log = EventLog([(sink, 100)], metrics, flush_interval_s=0.01)
        await log.start()
        log.emit({"request_id": "r0"})
        deadline = asyncio.get_running_loop().time() + 10
        while not sink.calls:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        await log.stop()
        assert sink.written == ["r0"]
        assert metrics.events_dropped.labels("flaky", "sink_error")._value.get() == 0

    async def test_retried_batch_in_the_stream_twice_is_stored_once(self, redis_url: str, tmp_path: Path) -> None:
        """A batch applied by Redis whose reply was lost is written again: two entries, one stored request."""

        class LostReply(RedisStreamSink):
            """Writes the batch, then fails as if the connection dropped before the reply: the first time only."""

            failed = False

            async def write(self, batch: list[tuple[str, bytes]]) -> None:
                await super().write(batch)
                if not self.failed:
                    self.failed = True
                    raise ConnectionError("connection lost after the batch was sent")

        sink = LostReply(redis_url, key=STREAM_KEY, maxlen=1000, batch_size=10, timeout_s=1, retry_after_s=0)
        metrics = Metrics(CollectorRegistry())
        log = EventLog([(sink, 100)], metrics)
        for i in range(4):
            log.emit(request_event(f"twice-{i}"))
        await log.flush()  # in the stream, but "failed": kept
        await log.flush()  # retried: in the stream again
        await log.stop()
        in_stream = [e["request_id"] for e in _stream_events(redis_url)]
        assert sorted(in_stream) == sorted([f"twice-{i}" for i in range(4)] * 2)
        assert metrics.events.labels("redis")._value.get() == 4

        engine = engine_for(f"sqlite:///{tmp_path / 'store.db'}")
        migrate(engine)
        client = aioredis.from_url(redis_url)
        try:
            collector = Collector(client, Store(engine), key=STREAM_KEY, group="g", consumer="c")
            assert await collector.drain() == 8
            assert (collector.stored, collector.duplicates) == (4, 4)
            with engine.connect() as conn:
                rows = conn.execute(select(requests.c.request_id)).scalars().all()
            assert sorted(rows) == [f"twice-{i}" for i in range(4)]
        finally:
            await client.aclose()
            engine.dispose()

    async def test_no_sinks_means_emit_does_nothing(self) -> None:
        """With every sink switched off, emit neither buffers nor counts."""
        metrics = Metrics(CollectorRegistry())
        log = EventLog([], metrics)
        log.emit({"request_id": "r"})
        await log.flush()
        assert log.sink_names == []

    async def test_redis_sink_writes_entries_readers_decode(self, redis_url: str) -> None:
        """RedisStreamSink's entries decode back to the emitted events, in order."""
        sink = RedisStreamSink(redis_url, key="t:events", maxlen=1000, batch_size=2, timeout_s=1)
        log = EventLog([(sink, 100)], Metrics(CollectorRegistry()))
        for i in range(5):
            log.emit({"request_id": f"r{i}", "n": i})
        await log.stop()
        client = aioredis.from_url(redis_url)
        entries = await client.xrange("t:events")
        await client.aclose()
        events = [decode_entry(eid, fields) for eid, fields in entries]
        assert [e.request_id for e in events] == [f"r{i}" for i in range(5)]
        assert [e.event["n"] for e in events] == list(range(5))

    async def test_redis_sink_lays_out_entries_as_entry_fields_and_reloads_its_script(self, redis_url: str) -> None:
        """The batch script writes exactly event_stream.entry_fields' fields, in that order, and keeps
        writing after Redis lost its script cache (a restart: NOSCRIPT, loaded again)."""
        client = aioredis.from_url(redis_url)
        await client.delete("t:layout")
        sink = RedisStreamSink(redis_url, key="t:layout", maxlen=1000, batch_size=10, timeout_s=1)
        try:
            first = [("a" * 40, orjson.dumps({"request_id": "a" * 40, "x": "é"}))]
            await sink.write(first)
            await client.script_flush()
            await sink.write([("b" * 40, orjson.dumps({"request_id": "b" * 40}))])
            entries = await client.xrange("t:layout")
        finally:
            await sink.close()
            await client.aclose()
        assert len(entries) == 2
        expected = entry_fields(*first[0])
        assert list(entries[0][1].items()) == [(k.encode(), str(v).encode() if isinstance(v, int) else
                                                v if isinstance(v, bytes) else v.encode())
                                               for k, v in expected.items()]  # fmt: skip
        assert decode_entry(*entries[1]).request_id == "b" * 40


class TestConsumerGroup:
    async def _add(self, client: aioredis.Redis, n: int, key: str = STREAM_KEY) -> None:
        for i in range(n):
            await client.xadd(key, entry_fields(f"req-{i}", orjson.dumps({"request_id": f"req-{i}"})))

    async def test_read_ack_and_pending(self, redis_url: str) -> None:
        """A group reads each entry once; unacked entries stay pending, acked ones do not."""
        client = aioredis.from_url(redis_url)
        reader = ConsumerGroupReader(client, "analysis", "worker-1")
        await reader.ensure_group()
        await reader.ensure_group()  # idempotent
        await self._add(client, 5)
        first = [decode_entry(*entry) for entry in await reader.read(count=3)]
        second = [decode_entry(*entry) for entry in await reader.read(count=10)]
        assert [e.request_id for e in first + second] == [f"req-{i}" for i in range(5)]
        assert await reader.read(count=10) == []
        await reader.ack([e.entry_id for e in first])
        own = await reader.read(cursor="0")  # this consumer's pending entries, for a restart
        assert [decode_entry(*entry).request_id for entry in own] == ["req-3", "req-4"]
        pending = await client.xpending(STREAM_KEY, "analysis")
        assert pending["pending"] == 2
        await client.aclose()

    async def test_stale_entries_are_claimed_by_another_consumer(self, redis_url: str) -> None:
        """Entries a dead consumer held are handed to a live one, so none is lost."""
        client = aioredis.from_url(redis_url)
        dead = ConsumerGroupReader(client, "analysis", "dead")
        await dead.ensure_group()
        await self._add(client, 3)
        assert len(await dead.read()) == 3
        live = ConsumerGroupReader(client, "analysis", "live")
        _cursor, claimed = await live.claim(min_idle_ms=0)
        assert sorted(decode_entry(*entry).request_id for entry in claimed) == ["req-0", "req-1", "req-2"]
        await client.aclose()

    async def test_group_created_on_existing_stream_reads_history(self, redis_url: str) -> None:
        """A group created after events were written still reads them (start id 0)."""
        client = aioredis.from_url(redis_url)
        await self._add(client, 4)
        reader = ConsumerGroupReader(client, "late", "w")
        await reader.ensure_group()
        assert len(await reader.read()) == 4
        await client.aclose()

    def test_malformed_entry_is_refused(self) -> None:
        """An entry without the documented fields raises ValueError naming the entry."""
        with pytest.raises(ValueError, match="1-0"):
            decode_entry(b"1-0", {b"event": b"{}"})
        with pytest.raises(ValueError, match="not an object"):
            decode_entry(b"1-1", {b"event": b"[1]", b"schema_version": b"1", b"request_id": b"r"})

    async def test_tail_skips_malformed_and_replays_last(self, redis_url: str) -> None:
        """tail() replays the last N, reports a malformed entry and carries on."""
        client = aioredis.from_url(redis_url)
        await self._add(client, 3)
        await client.xadd(STREAM_KEY, {"junk": "1"})
        await self._add(client, 1)
        problems: list[str] = []
        seen = []
        async for event in tail(client, STREAM_KEY, last=4, block_ms=100, on_malformed=problems.append):
            seen.append(event.request_id)
            if len(seen) == 3:
                break
        await client.aclose()
        assert seen == ["req-1", "req-2", "req-0"]
        assert len(problems) == 1


class TestTailFormat:
    def test_line_has_the_figures(self) -> None:
        """A readable line names experiment, variant, model, status, latency, tokens, cost and request id."""
        line = format_line(
            {"time": "2026-11-23T10:00:00Z", "experiment": "e", "variant": "treatment", "upstream_model": "ft",
             "endpoint": "chat.completions", "stream": True, "status": 200, "error": None, "latency_ms": 812.34,
             "ttft_ms": 120.0, "prompt_tokens": 35, "completion_tokens": 120, "cost_usd": 0.00015,
             "finish_reason": "stop", "request_id": "abc"}
        )
        for part in ("e", "treatment", "ft", "chat.completions stream", "200", "812.3ms", "ttft 120.0ms",
                     "35+120 tok", "$0.000150", "stop", "req=abc"):
            assert part in line

    def test_rejected_request_line(self) -> None:
        """A request refused before routing is shown as rejected with its error code."""
        line = format_line({"ts": 1.0, "experiment": None, "path": "/v1/x", "status": 400, "error": "invalid_json",
                            "request_id": "r"})
        assert "rejected" in line and "invalid_json" in line

    def test_feedback_lines(self) -> None:
        """Feedback shows its metric, value and what it is about (a request, or a user's hash)."""
        request = format_line({"kind": "feedback", "time": "t", "level": "request", "metric": "csat", "value": 4.0,
                               "request_id": "r1", "user_hash": None, "experiment": None})
        assert "feedback" in request and "csat=4.0" in request and "req=r1" in request
        user = format_line({"kind": "feedback", "time": "t", "level": "user", "metric": "returned", "value": 1.0,
                            "request_id": None, "user_hash": "ab12", "experiment": "e"})
        assert "returned=1.0" in user and "user=ab12 in e" in user

    def test_filters(self) -> None:
        """--experiment and --variant filters match exactly, and None matches all."""
        event = {"experiment": "e", "variant": "control"}
        assert matches(event, None, None) and matches(event, "e", "control")
        assert not matches(event, "other", None) and not matches(event, None, "treatment")


class TestCli:
    def _config_file(self, proxy: ProxyServer) -> str:
        return str(next(Path(proxy.stdout_path.parent).glob(f"proxy-{proxy.port}.yaml")))

    def _tail(self, proxy: ProxyServer, redis_url: str, *args: str) -> subprocess.Popen[str]:
        env = {**os.environ, "REDIS_URL": redis_url}
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "events", "tail", "--config", self._config_file(proxy), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
        )
        try:
            wait_until(lambda: _consumers_blocked(redis_url), what="tail waiting in XREAD")
        except TimeoutError:
            proc.kill()
            raise AssertionError(f"tail never reached XREAD: {proc.communicate()}") from None
        return proc

    def _lines_until(self, proc: subprocess.Popen[str], wanted: set[str]) -> list[str]:
        lines: list[str] = []
        found: set[str] = set()
        result: dict[str, BaseException] = {}

        def read() -> None:
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    lines.append(line)
                    found.update(w for w in wanted if w in line)
                    if found == wanted:
                        return
            except BaseException as exc:  # pragma: no cover - surfaced below
                result["error"] = exc

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout=20)
        # SIGTERM: a process started from a non-interactive shell's background job ignores SIGINT.
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
        stderr = proc.stderr.read() if proc.stderr else ""
        assert found == wanted, f"missing {wanted - found}; got {lines}; stderr {stderr}"
        return lines

    def test_tail_follows_requests_live(self, stream_proxy: ProxyServer, redis_server: RedisServer) -> None:
        """`abproxy events tail` prints one line per new request, with its request id."""
        tail_proc = self._tail(stream_proxy, redis_server.url)
        client = _client(stream_proxy)
        ids = set()
        for i in range(3):
            raw = client.chat.completions.with_raw_response.create(
                model="sales-companion", messages=[{"role": "user", "content": "hi"}], user=f"tail-{i}"
            )
            ids.add(f"req={raw.headers['x-request-id']}")
        lines = self._lines_until(tail_proc, ids)
        assert all("sales-companion" in line for line in lines)

    def test_tail_variant_filter_and_json(self, stream_proxy: ProxyServer, redis_server: RedisServer) -> None:
        """--variant treatment --json prints only treatment events, each a JSON object."""
        tail_proc = self._tail(stream_proxy, redis_server.url, "--variant", "treatment", "--json")
        client = _client(stream_proxy)
        treatment_ids = set()
        for i in range(30):
            raw = client.chat.completions.with_raw_response.create(
                model="sales-companion", messages=[{"role": "user", "content": "hi"}], user=f"tailv-{i}"
            )
            if raw.headers["x-abproxy-variant"] == "treatment":
                treatment_ids.add(raw.headers["x-request-id"])
        assert treatment_ids
        lines = self._lines_until(tail_proc, treatment_ids)
        events = [json.loads(line) for line in lines]
        assert {e["variant"] for e in events} == {"treatment"}

    def test_traffic_sends_both_variants_and_ramps(self, proxy: ProxyServer, redis_url: str) -> None:
        """`abproxy traffic` drives requests through the proxy and walks the rollout through --ramp."""
        env = {**os.environ, "ABPROXY_ADMIN_TOKEN": proxy.admin_token or ""}
        done = subprocess.run(
            [sys.executable, "-m", "proxy", "traffic", "--base-url", f"{proxy.url}/v1", "--rps", "40",
             "--users", "200", "--duration", "2", "--ramp", "20,60", "--ramp-every", "0.5", "--stream-share", "0.5"],
            capture_output=True, text=True, env=env, timeout=60,
        )
        assert done.returncode == 0, done.stderr
        sent = int(done.stdout.split()[1].rstrip(":"))
        assert sent >= 10
        assert "rollout sales-companion -> 60%: HTTP 200" in done.stderr
        with proxy.admin() as admin:
            audit = admin.get("/admin/experiments/sales-companion/audit").json()["entries"]
        assert {entry["to"] for entry in audit} >= {20, 60}
        wait_until(lambda: len(proxy.events()) >= sent, what="events")
        assert {e["variant"] for e in proxy.events()} == {"control", "treatment"}

    def test_traffic_refuses_bad_options(self) -> None:
        """A negative rate or a ramp without an admin token stops with one line, before any request."""
        env = {k: v for k, v in os.environ.items() if k != "ABPROXY_ADMIN_TOKEN"}
        bad_rate = subprocess.run([sys.executable, "-m", "proxy", "traffic", "--rps", "-1"],
                                  capture_output=True, text=True, env=env)
        assert bad_rate.returncode == 2 and "--rps" in bad_rate.stderr
        no_token = subprocess.run([sys.executable, "-m", "proxy", "traffic", "--ramp", "5,10"],
                                  capture_output=True, text=True, env=env)
        assert no_token.returncode == 2 and "ABPROXY_ADMIN_TOKEN" in no_token.stderr


class Flaky:
    """A sink that fails its first `fail` writes (and may hang on its first), then records what it gets."""

    name = "flaky"
    batch_size = 2

    def __init__(self, *, fail: int, retry_after_s: float = 0.0, hang_first: bool = False) -> None:
        self.fail, self.retry_after_s, self.hang_first = fail, retry_after_s, hang_first
        self.calls = 0
        self.written: list[str] = []

    async def write(self, batch: list[tuple[str, bytes]]) -> None:
        self.calls += 1
        if self.hang_first and self.calls == 1:
            await asyncio.Event().wait()  # until cancelled
        if self.calls <= self.fail:
            raise OSError("sink unavailable")
        self.written += [request_id for request_id, _ in batch]

    async def close(self) -> None:
        return None


def _consumers_blocked(url: str) -> bool:
    """True once some client is blocked in XREAD: the tail has reached its follow loop."""
    info = redis.Redis.from_url(url).info("clients")
    return int(info.get("blocked_clients", 0)) > 0


