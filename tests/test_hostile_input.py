"""Hostile and malformed requests against a real proxy process: each gets a clear error in
OpenAI's shape (or is served as the API allows), changes nothing and reaches no upstream.

Unknown body fields passing through untouched is tests/test_routes_openai.py
::TestRouting::test_client_body_forwarded_unchanged_but_model.
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from proxy.assignment import bucket, choose_variant, threshold
from tests.harness import MockUpstream, ProxyServer, RedisServer, free_port, proxy_config

CHAT = "/v1/chat/completions"
ERROR_KEYS = {"message", "type", "param", "code"}
MAX_BODY = 64 * 1024
SALT = "sales-v2"


@pytest.fixture(scope="module")
def proxy(
    upstreams: tuple[MockUpstream, MockUpstream], redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyServer]:
    redis.Redis.from_url(redis_server.url).flushall()
    config = proxy_config(*upstreams, server={"max_body_bytes": MAX_BODY})
    config["experiments"]["sales-companion"]["rollout_percent"] = 50
    server = ProxyServer(config, tmp_path_factory.mktemp("hostile"), redis_server.url)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=15) as client:
        yield client


@pytest.fixture()
def seen(http: httpx.Client, upstreams: tuple[MockUpstream, MockUpstream]) -> Iterator[list[MockUpstream]]:
    """The upstreams, reset before the test; after it, asserts they were sent nothing."""
    for mock in upstreams:
        http.post(f"{mock.url}/mock/reset")
    yield list(upstreams)
    for mock in upstreams:
        assert http.get(f"{mock.url}/mock/stats").json()["requests"] == 0, f"{mock.name} was reached"


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert body["error"]["code"] == code, body
    return dict(body["error"])


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "sales-companion", "messages": [{"role": "user", "content": "hi"}], **extra}


class TestBodies:
    def test_body_over_the_limit_is_413(self, http: httpx.Client, proxy: ProxyServer, seen: list[MockUpstream]) -> None:
        big = _chat(messages=[{"role": "user", "content": "x" * MAX_BODY}])
        _error(http.post(f"{proxy.url}{CHAT}", json=big), 413, "body_too_large")

    def test_chunked_body_over_the_limit_is_413(
        self, http: httpx.Client, proxy: ProxyServer, seen: list[MockUpstream]
    ) -> None:
        """No Content-Length to trust: the limit is counted as the chunks arrive."""
        def chunks() -> Iterator[bytes]:
            yield b'{"model": "sales-companion", "messages": [{"role": "user", "content": "'
            for _ in range(40):
                yield b"y" * 4096
            yield b'"}]}'

        _error(http.post(f"{proxy.url}{CHAT}", content=chunks()), 413, "body_too_large")

    def test_a_body_under_the_limit_is_served(self, http: httpx.Client, proxy: ProxyServer) -> None:
        body = _chat(messages=[{"role": "user", "content": "x" * (MAX_BODY - 1000)}], user="big-but-fine")
        assert http.post(f"{proxy.url}{CHAT}", json=body).status_code == 200

    @pytest.mark.parametrize("raw", [
        b'{"model": "sales-companion", "messages": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
        b'{"model": "sales-companion", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        b'{"model": "sales-companion", "messages": [], "n": 1e999999}',
        b"\xef\xbb\xbf\x00{",
    ], ids=["deeply-nested", "invalid-utf8", "huge-number", "bom-and-nul"])  # fmt: skip
    def test_malformed_json_is_400(
        self, http: httpx.Client, proxy: ProxyServer, seen: list[MockUpstream], raw: bytes
    ) -> None:
        _error(http.post(f"{proxy.url}{CHAT}", content=raw), 400, "invalid_json")

    @pytest.mark.parametrize("content_type", [
        "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml",
    ])  # fmt: skip
    def test_wrong_content_type_is_415(
        self, http: httpx.Client, proxy: ProxyServer, seen: list[MockUpstream], content_type: str
    ) -> None:
        response = http.post(f"{proxy.url}{CHAT}", json=_chat(), headers={"content-type": content_type})
        error = _error(response, 415, "unsupported_media_type")
        assert content_type.split(";")[0] in error["message"]

    @pytest.mark.parametrize("content_type", [None, "application/json", "application/json; charset=utf-8",
                                              "application/vnd.api+json"])  # fmt: skip
    def test_json_content_types_are_served(
        self, http: httpx.Client, proxy: ProxyServer, content_type: str | None
    ) -> None:
        headers = {"content-type": content_type} if content_type else {}
        raw = b'{"model": "sales-companion", "messages": [{"role": "user", "content": "hi"}]}'
        request = http.build_request("POST", f"{proxy.url}{CHAT}", content=raw, headers=headers)
        assert ("content-type" in request.headers) == (content_type is not None)
        assert http.send(request).status_code == 200


class TestModelValues:
    @pytest.mark.parametrize("model", [
        "../../admin/experiments", "/etc/passwd", "up-base", "http://127.0.0.1:{port}/v1",
        "https://169.254.169.254/latest/meta-data/", "gpt-4o-mini/../../x", "sales-companion\r\nX-Evil: 1",
        "%2e%2e%2fadmin", "a" * 100_00,
    ])  # fmt: skip
    def test_paths_and_urls_are_unknown_models_and_reach_nothing(
        self, http: httpx.Client, proxy: ProxyServer, seen: list[MockUpstream], model: str
    ) -> None:
        """No SSRF: upstream URLs come only from config; `model` only ever selects an alias."""
        trap = socket.socket()
        trap.bind(("127.0.0.1", free_port()))
        trap.listen()
        trap.settimeout(0.3)
        try:
            model = model.replace("{port}", str(trap.getsockname()[1]))
            error = _error(http.post(f"{proxy.url}{CHAT}", json=_chat(model=model)), 404, "model_not_found")
            assert error["param"] == "model" and len(error["message"]) < 300  # not echoed whole
            with pytest.raises(TimeoutError):
                trap.accept()  # nobody called the URL the client named
        finally:
            trap.close()

    def test_host_and_forwarding_headers_do_not_move_the_upstream(
        self, http: httpx.Client, proxy: ProxyServer, upstreams: tuple[MockUpstream, MockUpstream]
    ) -> None:
        for mock in upstreams:
            http.post(f"{mock.url}/mock/reset")
        headers = {"host": "evil.example", "x-forwarded-host": "evil.example", "x-original-url": "http://evil/"}
        response = http.post(f"{proxy.url}{CHAT}", json=_chat(user="u-host"), headers=headers)
        assert response.status_code == 200
        assert sum(http.get(f"{m.url}/mock/stats").json()["requests"] for m in upstreams) == 1


class TestUserIds:
    def test_absurdly_long_user_id_is_400(
        self, http: httpx.Client, proxy: ProxyServer, seen: list[MockUpstream]
    ) -> None:
        for where in ({"json": _chat(user="u" * 513)}, {"json": _chat(), "headers": {"x-user-id": "h" * 100_000}}):
            error = _error(http.post(f"{proxy.url}{CHAT}", **where), 400, "invalid_user_id")  # type: ignore[arg-type]
            assert error["param"] == "user"

    def test_a_512_character_user_id_is_served(self, http: httpx.Client, proxy: ProxyServer) -> None:
        assert http.post(f"{proxy.url}{CHAT}", json=_chat(user="u" * 512)).status_code == 200

    def test_header_injection_attempt_routes_by_the_literal_id_and_is_never_reflected(
        self, proxy: ProxyServer
    ) -> None:
        """A CRLF inside X-User-Id can only end that header (HTTP framing): the id is what precedes it,
        and a smuggled x-abproxy-variant header does not choose the arm."""
        body = b'{"model": "sales-companion", "messages": [{"role": "user", "content": "hi"}]}'
        user = f"victim-{uuid.uuid4().hex[:8]}"
        raw = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"X-User-Id: {user}\r\nX-Abproxy-Variant: treatment\r\nX-Abproxy-Variant: control\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body  # fmt: skip
        head = _raw_exchange(proxy.port, raw)
        expected = choose_variant(bucket(SALT, user), threshold(50))
        assert f"x-abproxy-variant: {expected}" in head.lower()
        assert head.lower().count("x-abproxy-variant:") == 1
        assert user not in head

    def test_latin1_header_bytes_route_consistently(self, proxy: ProxyServer) -> None:
        body = b'{"model": "sales-companion", "messages": [{"role": "user", "content": "hi"}]}'
        raw = (b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: x\r\nX-User-Id: caf\xe9-\xff\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)  # fmt: skip
        heads = {_raw_exchange(proxy.port, raw).split("\r\n")[0] for _ in range(3)}
        assert heads == {"HTTP/1.1 200 OK"}


def _raw_exchange(port: int, raw: bytes) -> str:
    """Send raw bytes, return the response head (status line and headers) as text."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(raw)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n\r\n")[0].decode("latin-1")


def test_many_hostile_requests_at_once_leave_the_proxy_serving(http: httpx.Client, proxy: ProxyServer) -> None:
    """A burst of everything above at once: every answer is a 4xx, and a normal request then works."""
    bodies: list[bytes] = [b"[" * 50_000, b"\xff" * 1000, b"{}" * 40_000, b'{"model": "../x"}'] * 25
    statuses: list[int] = []
    lock = threading.Lock()

    def send(raw: bytes) -> None:
        status = httpx.post(f"{proxy.url}{CHAT}", content=raw, timeout=15).status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=send, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(statuses) == len(bodies) and all(400 <= s < 500 for s in statuses), sorted(set(statuses))
    assert http.post(f"{proxy.url}{CHAT}", json=_chat(user="after-burst")).status_code == 200
