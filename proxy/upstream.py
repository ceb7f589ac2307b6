"""Forwarding to upstreams: one pooled aiohttp session, per-upstream headers built once.

aiohttp rather than httpx on this path by measurement (README, "Speed"): httpx's default
transport re-checks every pooled connection per request and collapses under concurrency.
aiohttp exceptions are translated into the proxy's error tree here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp

from proxy.config import UpstreamConfig
from proxy.errors import UpstreamError, UpstreamInterrupted, UpstreamTimeout, UpstreamUnreachable
from proxy.stream_idle import IdleWatch

# aiohttp's ClientResponse.raw_headers: the upstream's header lines, undecoded.
RawHeaders = tuple[tuple[bytes, bytes], ...]

# Client headers never forwarded: credentials for *this* proxy or another provider, values
# aiohttp recomputes, the proxy's own routing headers, and hop-by-hop headers (RFC 9110 7.6.1).
DROPPED_REQUEST_HEADERS = frozenset(
    {
        "authorization", "api-key", "x-api-key", "openai-organization", "openai-project", "cookie",
        "host", "content-length", "content-type", "accept-encoding", "expect",
        "x-user-id", "x-episode-id", "x-request-id",
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
        "te", "trailer", "transfer-encoding", "upgrade",
    }
)

# Upstream response headers not passed back: hop-by-hop, framing the proxy redoes, cookies
# scoped to the provider, and the upstream's request id (exposed as x-upstream-request-id).
DROPPED_RESPONSE_HEADERS = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "content-length", "content-encoding", "set-cookie",
        "date", "server", "x-request-id",
    }
)


class Upstream:
    def __init__(self, name: str, config: UpstreamConfig) -> None:
        self.name = name
        self.base_url = config.base_url
        headers = {"Content-Type": "application/json"}
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        self.headers = headers
        # sock_read bounds a silence, not the whole answer, so a long but live stream is not cut.
        self.timeout = aiohttp.ClientTimeout(total=None, connect=config.connect_timeout_s, sock_read=config.timeout_s)
        # A stream's wait for headers is timed by aiohttp (sock_read), its silences by IdleWatch.
        self.stream_idle_s = config.stream_idle_timeout_s or config.timeout_s
        self.stream_timeout = aiohttp.ClientTimeout(
            total=None, connect=config.connect_timeout_s, sock_read=self.stream_idle_s
        )
        self.max_in_flight = config.max_in_flight
        self.in_flight = 0  # this process's requests to it now (the event loop is one thread: no lock)
        self.retries = config.retries
        self.max_retry_wait_s = config.max_retry_wait_s


class UpstreamPool:
    def __init__(self, upstreams: dict[str, UpstreamConfig]) -> None:
        self.upstreams = {name: Upstream(name, cfg) for name, cfg in upstreams.items()}
        self.idle = IdleWatch(min((u.stream_idle_s for u in self.upstreams.values()), default=1.0))
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=30)
        # auto_decompress: the proxy reads usage from bodies and re-frames them for the client.
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=True, raise_for_status=False)
        self.idle.start()

    async def stop(self) -> None:
        await self.idle.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _open(
        self, target: Upstream, path: str, body: bytes, client_headers: dict[str, str], *, stream: bool = False
    ) -> aiohttp.ClientResponse:
        """Send the request with the upstream's own credentials; returns once headers are in."""
        assert self._session is not None, "UpstreamPool.start() was not awaited"
        headers = {**client_headers, **target.headers} if client_headers else target.headers
        timeout = target.stream_timeout if stream else target.timeout
        return await self._session.post(target.base_url + path, data=body, headers=headers, timeout=timeout)

    async def fetch(
        self, upstream: str, path: str, body: bytes, client_headers: dict[str, str]
    ) -> tuple[int, RawHeaders, bytes]:
        """POST and read the whole answer (status, raw headers, body): the non-streaming path,
        in one try block rather than two context managers per request."""
        target = self.upstreams[upstream]
        try:
            response = await self._open(target, path, body, client_headers)
            try:
                payload = await response.read()
            except BaseException:
                response.close()
                raise
            finally:
                response.release()
        except TRANSPORT_ERRORS as exc:
            raise translate(exc, target.name) from exc
        return response.status, response.raw_headers, payload

    async def open_stream(
        self, upstream: str, path: str, body: bytes, client_headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        """POST and return the response once its headers are in; the body is the caller's to read,
        mapping transport errors with `translate(mid_stream=True)`, and to release with `release_stream`.
        Closing it instead drops the connection, which is how the upstream learns the client went away.
        A 200's silences from here on are timed by `idle` (the stream idle timeout)."""
        target = self.upstreams[upstream]
        with translate_errors(target.name):
            response = await self._open(target, path, body, client_headers, stream=True)
        if response.status == 200:
            self.idle.watch(response, target.stream_idle_s)
        return response

    def release_stream(self, response: aiohttp.ClientResponse) -> None:
        self.idle.forget(response)
        response.release()


# What a transport failure can raise; `translate` maps each to the proxy's error tree.
TRANSPORT_ERRORS = (TimeoutError, aiohttp.ClientError, OSError)


def translate(exc: BaseException, upstream: str, *, mid_stream: bool = False) -> UpstreamError:
    """Map an aiohttp/asyncio failure to UpstreamTimeout / UpstreamUnreachable / UpstreamInterrupted
    (the one seam). `mid_stream`: the answer had begun, so a broken connection broke it off."""
    # TimeoutError is an OSError: it must be matched first.
    if isinstance(exc, (TimeoutError, aiohttp.ServerTimeoutError)):
        return UpstreamTimeout(f"upstream {upstream} did not answer in time")
    if mid_stream:
        return UpstreamInterrupted(f"upstream {upstream} broke off the stream: {type(exc).__name__}")
    return UpstreamUnreachable(f"upstream {upstream} is unreachable: {type(exc).__name__}")


def never_sent(exc: BaseException) -> bool:
    """True when the request cannot have reached the upstream (no connection was made): safe to retry."""
    return isinstance(exc.__cause__, aiohttp.ClientConnectorError)


@contextmanager
def translate_errors(upstream: str, *, mid_stream: bool = False) -> Iterator[None]:
    """`translate` as a context manager, for the streaming path."""
    try:
        yield
    except TRANSPORT_ERRORS as exc:
        raise translate(exc, upstream, mid_stream=mid_stream) from exc
