"""The streaming load generator: K users, each running S SSE chat streams one after the other.

    python bench/stream_client.py --url http://127.0.0.1:8000/v1/chat/completions --users 100 \\
        --streams-per-user 2 --tokens 200 --interval-ms 20 --out run.npz

Users start evenly spread over `--stagger-s` (default: one stream's lifetime, tokens x interval),
so streams begin at a steady rate and, once every user has started, K are open at all times.
`--probes` adds that many one-stream users (`--probe-tokens` each) started evenly over a window
(`--probe-start-s`, `--probe-span-s`) while the K are open: their time to first token is the one
"at K concurrent streams", without a second round of K long streams. Each user keeps one
keep-alive connection (as an SDK's pool would) and opens a new one only if the server closed it.
It speaks to bench/stream_upstream.py, directly or through the proxy, and reads the
`"bench_i":<index>,"bench_t":<emit ns>` that ends every content chunk.

Per stream it records the status, the time to the first content chunk (from writing the request),
the number of content chunks, whether they came in order, whether the usage chunk and
`data: [DONE]` arrived, the bytes and any error; per content chunk, its emit time and its relay
delay (receive time - emit time, both time.monotonic_ns(): one clock for every process). Results go
to `--out` (numpy .npz, read back with `load`); stdout gets JSON lines: `all_open` once every user
is past its stream's first chunk at the same time (the open-streams scenario measures memory then)
and `done` with a summary.

Raw asyncio.Protocol + httptools' C response parser + uvloop: the client shares its core with the
upstream, so per chunk it does one bytes search and two int() calls, no coroutine wake-up.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import sys
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import httptools
import numpy as np
import numpy.typing as npt

_EMIT = b'"bench_t":'
_INDEX = b'"bench_i":'
_DONE = b"data: [DONE]"
_USAGE = b'"choices":[],"usage":{'

# error codes of a stream (the `error` array); "" is a clean stream
ERRORS = ("status", "chunks", "order", "no_done", "no_usage", "disconnected", "connect", "timeout", "parse")


class Chunks:
    """Every content chunk of the run: which stream, when it was emitted, its relay delay."""

    def __init__(self) -> None:
        self.stream = array("q")
        self.emit_ns = array("q")
        self.delay_ns = array("q")


class StreamRec:
    __slots__ = (
        "buf",
        "chunks",
        "done",
        "end_ns",
        "error",
        "headers_ns",
        "index",
        "nbytes",
        "order_ok",
        "seq",
        "start_ns",
        "status",
        "tokens",
        "ttft_ns",
        "usage",
        "user",
    )  # fmt: skip

    def __init__(self, index: int, user: int, seq: int, tokens: int) -> None:
        self.index, self.user, self.seq, self.tokens = index, user, seq, tokens
        self.start_ns = self.headers_ns = self.ttft_ns = self.end_ns = -1
        self.status = 0
        self.chunks = 0
        self.order_ok = True
        self.done = self.usage = False
        self.nbytes = 0
        self.error = ""
        self.buf = b""

    def feed(self, body: bytes, now: int, chunks: Chunks) -> bool:
        """SSE bytes in; returns True when this was the stream's first content chunk."""
        self.nbytes += len(body)
        data = self.buf + body if self.buf else body
        end = data.rfind(b"\n\n")
        if end < 0:
            self.buf = data
            return False
        self.buf = data[end + 2 :]
        first = False
        for event in data[:end].split(b"\n\n"):
            k = event.rfind(_EMIT)
            if k >= 0:
                try:
                    emit = int(event[k + 10 : -1])
                    j = event.rfind(_INDEX, 0, k)
                    i = int(event[j + 10 : k - 1])
                except ValueError:
                    self.error = self.error or "parse"
                    continue
                if i != self.chunks:
                    self.order_ok = False
                if self.chunks == 0:
                    self.ttft_ns = now - self.start_ns
                    first = True
                self.chunks += 1
                chunks.stream.append(self.index)
                chunks.emit_ns.append(emit)
                chunks.delay_ns.append(now - emit)
            elif event.startswith(_DONE):
                self.done = True
            elif _USAGE in event:
                self.usage = True
            elif b'"error"' in event:
                self.error = self.error or "status"
        return first

    def verdict(self, want_usage: bool) -> str:
        if self.error:
            return self.error
        if self.status != 200:
            return "status"
        if self.chunks != self.tokens:
            return "chunks"
        if not self.order_ok:
            return "order"
        if not self.done:
            return "no_done"
        if want_usage and not self.usage:
            return "no_usage"
        return ""


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        url = urlsplit(args.url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 80
        self.path = url.path or "/v1/chat/completions"
        self.args = args
        self.records: list[StreamRec] = []
        self.chunks = Chunks()
        self.open = 0  # streams past their first chunk and not ended
        self.all_open_at: int | None = None
        self.want_usage = not args.no_usage
        question = "Which plan fits a sales team of twelve?"
        # --prompt-chars: a longer conversation, as real chat prompts are (the proxy parses and keeps it)
        self.prompt = (question + " " + "Tell me more about the premium plan. " * (args.prompt_chars // 37))[
            : max(len(question), args.prompt_chars)
        ]

    def request(self, user: int, seq: int, tokens: int) -> bytes:
        body: dict[str, Any] = {
            "model": self.args.model,
            "messages": [{"role": "user", "content": self.prompt}],
            "stream": True,
            "user": f"bench-user-{user}-{seq}",  # a new user each stream: both arms get streams
            "bench_tokens": tokens,
            "bench_interval_ms": self.args.interval_ms,
            "bench_first_ms": self.args.first_ms,
        }
        if self.want_usage:
            body["stream_options"] = {"include_usage": True}
        payload = json.dumps(body, separators=(",", ":")).encode()
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        return head.encode() + payload

    def first_chunk(self, rec: StreamRec) -> None:
        if rec.user >= self.args.users:  # a probe
            return
        self.open += 1
        if self.all_open_at is None and self.open >= self.args.users:
            self.all_open_at = time.monotonic_ns()
            print(json.dumps({"event": "all_open", "open": self.open, "t_ns": self.all_open_at}), flush=True)

    def ended(self, rec: StreamRec) -> None:
        if rec.ttft_ns >= 0 and rec.user < self.args.users:
            self.open -= 1

    async def user(self, user: int, start_at: float, deadline: float, streams: int, tokens: int) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, start_at - loop.time()))
        conn: Conn | None = None
        for seq in range(streams):
            rec = StreamRec(len(self.records), user, seq, tokens)
            self.records.append(rec)
            if conn is None or conn.closed:
                try:
                    _, proto = await asyncio.wait_for(
                        loop.create_connection(lambda: Conn(self), self.host, self.port),
                        max(0.1, deadline - loop.time()),
                    )
                except (OSError, TimeoutError) as exc:
                    rec.error = "connect"
                    print(f"connect failed: {exc!r}", file=sys.stderr)
                    continue
                conn = proto
            waiter = conn.start(rec, self.request(user, seq, tokens))
            try:
                await asyncio.wait_for(waiter, max(0.1, deadline - loop.time()))
            except TimeoutError:
                rec.error = rec.error or "timeout"
                conn.abort()
                conn = None
                continue
            if rec.error:
                conn.abort()
                conn = None
            elif not conn.keep_alive:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        args = self.args
        stagger = args.stagger_s if args.stagger_s is not None else args.tokens * args.interval_ms / 1000
        t0 = loop.time() + 0.05
        deadline = t0 + args.timeout_s
        users = [
            self.user(u, t0 + u * stagger / args.users, deadline, args.streams_per_user, args.tokens)
            for u in range(args.users)
        ]
        # Probes: one short stream each, started evenly over [probe_start_s, probe_start_s + probe_span_s]
        # after t0, while the users' streams are all open: their time to first token is taken at K open.
        probes = [
            self.user(
                args.users + j, t0 + args.probe_start_s + args.probe_span_s * j / max(1, args.probes - 1), deadline,
                1, args.probe_tokens,
            )
            for j in range(args.probes)
        ]  # fmt: skip
        await asyncio.gather(*users, *probes)


