"""Upstream faults and overload, end to end: openai client -> a real proxy -> real mock upstreams.

One proxy process routes one experiment per fault, each to an upstream configured for it:
    retrying     -> flaky mock, retries 2 (max_retry_wait_s 1), timeout_s 0.5
    no-retry     -> the same mock, retries 0
    dead-retry   -> a port nothing listens on, retries 2
    idle         -> a healthy mock, stream_idle_timeout_s 0.5 (stalls and mid-stream deaths)
    fallback     -> treatment on a mock answering 500 to everything, fallback_to_control on, 100 %
    no-fallback  -> the same treatment, fallback off, 100 %
    fallback-dead-> treatment on a dead port, fallback on, 100 %
    narrow       -> a mock with max_in_flight 1
    pool         -> a plain mock (total in-flight bound: server.max_in_flight 6)
The flaky mock's failures are set per test through its /mock/fail endpoint.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from tests.harness import MockUpstream, ProxyServer, RedisServer, eventually, free_port

CHAT = "/v1/chat/completions"
ERROR_KEYS = {"message", "type", "param", "code"}
MAX_IN_FLIGHT = 6


# A token every 0.2 s: each silence shorter than up-paced-idle's 0.5 s, the whole answer longer.
PACED_TOKENS_PER_S = 5


def _experiment(control: str, treatment: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"aliases": [extra.pop("alias")], "control": control, "treatment": treatment or control, **extra}


@pytest.fixture(scope="module")
def mocks(session_dir: Path) -> Iterator[dict[str, MockUpstream]]:
    started = {
        "flaky": MockUpstream("flaky", session_dir),
        "healthy": MockUpstream("healthy", session_dir, tokens_per_s=0),
        "broken": MockUpstream("broken", session_dir, error_rate=1.0),
        "paced": MockUpstream("paced", session_dir, tokens_per_s=PACED_TOKENS_PER_S),
    }
    for mock in started.values():
        mock.start()
    yield started
    for mock in started.values():
        mock.stop()


@pytest.fixture(scope="module")
def proxy(
    mocks: dict[str, MockUpstream], redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyServer]:
    redis.Redis.from_url(redis_server.url).flushall()
    dead = f"http://127.0.0.1:{free_port()}/v1"
    upstreams = {
        "up-flaky": {"base_url": f"{mocks['flaky'].url}/v1", "retries": 2, "max_retry_wait_s": 1, "timeout_s": 0.5},
        "up-flaky-once": {"base_url": f"{mocks['flaky'].url}/v1"},
        "up-dead-retry": {"base_url": dead, "retries": 2},
        "up-dead": {"base_url": dead},
        "up-idle": {"base_url": f"{mocks['healthy'].url}/v1", "stream_idle_timeout_s": 0.5},
        "up-paced-idle": {"base_url": f"{mocks['paced'].url}/v1", "stream_idle_timeout_s": 0.5},
        "up-healthy": {"base_url": f"{mocks['healthy'].url}/v1"},
        "up-broken": {"base_url": f"{mocks['broken'].url}/v1"},
        "up-narrow": {"base_url": f"{mocks['healthy'].url}/v1", "max_in_flight": 1},
    }
    models = {name.removeprefix("up-"): {"upstream": name, "model": f"m-{name}"} for name in upstreams}
    experiments = {
        "retrying": _experiment("flaky", alias="retrying"),
        "no-retry": _experiment("flaky-once", alias="no-retry"),
        "dead-retry": _experiment("dead-retry", alias="dead-retry"),
        "idle": _experiment("idle", alias="idle"),
        "paced-idle": _experiment("paced-idle", alias="paced-idle"),
        "fallback": _experiment("healthy", "broken", alias="fallback", rollout_percent=100, fallback_to_control=True),
        "no-fallback": _experiment("healthy", "broken", alias="no-fallback", rollout_percent=100),
        "fallback-dead": _experiment("healthy", "dead", alias="fallback-dead", rollout_percent=100,
                                     fallback_to_control=True),
        "narrow": _experiment("narrow", alias="narrow"),
        "pool": _experiment("healthy", alias="pool"),
    }
    config = {"upstreams": upstreams, "models": models, "experiments": experiments,
              "server": {"max_in_flight": MAX_IN_FLIGHT}}  # fmt: skip
    server = ProxyServer(config, tmp_path_factory.mktemp("faults"), redis_server.url)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=15) as client:
        yield client


@pytest.fixture()
def client(proxy: ProxyServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="sk-client", max_retries=0) as c:
        yield c


def _body(model: str, user: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}],
            "user": user or uuid.uuid4().hex, **extra}  # fmt: skip


def _fail_next(http: httpx.Client, mock: MockUpstream, count: int, status: int, retry_after: str = "0") -> None:
    http.post(f"{mock.url}/mock/fail", json={"count": count, "status": status, "retry_after": retry_after})


def _requests_seen(http: httpx.Client, mock: MockUpstream) -> int:
    return int(http.get(f"{mock.url}/mock/stats").json()["requests"])


def _metric(http: httpx.Client, proxy: ProxyServer, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels` (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(http.get(f"{proxy.url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def _event(proxy: ProxyServer, request_id: str) -> dict[str, Any]:
    found = [e for e in proxy.events() if e.get("request_id") == request_id]
    assert len(found) == 1, f"expected one event for {request_id}, got {found}"
    return found[0]


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS
    assert body["error"]["code"] == code
    return dict(body["error"])


def _sse_events(text: str) -> list[Any]:
    return [json.loads(line[6:]) if line[6:] != "[DONE]" else "[DONE]"
            for line in text.split("\n") if line.startswith("data: ")]  # fmt: skip


# -- retries before the first byte -------------------------------------------------------------
class TestRetries:
    def test_503_with_retry_after_is_retried_until_it_succeeds(
        self, http: httpx.Client, proxy: ProxyServer, mocks: dict[str, MockUpstream], client: openai.OpenAI
    ) -> None:
        before_seen = _requests_seen(http, mocks["flaky"])
        before = _metric(http, proxy, "abproxy_upstream_retries_total", upstream="up-flaky", reason="503")
        _fail_next(http, mocks["flaky"], 2, 503, retry_after="0")
        raw = client.chat.completions.with_raw_response.create(**_body("retrying"))
        answer = raw.parse()
        assert "[flaky]" in (answer.choices[0].message.content or "")
        assert _requests_seen(http, mocks["flaky"]) - before_seen == 3
        eventually(lambda: _check(_metric(http, proxy, "abproxy_upstream_retries_total", upstream="up-flaky",
                                          reason="503") - before == 2))  # fmt: skip
        eventually(lambda: _check(_event(proxy, raw.headers["x-request-id"])["retries"] == 2))

    def test_429_is_retried_for_a_stream_before_its_first_byte(
        self, http: httpx.Client, proxy: ProxyServer, mocks: dict[str, MockUpstream], client: openai.OpenAI
    ) -> None:
        _fail_next(http, mocks["flaky"], 1, 429, retry_after="0")
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            **_body("retrying"), stream=True) if c.choices)  # fmt: skip
        assert "[flaky]" in text

    def test_retry_after_beyond_the_cap_is_passed_to_the_client(
        self, http: httpx.Client, proxy: ProxyServer, mocks: dict[str, MockUpstream]
    ) -> None:
        """Retry-After 30 > max_retry_wait_s 1: one attempt, and the client learns when to come back."""
        before_seen = _requests_seen(http, mocks["flaky"])
        _fail_next(http, mocks["flaky"], 1, 429, retry_after="30")
        response = http.post(f"{proxy.url}{CHAT}", json=_body("retrying"))
        assert response.status_code == 429
        assert response.headers["retry-after"] == "30"
        assert _requests_seen(http, mocks["flaky"]) - before_seen == 1

    def test_500_is_not_retried(self, http: httpx.Client, proxy: ProxyServer, mocks: dict[str, MockUpstream]) -> None:
        """A 500 may come after the upstream acted (and billed): it is answered, not repeated."""
        before_seen = _requests_seen(http, mocks["flaky"])
        _fail_next(http, mocks["flaky"], 1, 500)
        assert http.post(f"{proxy.url}{CHAT}", json=_body("retrying")).status_code == 500
        assert _requests_seen(http, mocks["flaky"]) - before_seen == 1

    def test_timeout_before_headers_is_504_and_not_retried(
        self, http: httpx.Client, proxy: ProxyServer, mocks: dict[str, MockUpstream]
    ) -> None:
        before_seen = _requests_seen(http, mocks["flaky"])
        response = http.post(f"{proxy.url}{CHAT}", json=_body("retrying", mock_latency_ms=1500))
        _error(response, 504, "upstream_timeout")
        assert _requests_seen(http, mocks["flaky"]) - before_seen == 1

    def test_retries_are_off_by_default(
        self, http: httpx.Client, proxy: ProxyServer, mocks: dict[str, MockUpstream]
    ) -> None:
        _fail_next(http, mocks["flaky"], 1, 503)
        response = http.post(f"{proxy.url}{CHAT}", json=_body("no-retry"))
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "mock_503"  # the upstream's own error, unchanged

    def test_refused_connection_is_retried_then_502(self, http: httpx.Client, proxy: ProxyServer) -> None:
        before = _metric(http, proxy, "abproxy_upstream_retries_total", upstream="up-dead-retry", reason="connect")
        response = http.post(f"{proxy.url}{CHAT}", json=_body("dead-retry"))
        _error(response, 502, "upstream_unreachable")
        eventually(lambda: _check(_metric(http, proxy, "abproxy_upstream_retries_total", upstream="up-dead-retry",
                                          reason="connect") - before == 2))  # fmt: skip


# -- streams that stall or die -------------------------------------------------------------------
class TestBrokenStreams:
    @pytest.mark.parametrize(("fault", "code", "reason"), [
        ("mock_stall_after", "upstream_timeout", "timeout"),
        ("mock_die_after", "upstream_interrupted", "interrupted"),
    ])  # fmt: skip
    def test_client_gets_a_well_formed_end_with_an_error_event(
        self, http: httpx.Client, proxy: ProxyServer, fault: str, code: str, reason: str
    ) -> None:
        before = _metric(http, proxy, "abproxy_upstream_errors_total", experiment="idle", reason=reason)
        with http.stream("POST", f"{proxy.url}{CHAT}", json=_body("idle", stream=True, **{fault: 3})) as response:
            assert response.status_code == 200
            text = response.read().decode()  # a clean end of the chunked body: no transport error here
        events = _sse_events(text)
        assert [e["choices"][0]["delta"].get("content") is not None for e in events[:3]] == [True] * 3
        assert events[-1] != "[DONE]" and set(events[-1]) == {"error"}
        assert set(events[-1]["error"]) == ERROR_KEYS and events[-1]["error"]["code"] == code
        assert text.endswith("\n\n")
        eventually(lambda: _check(_metric(http, proxy, "abproxy_upstream_errors_total", experiment="idle",
                                          reason=reason) - before == 1))  # fmt: skip
        eventually(lambda: _check(_event(proxy, response.headers["x-request-id"])["error"] == reason))

    def test_a_stream_longer_than_its_idle_timeout_but_never_that_silent_is_not_cut(
        self, http: httpx.Client, proxy: ProxyServer
    ) -> None:
        """The idle timeout bounds each silence, not the answer: tokens 0.2 s apart for well over 0.5 s."""
        with http.stream("POST", f"{proxy.url}{CHAT}", json=_body("paced-idle", stream=True)) as response:
            assert response.status_code == 200
            text = response.read().decode()
        events = _sse_events(text)
        tokens = [e for e in events[:-1] if e["choices"] and e["choices"][0]["delta"].get("content")]
        assert len(tokens) - 1 >= 4, "the answer was too short to outlast the timeout"  # >= 0.8 s of paced gaps
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
        eventually(lambda: _check(_event(proxy, response.headers["x-request-id"])["error"] is None))

    def test_the_openai_client_raises_on_the_error_event(self, client: openai.OpenAI) -> None:
        stream = client.chat.completions.create(**_body("idle"), stream=True, extra_body={"mock_die_after": 3})
        with pytest.raises(openai.APIError, match="broke off the stream"):
            for _ in stream:
                pass


# -- treatment -> control fallback ---------------------------------------------------------------
class TestFallback:
    def test_failed_treatment_is_answered_by_control_and_marked(
        self, http: httpx.Client, proxy: ProxyServer, client: openai.OpenAI
    ) -> None:
        before = _metric(http, proxy, "abproxy_fallbacks_total", experiment="fallback", reason="5xx")
        raw = client.chat.completions.with_raw_response.create(**_body("fallback"))
        assert "[healthy]" in (raw.parse().choices[0].message.content or "")
        assert raw.headers["x-abproxy-variant"] == "treatment"  # the assignment is not rewritten
        assert raw.headers["x-abproxy-fallback"] == "control"
        eventually(lambda: _check(_metric(http, proxy, "abproxy_fallbacks_total", experiment="fallback",
                                          reason="5xx") - before == 1))  # fmt: skip
        event = _wait_event(proxy, raw.headers["x-request-id"])
        # Honest data: a treatment request whose treatment call failed, answered by the control.
        assert (event["variant"], event["fallback"], event["status"], event["upstream_status"], event["error"]) == (
            "treatment", True, 200, 500, "5xx")
        assert "treatment_fell_back_to_control" in proxy.stderr_path.read_text()

    def test_stream_falls_back_when_the_treatment_is_unreachable(self, client: openai.OpenAI) -> None:
        chunks = list(client.chat.completions.create(**_body("fallback-dead"), stream=True))
        assert "[healthy]" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    def test_off_by_default(self, http: httpx.Client, proxy: ProxyServer) -> None:
        response = http.post(f"{proxy.url}{CHAT}", json=_body("no-fallback"))
        assert response.status_code == 500
        assert "x-abproxy-fallback" not in response.headers


# -- overload: bounded, answered at once --------------------------------------------------------
def _concurrently(http_url: str, bodies: list[dict[str, Any]]) -> list[tuple[int, float, httpx.Response]]:
    """Send all bodies at once; (index, completion order, response) per request."""
    results: list[tuple[int, float, httpx.Response]] = []
    lock = threading.Lock()
    counter = iter(range(10_000))

    def send(i: int, body: dict[str, Any]) -> None:
        response = httpx.post(f"{http_url}{CHAT}", json=body, timeout=15)
        with lock:
            results.append((i, next(counter), response))

    threads = [threading.Thread(target=send, args=(i, b)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


class TestOverload:
    def test_per_upstream_bound_answers_429_at_once(self, http: httpx.Client, proxy: ProxyServer) -> None:
        before = _metric(http, proxy, "abproxy_overloaded_requests_total", limit="up-narrow")
        results = _concurrently(proxy.url, [_body("narrow", mock_latency_ms=1500) for _ in range(3)])
        statuses = sorted(r.status_code for _, _, r in results)
        assert statuses == [200, 429, 429]
        refused = [r for _, _, r in results if r.status_code == 429]
        for response in refused:
            error = _error(response, 429, "upstream_concurrency_limit")
            assert error["type"] == "rate_limit_error"
            assert response.headers["retry-after"] == "1"
        # Refused at once: both refusals completed before the one admitted request.
        order = {r.status_code: o for _, o, r in results if r.status_code == 200}
        assert all(o < order[200] for _, o, r in results if r.status_code == 429)
        eventually(lambda: _check(_metric(http, proxy, "abproxy_overloaded_requests_total", limit="up-narrow")
                                  - before == 2))  # fmt: skip

    def test_total_bound_answers_503_and_in_flight_returns_to_zero(
        self, http: httpx.Client, proxy: ProxyServer
    ) -> None:
        results = _concurrently(proxy.url, [_body("pool", mock_latency_ms=1500) for _ in range(MAX_IN_FLIGHT + 3)])
        ok = [o for _, o, r in results if r.status_code == 200]
        shed = [(o, r) for _, o, r in results if r.status_code != 200]
        assert len(ok) == MAX_IN_FLIGHT and len(shed) == 3
        for order, response in shed:
            error = _error(response, 503, "proxy_overloaded")
            assert error["type"] == "service_unavailable" and response.headers["retry-after"] == "1"
            assert order < min(ok)
        eventually(lambda: _check(_metric(http, proxy, "abproxy_in_flight_requests") == 0))
        assert http.post(f"{proxy.url}{CHAT}", json=_body("pool")).status_code == 200  # and serving again


def _check(condition: bool) -> None:
    assert condition


def _wait_event(proxy: ProxyServer, request_id: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def look() -> None:
        found[:] = [_event(proxy, request_id)]

    eventually(look)
    return found[0]
