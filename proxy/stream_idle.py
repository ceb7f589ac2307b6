"""The stream idle timeout: an upstream stream silent for its `stream_idle_timeout_s` is cut.

aiohttp has one (ClientTimeout.sock_read), but it cancels and re-arms an event-loop timer on every
socket read: ~4 us a chunk, a tenth of the proxy's whole per-chunk CPU (bench scenario 2, A/B over
7 alternating rounds). Here one task looks at every open stream a few times per timeout instead,
comparing the bytes its reader has received (StreamReader.total_bytes, which aiohttp counts anyway):
nothing is done per chunk. A silence is caught between the timeout and a quarter past it (at most
1 s past it for long timeouts, 10 ms for timeouts under 40 ms).

A stream is handed over once its headers are in. Until its first chunk, aiohttp's own timer (armed
when the headers arrived) stays as well; either catches a silence there.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import structlog

log = structlog.get_logger("abproxy")

# The watch looks this often per (shortest) timeout, within these bounds in seconds.
CHECKS_PER_TIMEOUT = 4
TICK_BOUNDS_S = (0.01, 1.0)


class _Silence:
    __slots__ = ("received", "since", "timeout_s")

    def __init__(self, timeout_s: float, received: int, since: float) -> None:
        self.timeout_s = timeout_s
        self.received = received  # the reader's byte count when last looked at
        self.since = since  # loop time at which that count was first seen


class IdleWatch:
    """Cuts a stream when its upstream has sent nothing for its timeout: the reader raises aiohttp's
    SocketTimeoutError (what sock_read raises) and the connection is closed on release, not pooled."""

    def __init__(self, shortest_timeout_s: float) -> None:
        low, high = TICK_BOUNDS_S
        self.tick_s = min(max(shortest_timeout_s / CHECKS_PER_TIMEOUT, low), high)
        self._streams: dict[aiohttp.ClientResponse, _Silence] = {}
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._streams)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="stream-idle-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._streams.clear()

    def watch(self, response: aiohttp.ClientResponse, timeout_s: float) -> None:
        """From now on `response` (headers in) is cut after `timeout_s` without a byte."""
        connection = response.connection
        if connection is not None and connection.protocol is not None:
            # Its next read drops aiohttp's timer and arms none: from there on this watch alone times it.
            connection.protocol.read_timeout = None
        self._streams[response] = _Silence(timeout_s, response.content.total_bytes, asyncio.get_running_loop().time())

    def forget(self, response: aiohttp.ClientResponse) -> None:
        self._streams.pop(response, None)

    def check(self, now: float) -> None:
        """Cut every stream silent for its timeout at loop time `now`; forget finished ones."""
        for response, silence in list(self._streams.items()):
            connection = response.connection
            if connection is None or response.closed:  # read to its end, or released without `forget`
                del self._streams[response]
                continue
            received = response.content.total_bytes
            transport = connection.transport
            # Reading paused (the client is slower than the upstream, its buffer full) is not silence:
            # aiohttp stops its timer then too.
            if received != silence.received or (transport is not None and not transport.is_reading()):
                silence.received, silence.since = received, now
            elif now - silence.since >= silence.timeout_s:
                del self._streams[response]
                # As aiohttp's own timer does: the reader raises this in the task relaying the
                # stream, and the connection is marked to close (a half-read answer is not pooled).
                error = aiohttp.SocketTimeoutError("no data from the upstream in time")
                if connection.protocol is not None:
                    connection.protocol.set_exception(error)
                response.content.set_exception(error)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                self.check(loop.time())
            except Exception as exc:  # one bad look must not end the timeout for every later stream
                log.error("stream_idle_check_failed", error=repr(exc))
