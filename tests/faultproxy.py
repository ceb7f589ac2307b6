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

All controls are thread-safe: they run on the proxy's own event loop and return once in force.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any

from tests.harness import free_port


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

    async def _make_event(self) -> asyncio.Event:
        event = asyncio.Event()
        event.set()
        return event

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)

    async def _heal(self) -> None:
        if self._server is None:
            await self._listen()
        self._flowing.set()

    async def _reset(self) -> None:
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
            await asyncio.gather(self._pump(reader, upstream), self._pump(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass  # the target is down, or reset() cut this connection
        finally:
            self._tasks.discard(task)
            self._conns.discard(writer)
            for side in (writer, upstream):
                if side is not None:
                    side.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Copy one direction until EOF or an error, then half-close: the other way may still have bytes."""
        try:
            while True:
                await self._flowing.wait()  # partitioned: read nothing, so nothing moves and no close is seen
                data = await src.read(65536)
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
