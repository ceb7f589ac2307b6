"""A small HTTP/1.1 client on asyncio streams, and the two loads built on it that wrk cannot make.

* `Conn`: one keep-alive connection, one request at a time; reads Content-Length and chunked
  bodies (the proxy's streams). About 50 µs of client CPU per request on uvloop, far less than
  an aiohttp or httpx client, so the load generator does not become the thing measured.
* `python -m bench.loadgen --port P --rate R --duration S ...`: an open-loop load at a steady rate
  (scenario 5, the soak). Request i is due at start + i/R, whatever happened to the earlier ones;
  a fixed pool of connections takes due requests in turn, so the server sees a constant number
  of client sockets. A share of the requests can be streams. Every `--progress-s` it prints one
  JSON line of cumulative counts; the last line (`"final": true`) adds latencies and the first
  few errors.
* `watch`: one connection asking for the same user's variant in a paced loop, recording
  (sent, answered, variant) per request (scenario 4, rollout propagation).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

CHAT_PATH = "/v1/chat/completions"
MESSAGES = [
    {"role": "system", "content": "You are a concise, friendly sales assistant for Acme Cloud."},
    {"role": "user", "content": "Summarise the benefits of the premium plan for a team of twelve in two sentences."},
]


class HTTPError(Exception):
    """The connection broke or the answer was not HTTP/1.1 as expected."""


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class Conn:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1:port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Answer:
        """Send one request and read its whole answer; reopens the connection if it was closed."""
        if self.writer is None or self.writer.is_closing():
            await self.open()
        assert self.reader is not None and self.writer is not None
        head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        try:
            answer = await self._read()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            self.close()
            raise HTTPError(f"{type(exc).__name__}: {exc}") from exc
        if answer.headers.get("connection", "").lower() == "close":
            self.close()
        return answer

    async def _read(self) -> Answer:
        assert self.reader is not None
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ValueError(f"not an HTTP/1.1 status line: {lines[0][:80]!r}")
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")  # no trailers: the empty line
                    break
                chunks.append((await self.reader.readexactly(size + 2))[:-2])
            body = b"".join(chunks)
        else:
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return Answer(int(parts[1]), headers, body)


def chat_body(user: str, *, model: str = "gpt-4o-mini", stream: bool = False) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": MESSAGES, "temperature": 0.7, "max_tokens": 32, "user": user}
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


JSON_HEADERS = {"Content-Type": "application/json"}


# -- scenario 4: a watcher -------------------------------------------------------------------
@dataclass
class Watch:
    """What one watcher saw: per request, when it was sent and answered (monotonic) and the variant."""

    port: int
    user: str
    sent: list[float] = field(default_factory=list)
    answered: list[float] = field(default_factory=list)
    variant: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def watch(w: Watch, stop: asyncio.Event, interval_s: float) -> None:
    """Ask for `w.user`'s variant every `interval_s` (or as fast as answers come, if slower)."""
    conn = Conn(w.port)
    body = chat_body(w.user)
    due = time.monotonic()
    try:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                answer = await conn.request("POST", CHAT_PATH, body, JSON_HEADERS)
                variant = answer.headers.get("x-abproxy-variant", "?") if answer.status == 200 else "error"
                if answer.status != 200:
                    w.errors.append(f"status {answer.status}: {answer.body[:200]!r}")
            except HTTPError as exc:
                variant = "error"
                w.errors.append(str(exc))
            w.sent.append(sent)
            w.answered.append(time.monotonic())
            w.variant.append(variant)
            due += interval_s
            pause = due - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            else:
                due = time.monotonic()  # behind: no burst to catch up, the next one goes now
    finally:
        conn.close()


# -- scenario 5: a steady open-loop load ------------------------------------------------------
@dataclass
class Counts:
    sent: int = 0
    ok: int = 0
    errors: int = 0
    streams_ok: int = 0
    late: int = 0  # started more than LATE_S after it was due (the pool was busy)
    latencies_ms: list[float] = field(default_factory=list)  # from when it was due: queueing included
    error_samples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(what)


