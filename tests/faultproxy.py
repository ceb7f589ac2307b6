"""A fault-injecting TCP proxy for tests: put it between a process and Redis, then break the link.

    fault = FaultProxy("127.0.0.1", redis.port)   # listens on a free port, in a background thread
    ProxyServer(config, tmp, fault.url)           # the process under test talks to Redis through it
    fault.latency(150)    every chunk, both ways, waits 150 ms: every Redis command gets slow
    fault.partition()     a network partition: connections stay open, no byte moves either way, new
                          connections are accepted and go nowhere. Bytes sent meanwhile (and a close)
                          are delivered after heal(), as TCP retransmission would deliver them.
    fault.reset()         every connection is closed (RST to the client) and new ones are refused
    fault.heal()          back to normal
    fault.connections     open client connections; fault.delayed: chunks waiting out a latency now
    fault.partition_on(b"HGETALL")       arms a partition that falls the moment a client sends a chunk
                          holding those bytes (up to 256 of them): that chunk is held, sent but not
                          delivered, like everything after it, until heal() (delivered) or reset() (lost)
    fault.latency_on(b"HGETALL", 1500)   the same, but the link turns slow from that chunk on (it included)
                          Both return a threading.Event set when the bytes went by; heal() and reset()
                          disarm a trigger that has not fired.

All controls are thread-safe: they run on the proxy's own event loop and return once in force.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from tests.harness import free_port

_TAIL = 256  # bytes of the previous chunk kept, so a trigger's pattern split across two reads is still seen


@dataclass(frozen=True)
class _Trigger:
    pattern: bytes
    latency_ms: float | None  # None: a partition
    fired: threading.Event


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._latency_s = 0.0
        self._delayed: set[int] = set()  # ids of chunks sleeping out the latency now
        self._next_chunk = 0
        self._conns: set[asyncio.StreamWriter] = set()  # client sides
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._trigger: _Trigger | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"faultproxy-{self.port}", daemon=True)
        self._thread.start()
        self._flowing = self._call(self._make_event())
        self._call(self._listen())

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    # -- controls (any thread) ---------------------------------------------------------------
    def latency(self, ms: float) -> None:
        self._latency_s = ms / 1000

    def partition(self) -> None:
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def reset(self) -> None:
        self._call(self._reset())

    def heal(self) -> None:
        self._latency_s = 0.0
        self._call(self._heal())

    def partition_on(self, pattern: bytes) -> threading.Event:
        """Partition the moment a client sends `pattern` (e.g. the write of a transition): it is held in flight."""
        return self._arm(pattern, None)

    def latency_on(self, pattern: bytes, ms: float) -> threading.Event:
        """Every chunk, both ways, waits `ms` from the moment a client sends `pattern`, that chunk included."""
        return self._arm(pattern, ms)

    @property
    def connections(self) -> int:
        return len(self._conns)

    @property
    def delayed(self) -> frozenset[int]:
        """Ids of the chunks held by the latency right now: one still here later was blocked all along."""
        return frozenset(self._delayed)

    def close(self) -> None:
        self._call(self._reset())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # -- the loop's side -----------------------------------------------------------------------
    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def _arm(self, pattern: bytes, latency_ms: float | None) -> threading.Event:
        if not 0 < len(pattern) <= _TAIL:
            raise ValueError(f"a trigger's pattern is 1 to {_TAIL} bytes")
        trigger = _Trigger(pattern, latency_ms, threading.Event())

        async def arm() -> None:
            self._trigger = trigger

        self._call(arm())
        return trigger.fired

    def _fire(self, tail: bytes, data: bytes) -> None:
        """On the loop: a client's chunk `data` went by; spring the trigger if its pattern ends in `data` (it may
        begin in `tail`, the end of the previous chunk, but a match wholly in `tail` was an earlier command)."""
        trigger = self._trigger
        if trigger is None:
            return
        keep = len(trigger.pattern) - 1
        if trigger.pattern not in tail[len(tail) - keep :] + data:
            return
        self._trigger = None
        if trigger.latency_ms is None:
            self._flowing.clear()  # before this chunk is written: it waits for the heal
        else:
            self._latency_s = trigger.latency_ms / 1000  # before this chunk's own wait: it is slow too
        trigger.fired.set()

    async def _make_event(self) -> asyncio.Event:
        event = asyncio.Event()
        event.set()
        return event

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)

    async def _heal(self) -> None:
        self._trigger = None
        if self._server is None:
            await self._listen()
        self._flowing.set()

    async def _reset(self) -> None:
        self._trigger = None
        if self._server is not None:
            self._server.close()  # refuse new connections (ECONNREFUSED)
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        for writer in list(self._conns):
            sock = writer.get_extra_info("socket")
            if sock is not None:  # linger 0: close() sends RST, not FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        self._conns.clear()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._conns.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            await self._flowing.wait()  # a partition accepts, and connects nowhere until healed
            up_reader, upstream = await asyncio.open_connection(*self.target)
            await asyncio.gather(self._pump(reader, upstream, outbound=True), self._pump(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass  # the target is down, or reset() cut this connection
        finally:
            self._tasks.discard(task)
            self._conns.discard(writer)
            for side in (writer, upstream):
                if side is not None:
                    side.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, outbound: bool = False) -> None:
        """Copy one direction until EOF or an error, then half-close: the other way may still have bytes.
        `outbound`: the client's side, where triggers look."""
        tail = b""
        try:
            while True:
                await self._flowing.wait()  # partitioned: read nothing, so nothing moves and no close is seen
                data = await src.read(65536)
                if outbound and data:
                    if self._trigger is not None:
                        self._fire(tail, data)
                    tail = data[-_TAIL:] if len(data) >= _TAIL else (tail + data)[-_TAIL:]
                if self._latency_s > 0 and data:
                    chunk = self._next_chunk
                    self._next_chunk += 1
                    self._delayed.add(chunk)
                    try:
                        await asyncio.sleep(self._latency_s)
                    finally:
                        self._delayed.discard(chunk)
                await self._flowing.wait()  # a chunk read just before a partition waits for the heal
                if not data:
                    return
                dst.write(data)
                await dst.drain()
        except OSError:
            return
        finally:
            try:
                if not dst.is_closing() and dst.can_write_eof():
                    dst.write_eof()
            except OSError:
                pass
