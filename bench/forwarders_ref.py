"""Minimal forwarders the proxy is measured against (README "Speed" in issue 3).

Each does the least a gateway can do per request, the same way:
    parse the body (orjson) -> hash the user (mmh3) -> rewrite `model` -> forward (one pooled
    aiohttp session) -> return the upstream's body and status
and differs only in what serves `/v1/chat/completions`:

    reference      Starlette route   (the yardstick every ratio is taken against)
    raw_asgi       a raw ASGI callable, no framework
    fastapi_route  a FastAPI route
    aiohttp_app    aiohttp's own server, no ASGI (the suite's "bare aiohttp forwarder")
    stream_relay   a raw ASGI callable relaying each upstream read as it comes (scenario 2's
                   "bare relay": what one Python hop costs a stream before any feature)

They are uvicorn factories: `uvicorn --factory --app-dir bench forwarders_ref:reference`.
The upstream base URL comes from BENCH_UPSTREAM (e.g. http://127.0.0.1:9000/v1).
"""

import os
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import mmh3
import orjson

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

SALT = "sales-v2"
PERCENT_BUCKETS = 5000  # 50 % of 10,000 buckets, as the proxy's rollout in the benchmark
CONTROL_MODEL = "gpt-4o-mini"
TREATMENT_MODEL = "ft:gpt-4o-mini:acme:sales-v2:abc123"
UPSTREAM_HEADERS = {"Content-Type": "application/json"}


def _upstream() -> str:
    return os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:9000/v1").rstrip("/") + "/chat/completions"


def _new_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


def _rewrite(raw: bytes) -> bytes:
    body = orjson.loads(raw)
    user = body.get("user") or ""
    bucket = mmh3.hash(f"{SALT}:{user}", signed=False) % 10000
    body["model"] = TREATMENT_MODEL if bucket < PERCENT_BUCKETS else CONTROL_MODEL
    return orjson.dumps(body)


class _Forwarder:
    """The shared session, opened in the app's lifespan."""

    def __init__(self) -> None:
        self.url = _upstream()
        self.session: aiohttp.ClientSession | None = None

    async def forward(self, raw: bytes) -> tuple[int, bytes]:
        assert self.session is not None
        async with self.session.post(self.url, data=_rewrite(raw), headers=UPSTREAM_HEADERS) as response:
            return response.status, await response.read()

    @asynccontextmanager
    async def lifespan(self, _: Any) -> AsyncIterator[None]:
        self.session = _new_session()
        try:
            yield
        finally:
            await self.session.close()


def reference() -> Any:
    """Starlette route + aiohttp: the reference forwarder."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    fwd = _Forwarder()

    async def chat(request: Request) -> Response:
        status, payload = await fwd.forward(await request.body())
        return Response(payload, status_code=status, media_type="application/json")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])], lifespan=fwd.lifespan)


def fastapi_route() -> Any:
    """FastAPI route + aiohttp (the body is read raw: no pydantic model, as a proxy must)."""
    from fastapi import FastAPI, Request, Response

    fwd = _Forwarder()
    app = FastAPI(lifespan=fwd.lifespan)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        status, payload = await fwd.forward(await request.body())
        return Response(payload, status_code=status, media_type="application/json")

    return app


async def _read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


def raw_asgi() -> Any:
    """A raw ASGI callable + aiohttp: no framework at all."""
    fwd = _Forwarder()
    not_found = b'{"error":"not found"}'

    async def respond(send: Send, status: int, payload: bytes) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(fwd, receive, send)
            return
        if scope["path"] != "/v1/chat/completions" or scope["method"] != "POST":
            await respond(send, 404, not_found)
            return
        status, payload = await fwd.forward(await _read_body(receive))
        await respond(send, status, payload)

    return app


async def _lifespan(fwd: _Forwarder, receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            fwd.session = _new_session()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if fwd.session is not None:
                await fwd.session.close()
            await send({"type": "lifespan.shutdown.complete"})
            return


def stream_relay() -> Any:
    """Raw ASGI + aiohttp, streaming: the request rewritten as above, then every chunk the upstream
    sends passed on as it is read (`iter_any`), with nothing parsed or counted on the way."""
    fwd = _Forwarder()
    sse = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(fwd, receive, send)
            return
        body = await _read_body(receive)
        assert fwd.session is not None
        async with fwd.session.post(fwd.url, data=_rewrite(body), headers=UPSTREAM_HEADERS) as response:
            await send({"type": "http.response.start", "status": response.status, "headers": sse})
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    return app


def aiohttp_app() -> Any:
    """aiohttp's own server + aiohttp client: the bare forwarder the suite's targets are ratios to.

    Run as `python bench/forwarders_ref.py aiohttp PORT` (uvloop); it is not an ASGI app."""
    from aiohttp import web

    fwd = _Forwarder()

    async def chat(request: web.Request) -> web.Response:
        status, payload = await fwd.forward(await request.read())
        return web.Response(body=payload, status=status, content_type="application/json")

    async def session(_: web.Application) -> AsyncIterator[None]:
        fwd.session = _new_session()
        yield
        await fwd.session.close()

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.cleanup_ctx.append(session)
    return app


if __name__ == "__main__":
    import sys

    import uvloop
    from aiohttp import web

    if sys.argv[1:2] != ["aiohttp"] or len(sys.argv) != 3:
        sys.exit("usage: forwarders_ref.py aiohttp PORT")
    uvloop.install()
    web.run_app(aiohttp_app(), host="127.0.0.1", port=int(sys.argv[2]), access_log=None, print=None)
