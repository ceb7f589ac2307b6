"""The per-request event stream: one JSON event per request, fanned out to sinks off the request path.

`EventLog.emit` encodes the event once (orjson) and appends it to each sink's buffer; nothing
else happens on the request path. Each sink drains its own buffer from a background task, so a
slow Redis never holds up stdout and a full pipe never holds up Redis. A sink whose buffer is
full, or whose write fails, drops those events and counts them
(`abproxy_events_dropped_total{sink,reason}`): losing an event is better than failing or
slowing a request. structlog formats the service's own logs; it is not used for events because
its processor chain measured ~30 us per request.

Sinks:
    StdoutSink        JSON lines, written in a worker thread (`events.enabled`)
    RedisStreamSink   XADD with an approximate MAXLEN, pipelined in batches
                      (`events.redis_stream.enabled`); the layout is in `event_stream.py`
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any, BinaryIO, Protocol

import orjson
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from proxy.background import cancel_and_wait
from proxy.event_stream import SCHEMA_VERSION, entry_fields
from proxy.metrics import Metrics

log = structlog.get_logger("abproxy")

# (request id, the event as JSON bytes without a trailing newline)
Encoded = tuple[str, bytes]


class Sink(Protocol):
    name: str
    batch_size: int  # events per write call

    async def write(self, batch: list[Encoded]) -> None:
        """Deliver the batch or raise; the caller counts the loss."""

    async def close(self) -> None: ...


class _Buffered:
    """One sink's bounded buffer and the task that drains it."""

    def __init__(self, sink: Sink, metrics: Metrics, *, interval_s: float, max_buffered: int) -> None:
        self.sink = sink
        self.items: list[Encoded] = []
        self.max = max_buffered
        self.interval_s = interval_s
        self.written = metrics.events.labels(sink.name)
        self.lost_full = metrics.events_dropped.labels(sink.name, "buffer_full")
        self.lost_error = metrics.events_dropped.labels(sink.name, "sink_error")
        self.failing = False
        self.task: asyncio.Task[None] | None = None

    def offer(self, item: Encoded) -> None:
        if len(self.items) >= self.max:
            self.lost_full.inc()
            return
        self.items.append(item)

    async def drain(self) -> None:
        if not self.items:
            return
        items, self.items = self.items, []
        size = self.sink.batch_size
        for start in range(0, len(items), size):
            await self._write(items[start : start + size])

    async def _write(self, batch: list[Encoded]) -> None:
        try:
            await self.sink.write(batch)
        except Exception as exc:  # any sink failure loses this batch, never the proxy
            self.lost_error.inc(len(batch))
            if not self.failing:
                self.failing = True
                log.warning("event_sink_failing", sink=self.sink.name, error=str(exc) or type(exc).__name__)
            return
        self.written.inc(len(batch))
        if self.failing:
            self.failing = False
            log.info("event_sink_recovered", sink=self.sink.name)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.drain()


class EventLog:
    def __init__(self, sinks: list[tuple[Sink, int]], metrics: Metrics, *, flush_interval_s: float = 0.1) -> None:
        """`sinks` pairs each sink with its buffer bound (events held while it catches up)."""
        self._buffers = [
            _Buffered(sink, metrics, interval_s=flush_interval_s, max_buffered=bound) for sink, bound in sinks
        ]

    @property
    def sink_names(self) -> list[str]:
        return [buffer.sink.name for buffer in self._buffers]

    def emit(self, event: dict[str, Any]) -> None:
        if not self._buffers:
            return
        event["schema_version"] = SCHEMA_VERSION
        item = (event["request_id"], orjson.dumps(event))
        for buffer in self._buffers:
            buffer.offer(item)

    async def start(self) -> None:
        for buffer in self._buffers:
            buffer.task = asyncio.create_task(buffer.run(), name=f"events-{buffer.sink.name}")

    async def stop(self) -> None:
        for buffer in self._buffers:
            await cancel_and_wait(buffer.task)
            buffer.task = None
        await self.flush()
        for buffer in self._buffers:
            await buffer.sink.close()

    async def flush(self) -> None:
        for buffer in self._buffers:
            await buffer.drain()


class StdoutSink:
    name = "stdout"
    batch_size = 10_000

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer

    async def write(self, batch: list[Encoded]) -> None:
        data = b"\n".join(line for _, line in batch) + b"\n"
        await asyncio.to_thread(self._write, data)

    def _write(self, data: bytes) -> None:
        self._stream.write(data)
        self._stream.flush()

    async def close(self) -> None:
        return None


class RedisStreamSink:
    """XADD ... MAXLEN ~ N, one pipeline round trip per batch.

    Its own connection pool with short timeouts: a slow or absent Redis costs this task time,
    never a request, and never a rollout-cache connection. After a failure it waits
    `retry_after_s` before trying again; events arriving meanwhile fill the buffer and then drop.
    """

    name = "redis"
    batch_size: int

    def __init__(
        self, redis_url: str, *, key: str, maxlen: int, batch_size: int, timeout_s: float, retry_after_s: float = 1.0
    ) -> None:
        self.key = key
        self.batch_size = batch_size
        self._maxlen = maxlen
        self._timeout_s = timeout_s
        self._retry_after_s = retry_after_s
        self._next_try = 0.0
        self._redis = aioredis.from_url(
            redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, max_connections=2
        )

    async def write(self, batch: list[Encoded]) -> None:
        if time.monotonic() < self._next_try:
            raise ConnectionError("redis event sink backing off after a failure")
        pipe = self._redis.pipeline(transaction=False)
        for request_id, event in batch:
            pipe.xadd(self.key, entry_fields(request_id, event), maxlen=self._maxlen, approximate=True)
        try:
            await asyncio.wait_for(pipe.execute(), self._timeout_s)
        except (RedisError, OSError, TimeoutError):
            self._next_try = time.monotonic() + self._retry_after_s
            raise

    async def close(self) -> None:
        await self._redis.aclose()
