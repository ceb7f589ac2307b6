"""A fast OpenAI-compatible SSE upstream for the streaming benchmarks: one process, one core.

    python bench/stream_upstream.py --port 8001 [--tokens 200] [--interval-ms 20]

POST /v1/chat/completions with `"stream": true` answers `text/event-stream` (chunked), as OpenAI
does: N content chunks (`chat.completion.chunk`, the first with the role), a chunk with
`finish_reason: "stop"`, the usage chunk (`"choices": []`) when `stream_options.include_usage`
was asked for (every chunk then carries `"usage": null`, as OpenAI's do), then `data: [DONE]`.
Anything else on that path gets a plain `chat.completion`; other paths a 404.

Body fields set the stream's shape (the proxy forwards them untouched): `bench_tokens` (N),
`bench_interval_ms` (between content chunks), `bench_first_ms` (before the first one; 0: it
leaves with the response headers). Every content chunk ends `"bench_i":<index>,"bench_t":<ns>}`:
its index and the time.monotonic_ns() at which it was handed to the kernel. CLOCK_MONOTONIC is one
clock for every process on a Linux machine, so a client subtracts it from its own receive time to
get the chunk's relay delay. The proxy relays event bytes unchanged (proxy/sse.py), so the field
arrives as written.

Why raw asyncio.Protocol + httptools + uvloop and no framework: the upstream shares its core with
the load generator, and its cost per chunk is a bytes format, one `transport.write` and one timer
(`loop.call_at` on a fixed schedule from the stream's start, so a late tick does not shift the
ones after it; a libuv timer per stream, no coroutine per stream). Measured on this machine against
an aiohttp.web server sending the same chunks from a coroutine per stream (asyncio.sleep to the
same schedule), with bench/stream_client.py on the same core: 12 against 13 µs of CPU per chunk
saturated (~40k chunks/s for upstream and client together), 29-33 against 33-41 µs at 5k chunks/s.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import time
from typing import Any, cast

import httptools
import orjson

# Words of a plausible answer; a token is one of them with its leading space, as tokenizers split.
_WORDS = (
    "The premium plan gives your team of twelve priority support and unlimited shared workspaces, so nobody "
    "waits on a seat or a ticket. It also adds deal analytics that show which opportunities are most likely "
    "to close this quarter."
).split()
TOKENS = [orjson.dumps(" " + w)[1:-1] for w in _WORDS]  # JSON-escaped, without quotes
CREATED = 1735689600
PROMPT_TOKENS = 41

_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"x-request-id: req_bench%d\r\n"
    b"\r\n"
)
_NOT_FOUND = b'{"error":{"message":"not found","type":"invalid_request_error","code":"unknown_url"}}'
_BAD_REQUEST = b'{"error":{"message":"bad request","type":"invalid_request_error","code":"invalid_json"}}'
_ids = itertools.count(1)


def _frame(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%b\r\n" % (len(payload), payload)


class Stream:
    """One SSE answer in flight: its chunks leave on `loop.call_at` ticks of a fixed schedule."""

    __slots__ = ("conn", "handle", "i", "interval", "prefix", "start", "suffix", "tail", "tokens")

    def __init__(self, conn: Conn, body: dict[str, Any], tokens: int, interval_s: float, first_s: float) -> None:
        n = next(_ids)
        model = orjson.dumps(body.get("model") if isinstance(body.get("model"), str) else "gpt-4o-mini")
        options = body.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        head = (
            b'data: {"id":"chatcmpl-bench%016d","object":"chat.completion.chunk","created":%d,"model":%b,'
            b'"system_fingerprint":"fp_bench0001","choices":[{"index":0,"delta":' % (n, CREATED, model)
        )
        null_usage = b',"usage":null' if usage else b""
        self.conn = conn
        self.prefix = head
        self.suffix = b'"},"logprobs":null,"finish_reason":null}]' + null_usage + b',"bench_i":'
        self.tokens = tokens
        self.interval = interval_s
        self.i = 0
        self.handle: asyncio.TimerHandle | None = None
        tail = _frame(head + b'{},"logprobs":null,"finish_reason":"stop"}]' + null_usage + b"}\n\n")
        if usage:
            counts = b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d,' % (
                PROMPT_TOKENS,
                tokens,
                PROMPT_TOKENS + tokens,
            )
            details = b'"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}'
            usage_chunk = head[: head.index(b'"choices":')] + b'"choices":[],"usage":' + counts + details + b"}\n\n"
            tail += _frame(usage_chunk)
        self.tail = tail + _frame(b"data: [DONE]\n\n") + b"0\r\n\r\n"
        conn.stream = self
        loop = asyncio.get_running_loop()
        self.start = loop.time() + first_s
        head_bytes = _STREAM_HEAD % n
        if first_s <= 0 and tokens > 0:
            self._emit(head_bytes)
        else:
            conn.transport.write(head_bytes)
            self._schedule(loop)

    def _chunk(self) -> bytes:
        i = self.i
        delta = b'{"role":"assistant","content":"' if i == 0 else b'{"content":"'
        payload = b'%b%b%b%b%d,"bench_t":%d}\n\n' % (
            self.prefix,
            delta,
            TOKENS[i % len(TOKENS)],
            self.suffix,
            i,
            time.monotonic_ns(),
        )
        return b"%x\r\n%b\r\n" % (len(payload), payload)

    def _emit(self, before: bytes = b"") -> None:
        self.handle = None
        if self.conn.closed:
            return
        if self.i < self.tokens:
            data = before + self._chunk()
            self.i += 1
            if self.i == self.tokens:
                data += self.tail
        else:  # tokens == 0: an empty answer
            data = before + self.tail
        self.conn.transport.write(data)
        if self.i < self.tokens:
            self._schedule(asyncio.get_running_loop())
        else:
            self.conn.stream_done()

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self.handle = loop.call_at(self.start + self.i * self.interval, self._emit)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


class Conn(asyncio.Protocol):
    """One client connection (keep-alive: one request after another)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set in connection_made
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.stream: Stream | None = None
        self.closed = False
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.server.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections -= 1
        if self.stream is not None:
            self.stream.cancel()
            self.stream = None
            self.server.cancelled += 1

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._reply(400, _BAD_REQUEST)
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        path = self.url.split(b"?", 1)[0]
        if path != b"/v1/chat/completions" or self.parser.get_method() != b"POST":
            self._reply(404, _NOT_FOUND)
            return
        try:
            body = orjson.loads(b"".join(self.body))
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            self._reply(400, _BAD_REQUEST)
            return
        server = self.server
        tokens = _int(body.get("bench_tokens"), server.tokens)
        if body.get("stream") is True:
            server.streams += 1
            interval = _float(body.get("bench_interval_ms"), server.interval_ms) / 1000
            first = _float(body.get("bench_first_ms"), server.first_ms) / 1000
            Stream(self, body, tokens, interval, first)  # sets self.stream
        else:
            server.requests += 1
            self._reply(200, _completion(body, tokens))

    def stream_done(self) -> None:
        self.stream = None
        self.server.completed += 1
        if not self.keep_alive:
            self.transport.close()

    def _reply(self, status: int, payload: bytes) -> None:
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}[status]
        head = b"HTTP/1.1 %d %b\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (
            status,
            reason,
            len(payload),
        )
        self.transport.write(head + payload)
        if not self.keep_alive:
            self.transport.close()


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def _float(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else default


def _completion(body: dict[str, Any], tokens: int) -> bytes:
    text = "".join(orjson.loads(b'"' + TOKENS[i % len(TOKENS)] + b'"') for i in range(tokens)).lstrip()
    return orjson.dumps(
        {
            "id": f"chatcmpl-bench{next(_ids):016d}",
            "object": "chat.completion",
            "created": CREATED,
            "model": body.get("model") if isinstance(body.get("model"), str) else "gpt-4o-mini",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": tokens,
                      "total_tokens": PROMPT_TOKENS + tokens},
            "system_fingerprint": "fp_bench0001",
        }
    )  # fmt: skip


