"""The per-request event stream: one JSON event per request, fanned out to sinks off the request path.

`EventLog.emit` encodes the event once (orjson) and appends it to each sink's buffer; nothing
else happens on the request path. Each sink drains its own buffer from a background task, so a
slow Redis never holds up stdout and a full pipe never holds up Redis.

A batch the sink fails to take stays at the front of its buffer and is tried again, in order,
on a later flush tick (after the sink's `retry_after_s`), so an outage shorter than the buffer
loses nothing. Events are dropped, and counted (`abproxy_events_dropped_total{sink,reason}`),
only when the buffer is full (`buffer_full`: an outage longer than the buffer holds), and at
shutdown for what a still-failing sink could not take (`sink_error`): losing an event is better
than failing or slowing a request. structlog formats the service's own logs; it is not used for
events because its processor chain measured ~30 us per request.

Sinks:
    StdoutSink        JSON lines, written in a worker thread (`events.enabled`)
    RedisStreamSink   XADD with an approximate MAXLEN, pipelined in batches
                      (`events.redis_stream.enabled`); the layout is in `event_stream.py`
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from typing import Any, BinaryIO, Protocol

import orjson
import redis.asyncio as aioredis
import structlog

from proxy.background import cancel_and_wait
from proxy.event_stream import SCHEMA_VERSION
from proxy.metrics import Metrics

log = structlog.get_logger("abproxy")

# (request id, the event as JSON bytes without a trailing newline)
Encoded = tuple[str, bytes]


class Sink(Protocol):
    name: str
    batch_size: int  # events per write call
    retry_after_s: float  # after a failed write, the wait before the batch is tried again

    async def write(self, batch: list[Encoded]) -> None:
        """Deliver the batch or raise; the caller keeps the batch and tries it again later.

        A write that raised may have delivered part of the batch: the retry then delivers that
        part twice. Readers deduplicate by request id (see `event_stream.py`).
        """

    async def close(self) -> None: ...


class _Buffered:
    """One sink's bounded buffer and the task that drains it.

    `held` counts every event not yet written: those queued in `items` and the batch being
    written (`in_flight`). Both count against the bound, so a failed batch always fits back at
    the front of the queue and the bound is the most this sink ever holds.
    """

    def __init__(self, sink: Sink, metrics: Metrics, *, interval_s: float, max_buffered: int) -> None:
        self.sink = sink
        self.items: deque[Encoded] = deque()
        self.in_flight = 0
        self.max = max_buffered
        self.interval_s = interval_s
        self.written = metrics.events.labels(sink.name)
        self.lost_full = metrics.events_dropped.labels(sink.name, "buffer_full")
        self.lost_error = metrics.events_dropped.labels(sink.name, "sink_error")
        self.failing = False
        self.dropped_full = 0  # refused since the sink last recovered
        self.full_logged = False
        self.next_try = 0.0  # monotonic: after a failure, the periodic drain waits until then
        self.task: asyncio.Task[None] | None = None

    @property
    def held(self) -> int:
        return len(self.items) + self.in_flight

    def offer(self, item: Encoded) -> None:
        # On the request path: O(1), never waits. Full, the NEWEST event is refused, not the
        # oldest: the held events are the start of the outage, already in order, and the batch in
        # flight cannot be taken back anyway. What reaches the stream is then an unbroken prefix
        # of the outage followed by the events after it, with one gap, counted, in between. (An
        # A/B analysis values every event alike; keeping the newest would buy no freshness.)
        if self.held >= self.max:
            self.lost_full.inc()
            self.dropped_full += 1
            return
        self.items.append(item)

    async def drain(self, *, wait_for_retry: bool = True) -> bool:
        """Write what is buffered now, batch by batch, oldest first; False if a write failed.

        A failed batch goes back to the front and the rest waits behind it (order is kept): the
        next tick tries again, once the sink's `retry_after_s` has passed (`wait_for_retry`).
        """
        if self.dropped_full and not self.full_logged:
            self.full_logged = True  # once per outage: offer() itself never logs
            log.error("event_buffer_full", sink=self.sink.name, bound=self.max, note="newer events are dropped")
        if wait_for_retry and time.monotonic() < self.next_try:
            return False
        # Only what is here now: events offered meanwhile wait for the next tick, so a flush ends.
        remaining = len(self.items)
        while remaining > 0 and self.items:
            size = min(self.sink.batch_size, remaining, len(self.items))
            batch = [self.items.popleft() for _ in range(size)]
            remaining -= size
            if not await self._write(batch):
                return False
        return True

    async def _write(self, batch: list[Encoded]) -> bool:
        self.in_flight = len(batch)
        delivered = False
        try:
            await self.sink.write(batch)
            delivered = True
        except Exception as exc:  # any sink failure keeps this batch, never fails the proxy
            self.next_try = time.monotonic() + self.sink.retry_after_s
            if not self.failing:
                self.failing = True
                log.warning(
                    "event_sink_failing", sink=self.sink.name, error=str(exc) or type(exc).__name__,
                    held=self.held, bound=self.max, note="events are kept and retried until the buffer is full",
                )  # fmt: skip
            return False
        finally:
            self.in_flight = 0
            if not delivered:
                # Back to the front, in order: the next try starts with it. Cancelled mid-write
                # (shutdown), it is also kept, for the final flush.
                self.items.extendleft(reversed(batch))
        self.written.inc(len(batch))
        if self.failing:
            self.failing = False
            log.info("event_sink_recovered", sink=self.sink.name, held=self.held, dropped_buffer_full=self.dropped_full)
            self.dropped_full, self.full_logged = 0, False
        elif self.full_logged and self.held < self.max:  # a slow sink caught up: a new episode logs again
            self.dropped_full, self.full_logged = 0, False
        return True

    def give_up(self) -> None:
        """Shutdown with the sink still failing: count what it could not take as lost, log once."""
        if not self.items:
            return
        lost = len(self.items)
        self.items.clear()
        self.lost_error.inc(lost)
        log.error("event_sink_lost_at_shutdown", sink=self.sink.name, events=lost)

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
        """Stop the drain tasks, give each sink one last try at what it holds, then count the rest lost."""
        for buffer in self._buffers:
            await cancel_and_wait(buffer.task)
            buffer.task = None
        await self.flush()
        for buffer in self._buffers:
            buffer.give_up()
            await buffer.sink.close()

    async def flush(self) -> None:
        """Try to write everything buffered now, without waiting out a failed sink's retry delay.

        A sink that fails keeps its events (tried again by its task, or by `stop`).
        """
        for buffer in self._buffers:
            await buffer.drain(wait_for_retry=False)


class StdoutSink:
    name = "stdout"
    batch_size = 10_000
    retry_after_s = 1.0

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


# One script call appends a whole batch: ARGV = maxlen, schema version, then request id and event
# per entry, each entry laid out as event_stream.entry_fields lays it out. A pipeline of one XADD per
# event cost the proxy 17-22 µs of CPU per event in redis-py's command packing and reply handling;
# the script, one command, ~4 µs (timeit-style loop, 500-event batches).
_XADD_BATCH = """
for i = 3, #ARGV, 2 do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
             'request_id', ARGV[i], 'schema_version', ARGV[2], 'event', ARGV[i + 1])
