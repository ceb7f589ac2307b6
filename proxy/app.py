"""The ASGI application: a raw `/v1/*` handler in front of a FastAPI app for the rest.

    create_app(settings) -> ProxyApp
        /v1/*          OpenAIHandler   (hot path, raw ASGI)
        everything     FastAPI         (admin, health, readiness, metrics, /eval pages; lifespan)

    create_eval_app(store_url, admin_token=) -> FastAPI
        /eval/*        the blind comparison pages alone (`abproxy humaneval serve`)
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import BinaryIO, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from proxy.config import Settings, config_path, load_settings
from proxy.errors import ProxyError, error_body
from proxy.gc_tuning import freeze_startup_heap
from proxy.humaneval.pages import EvalSite
from proxy.humaneval.web import router as eval_router
from proxy.metrics import Metrics
from proxy.routes_admin import admin, ops
from proxy.routes_openai import OpenAIHandler
from proxy.runtime import Runtime
from proxy.types import Message, Receive, Scope, Send


class ProxyApp:
    def __init__(self, runtime: Runtime, *, freeze_gc: bool = False) -> None:
        self.runtime = runtime
        # X-Forwarded-For/-Proto from a trusted balancer (uvicorn's FORWARDED_ALLOW_IPS, loopback by
        # default) for the admin API and /eval: their rate limits and links use the client's address.
        # The server runs with proxy_headers off, so /v1, which uses neither, skips the header scan.
        trusted = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
        api = _build_api(runtime, freeze_gc=freeze_gc)
        self.api = cast(ASGIApp, ProxyHeadersMiddleware(api, trusted))  # type: ignore[arg-type]
        self.openai = OpenAIHandler(
            runtime.router,
            runtime.rollout,
            runtime.upstreams,
            runtime.metrics,
            runtime.events,
            max_body_bytes=runtime.settings.server.max_body_bytes,
            request_ids=runtime.request_ids,
            hash_user=runtime.hash_user,
            feedback=runtime.feedback,
            pairs=runtime.pairs,
            recorder=runtime.recorder,
            max_in_flight=runtime.settings.server.max_in_flight,
            client_keys=frozenset(runtime.settings.client_auth.key_sha256),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)  # lifespan
        elif scope["path"].startswith("/v1/"):
            await self.openai(scope, receive, send)
        else:
            await self.api(scope, receive, _with_request_id(send))


def _with_request_id(send: Send) -> Send:
    """Off the hot path, every answer still carries an x-request-id, like /v1 answers do."""
    request_id = os.urandom(12).hex().encode()

    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
        await send(message)

    return send_with_id


def create_app(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    event_sink: BinaryIO | None = None,
    freeze_gc: bool = False,
) -> ProxyApp:
    """`freeze_gc` is for a process that only serves (the CLI, the worker factory), not tests."""
    return ProxyApp(Runtime(settings, metrics=metrics, event_sink=event_sink), freeze_gc=freeze_gc)


def create_app_from_env() -> ProxyApp:
    """uvicorn factory for `--workers N`: each worker process loads the config itself."""
    import logging

    from proxy.logs import configure_logging

    # Spawned workers do not inherit the parent's structlog setup; unconfigured, structlog
    # prints to stdout, into the event stream. uvicorn has set its own loggers to --log-level
    # in this worker already, so the level is taken from there.
    configure_logging(logging.getLevelName(logging.getLogger("uvicorn.error").getEffectiveLevel()).lower())
    return create_app(load_settings(config_path(None)), freeze_gc=True)


def _build_api(runtime: Runtime, *, freeze_gc: bool = False) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        unwatch_gc: Callable[[], None] | None = None
        if freeze_gc:  # a serving process: its collector is tuned, and its pauses measured
            freeze_startup_heap()
            unwatch_gc = runtime.metrics.watch_gc()
        try:
            yield
        finally:
            if unwatch_gc is not None:
                unwatch_gc()
            await runtime.stop()

    api = FastAPI(title="llm-ab-proxy", lifespan=lifespan, docs_url="/docs", openapi_url="/openapi.json")
    api.state.runtime = runtime
    api.state.eval_site = EvalSite(store=runtime.store_engine, admin_token=runtime.settings.admin_token)
    api.include_router(admin)
    api.include_router(ops)
    api.include_router(eval_router)
    install_error_handlers(api)
    return api


def create_eval_app(store_url: str, *, admin_token: str | None) -> FastAPI:
    """The /eval pages without the proxy: no upstreams, Redis or experiments, only the store.

    ValueError for a store URL that cannot be used; the engine connects on the first page.
    """
    from proxy.store.db import engine_for

    engine = engine_for(store_url)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            engine.dispose()

    api = FastAPI(title="llm-ab-proxy human evaluation", lifespan=lifespan, docs_url=None, openapi_url=None)
    api.state.eval_site = EvalSite(store=lambda: engine, admin_token=admin_token)
    api.include_router(eval_router)

    @api.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    install_error_handlers(api)
    return api


def install_error_handlers(api: FastAPI) -> None:
    """Every error off the hot path in OpenAI's shape, as the /v1 handler writes its own."""

    @api.exception_handler(ProxyError)
    async def proxy_error(_: Request, exc: ProxyError) -> JSONResponse:
        headers = {name.decode(): value.decode() for name, value in exc.headers()}
        return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=headers)

    @api.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(part) for part in first["loc"] if part != "body"]
        param = ".".join(loc) or None
        msg = str(first["msg"]).removeprefix("Value error, ")
        message = f"{param}: {msg}" if param else msg
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_value"), status_code=422)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
        return JSONResponse(
            error_body(str(exc.detail), "invalid_request_error", None, code),
            status_code=exc.status_code,
            headers=exc.headers,
        )