class Server:
    def __init__(self, tokens: int, interval_ms: float, first_ms: float) -> None:
        self.tokens, self.interval_ms, self.first_ms = tokens, interval_ms, first_ms
        self.connections = self.streams = self.completed = self.cancelled = self.requests = 0

    def stats(self) -> dict[str, int]:
        return {
            "connections": self.connections,
            "streams": self.streams,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "requests": self.requests,
        }


async def serve(host: str, port: int, server: Server, stats_path: str | None) -> None:
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: Conn(server), host, port, backlog=8192, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if stats_path:  # SIGUSR1 writes the counters (the scenarios check them)
        loop.add_signal_handler(signal.SIGUSR1, lambda: _write_stats(stats_path, server))
    print(f"stream-upstream listening on http://{host}:{port}", flush=True)
    async with listener:
        await stop.wait()


def _write_stats(path: str, server: Server) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(orjson.dumps(server.stats()))
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=200, help="content chunks per stream [200]")
    parser.add_argument("--interval-ms", type=float, default=20.0, help="between content chunks [20]")
    parser.add_argument("--first-ms", type=float, default=0.0, help="before the first content chunk [0]")
    parser.add_argument("--stats", default=None, help="on SIGUSR1, write the counters to this JSON file")
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.host, args.port, Server(args.tokens, args.interval_ms, args.first_ms), args.stats))


if __name__ == "__main__":
    main()