class Conn(asyncio.Protocol):
    """One keep-alive connection; one stream on it at a time."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.rec: StreamRec | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.now = 0
        self.closed = False
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def start(self, rec: StreamRec, request: bytes) -> asyncio.Future[None]:
        assert self.transport is not None
        self.rec = rec
        self.waiter = asyncio.get_running_loop().create_future()
        self.parser = httptools.HttpResponseParser(self)
        rec.start_ns = time.monotonic_ns()
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.now = time.monotonic_ns()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.rec is not None:
                self.rec.error = self.rec.error or "parse"
            self._finish()
            self.abort()

    def on_headers_complete(self) -> None:
        if self.rec is not None:
            self.rec.status = self.parser.get_status_code()
            self.rec.headers_ns = self.now

    def on_body(self, body: bytes) -> None:
        rec = self.rec
        if rec is not None and rec.feed(body, self.now, self.client.chunks):
            self.client.first_chunk(rec)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        self._finish()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.rec is not None:
            self.rec.error = self.rec.error or "disconnected"
            self._finish()

    def _finish(self) -> None:
        rec, waiter = self.rec, self.waiter
        self.rec = self.waiter = None
        if rec is not None:
            rec.end_ns = time.monotonic_ns()
            self.client.ended(rec)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


# -- results ----------------------------------------------------------------------------------
@dataclass
class Run:
    """What one client run measured (see `load`); times in ns, CLOCK_MONOTONIC."""

    user: npt.NDArray[np.int32]  # per stream: which user ran it
    seq: npt.NDArray[np.int32]  # per stream: the user's how-manieth (0 first)
    start_ns: npt.NDArray[np.int64]  # per stream: when its request was written
    ttft_ns: npt.NDArray[np.int64]  # per stream: to the first content chunk; -1: none came
    end_ns: npt.NDArray[np.int64]
    status: npt.NDArray[np.int32]
    chunks: npt.NDArray[np.int32]
    nbytes: npt.NDArray[np.int64]
    error: npt.NDArray[np.str_]  # "" or one of ERRORS
    chunk_stream: npt.NDArray[np.int64]  # per content chunk: its stream's index
    chunk_emit_ns: npt.NDArray[np.int64]
    chunk_delay_ns: npt.NDArray[np.int64]
    meta: dict[str, Any]  # the client's own cpu_s, wall_s, maxrss_kib, all_open_ns, arguments

    @property
    def errors(self) -> int:
        return int(np.count_nonzero(self.error != ""))

    def error_counts(self) -> dict[str, int]:
        kinds, counts = np.unique(self.error[self.error != ""], return_counts=True)
        return {str(k): int(c) for k, c in zip(kinds, counts, strict=True)}


def save(client: Client, path: Path, wall_s: float) -> dict[str, Any]:
    records = client.records
    usage = resource.getrusage(resource.RUSAGE_SELF)
    errors = [r.verdict(client.want_usage) for r in records]
    meta = {
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "wall_s": wall_s,
        "maxrss_kib": usage.ru_maxrss,
        "all_open_ns": client.all_open_at,
        "streams": len(records),
        "chunks": len(client.chunks.delay_ns),
        "errors": sum(1 for e in errors if e),
        "args": vars(client.args),
    }
    np.savez(
        path,
        user=np.array([r.user for r in records], dtype=np.int32),
        seq=np.array([r.seq for r in records], dtype=np.int32),
        start_ns=np.array([r.start_ns for r in records], dtype=np.int64),
        ttft_ns=np.array([r.ttft_ns for r in records], dtype=np.int64),
        end_ns=np.array([r.end_ns for r in records], dtype=np.int64),
        status=np.array([r.status for r in records], dtype=np.int32),
        chunks=np.array([r.chunks for r in records], dtype=np.int32),
        nbytes=np.array([r.nbytes for r in records], dtype=np.int64),
        error=np.array(errors, dtype=np.str_),
        chunk_stream=np.frombuffer(client.chunks.stream, dtype=np.int64),
        chunk_emit_ns=np.frombuffer(client.chunks.emit_ns, dtype=np.int64),
        chunk_delay_ns=np.frombuffer(client.chunks.delay_ns, dtype=np.int64),
        meta=np.array(json.dumps(meta, default=str)),
    )
    return meta


def load(path: Path) -> Run:
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    meta = json.loads(str(arrays.pop("meta")))
    error = arrays.pop("error")
    if error.size == 0:
        error = np.zeros(0, dtype="<U1")
    return Run(**arrays, error=error, meta=meta)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--users", type=int, required=True, help="concurrent streams once all have started")
    parser.add_argument("--streams-per-user", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--interval-ms", type=float, default=20.0)
    parser.add_argument("--first-ms", type=float, default=0.0)
    parser.add_argument("--stagger-s", type=float, default=None, help="spread the users' starts [one lifetime]")
    parser.add_argument("--probes", type=int, default=0, help="extra one-stream users (see Client.run)")
    parser.add_argument("--probe-tokens", type=int, default=5)
    parser.add_argument("--probe-start-s", type=float, default=0.0)
    parser.add_argument("--probe-span-s", type=float, default=0.0)
    parser.add_argument("--timeout-s", type=float, default=600.0, help="the whole run's deadline")
    parser.add_argument("--model", default="gpt-4o-mini")
    parser.add_argument("--prompt-chars", type=int, default=0, help="pad the user message to this length")
    parser.add_argument("--no-usage", action="store_true", help="do not ask for stream_options.include_usage")
    parser.add_argument("--out", type=Path, required=True, help="results (.npz)")
    return parser.parse_args(argv)


def main() -> None:
    import uvloop

    args = parse_args()
    gc.freeze()  # what the imports made is never collected: full collections stay short
    client = Client(args)
    started = time.monotonic()
    uvloop.run(client.run())
    meta = save(client, args.out, time.monotonic() - started)
    summary = {k: meta[k] for k in ("streams", "chunks", "errors", "cpu_s", "wall_s", "maxrss_kib")}
    print(json.dumps({"event": "done", **summary}), flush=True)


if __name__ == "__main__":
    main()