end
return (#ARGV - 2) / 2
"""


class RedisStreamSink:
    """XADD ... MAXLEN ~ N, one script call (one round trip) per batch.

    Its own connection pool with short timeouts: a slow or absent Redis costs this task time,
    never a request, and never a rollout-cache connection. After a failure the buffer waits
    `retry_after_s` and tries the same batch again; events arriving meanwhile wait behind it.

    A script runs atomically, so Redis appends a batch whole or not at all; but a batch whose reply
    never came back (Redis killed, or a timeout) may have been appended, and the retry appends it
    again. The stream then holds some events twice, with two entry ids and one request id; the
    collector's writes are idempotent by request id (`store/db.py`: INSERT .. ON CONFLICT
    (request_id) DO NOTHING), so the store still holds each request once. While a batch is
    appended Redis serves no one else: ~1 ms for the default 500 events (batch_size is capped).
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
        self.retry_after_s = retry_after_s
        self._redis = aioredis.from_url(
            redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, max_connections=2
        )
        # redis-py sends EVALSHA and loads the script again when Redis answers NOSCRIPT (a restart).
        self._append = self._redis.register_script(_XADD_BATCH)

    async def write(self, batch: list[Encoded]) -> None:
        args: list[str | int | bytes] = [self._maxlen, SCHEMA_VERSION]
        for request_id, event in batch:
            args += (request_id, event)
        await asyncio.wait_for(self._append(keys=[self.key], args=args), self._timeout_s)

    async def close(self) -> None:
        await self._redis.aclose()