LATE_S = 0.010


async def steady(
    port: int, rate: float, duration_s: float, *, connections: int, stream_share: float, stream_model: str,
    progress_s: float, out: Any = sys.stdout,
) -> Counts:
    counts = Counts()
    due: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
    start = time.monotonic() + 0.05
    total = int(rate * duration_s)
    stream_every = round(1 / stream_share) if stream_share > 0 else 0

    async def ticker() -> None:
        issued = 0
        while issued < total:
            now = time.monotonic()
            while issued < total and start + issued / rate <= now:
                due.put_nowait((issued, start + issued / rate))
                issued += 1
            await asyncio.sleep(max(0.0005, start + issued / rate - time.monotonic()))

    async def worker() -> None:
        conn = Conn(port)
        try:
            while True:
                i, at = await due.get()
                began = time.monotonic()
                if began - at > LATE_S:
                    counts.late += 1
                stream = bool(stream_every) and i % stream_every == 0
                body = chat_body(f"soak-user-{i}", model=stream_model if stream else "gpt-4o-mini", stream=stream)
                counts.sent += 1
                try:
                    answer = await conn.request("POST", CHAT_PATH, body, JSON_HEADERS)
                except HTTPError as exc:
                    counts.error(f"request {i}: {exc}")
                    continue
                finally:
                    due.task_done()
                if answer.status != 200:
                    counts.error(f"request {i}: status {answer.status} {answer.body[:200]!r}")
                elif stream and not answer.body.rstrip().endswith(b"data: [DONE]"):
                    counts.error(f"request {i}: stream without data: [DONE]: {answer.body[-200:]!r}")
                elif not stream and b'"usage"' not in answer.body:
                    counts.error(f"request {i}: no usage in {answer.body[:200]!r}")
                else:
                    counts.ok += 1
                    counts.streams_ok += stream
                    counts.latencies_ms.append((time.monotonic() - at) * 1000)
        finally:
            conn.close()

    def progress(final: bool = False) -> None:
        line: dict[str, Any] = {
            "t": round(time.monotonic() - start, 3), "sent": counts.sent, "ok": counts.ok, "errors": counts.errors,
            "streams_ok": counts.streams_ok, "late": counts.late, "queued": due.qsize(),
        }  # fmt: skip
        if final:
            lat = sorted(counts.latencies_ms) or [0.0]
            line |= {
                "final": True, "due": total, "rate": rate, "connections": connections,
                "p50_ms": round(statistics.median(lat), 3), "p99_ms": round(lat[int(0.99 * (len(lat) - 1))], 3),
                "max_ms": round(lat[-1], 3), "error_samples": counts.error_samples,
            }  # fmt: skip
        out.write(json.dumps(line) + "\n")
        out.flush()

    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    tick = asyncio.create_task(ticker())
    next_progress = start + progress_s
    while not tick.done():
        await asyncio.sleep(max(0.0, next_progress - time.monotonic()))
        if time.monotonic() >= next_progress:
            progress()
            next_progress += progress_s
    try:
        await asyncio.wait_for(due.join(), timeout=30)
    except TimeoutError:
        counts.error(f"{due.qsize()} due requests still queued 30 s after the end")
        counts.errors += max(0, due.qsize() - 1)
    for task in workers:
        task.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    progress(final=True)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, required=True, help="seconds")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--stream-share", type=float, default=0.0, help="this share of requests are streams")
    parser.add_argument("--stream-model", default="gpt-4o-mini", help="the model the streams ask for")
    parser.add_argument("--progress-s", type=float, default=1.0)
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(steady(
        args.port, args.rate, args.duration, connections=args.connections, stream_share=args.stream_share,
        stream_model=args.stream_model, progress_s=args.progress_s,
    ))  # fmt: skip


if __name__ == "__main__":
    main()
