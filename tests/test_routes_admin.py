"""The admin API, health, readiness and metrics, against a real proxy process over HTTP.

One proxy with a token serves the module; a second one, started with no token, checks the
admin API is refused rather than open. Both share one Redis, read directly to prove that
refused or invalid writes changed nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import ADMIN_TOKEN, MockUpstream, ProxyServer, RedisServer, proxy_config

EXPERIMENT = "sales-companion"
STATE_KEY = f"abproxy:rollout:{EXPERIMENT}"
AUDIT_KEY = f"abproxy:audit:{EXPERIMENT}"
ERROR_KEYS = {"message", "type", "param", "code"}
ROLLOUT = f"/admin/experiments/{EXPERIMENT}/rollout"
# Every admin route; the PUT with a valid body, and with bodies that must not be read before auth.
ADMIN_ROUTES: list[tuple[str, str, bytes | None]] = [
    ("GET", "/admin/experiments", None),
    ("GET", f"/admin/experiments/{EXPERIMENT}", None),
    ("PUT", ROLLOUT, b'{"percent": 40, "reason": "should not happen"}'),
    ("PUT", ROLLOUT, b'{"percent": '),
    ("PUT", ROLLOUT, b'{"percent": 400}'),
    ("GET", f"/admin/experiments/{EXPERIMENT}/audit", None),
    ("GET", "/admin/experiments/no-such-experiment", None),
    ("PUT", "/admin/experiments/no-such-experiment/rollout", b'{"percent": 40}'),
]
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="module")
def admin_proxy(redis_client: redis.Redis, module_proxy: ProxyServer) -> ProxyServer:
    """The module's proxy, started after `redis_client` emptied Redis."""
    return module_proxy


@pytest.fixture(scope="module")
def admin(admin_proxy: ProxyServer) -> Iterator[httpx.Client]:
    """An httpx client carrying the right token (one per module: each costs ~30-70 ms to build)."""
    with admin_proxy.admin() as client:
        yield client


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    """A client with no credentials."""
    with httpx.Client(timeout=10) as client:
        yield client


def _stored(redis_client: redis.Redis) -> tuple[dict[str, str], int]:
    """What Redis holds for the experiment: its state hash and the audit stream's length."""
    return redis_client.hgetall(STATE_KEY), redis_client.xlen(AUDIT_KEY)  # type: ignore[return-value]


def _error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """Assert an OpenAI-shaped error with exactly message/type/param/code."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == ERROR_KEYS
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    error: dict[str, Any] = body["error"]
    return error


def _put(client: httpx.Client, percent: float, reason: str | None = None, actor: str | None = None) -> dict[str, Any]:
    headers = {"X-Abproxy-Actor": actor} if actor else {}
    response = client.put(ROLLOUT, json={"percent": percent, "reason": reason}, headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _rollout_gauge(http: httpx.Client, proxy: ProxyServer) -> float:
    for family in text_string_to_metric_families(http.get(f"{proxy.url}/metrics").text):
        for sample in family.samples:
            if sample.name == "abproxy_rollout_percent" and sample.labels == {"experiment": EXPERIMENT}:
                return float(sample.value)
    raise AssertionError("abproxy_rollout_percent{experiment=sales-companion} not exposed")


class TestAuth:
    def test_no_token_configured_refuses_everything(
        self,
        http: httpx.Client,
        upstreams: tuple[MockUpstream, MockUpstream],
        redis_server: RedisServer,
        redis_client: redis.Redis,
        tmp_path: Path,
    ) -> None:
        """With no token configured every admin route is 403 (bad bodies unread), whatever is sent; nothing changes."""
        server = ProxyServer(proxy_config(*upstreams), tmp_path, redis_server.url, admin_token=None)
        server.start()
        try:
            before = _stored(redis_client)
            for headers in ({}, {"Authorization": "Bearer anything"}, {"Authorization": f"Bearer {ADMIN_TOKEN}"}):
                for method, path, body in ADMIN_ROUTES:
                    response = http.request(method, f"{server.url}{path}", content=body, headers={**JSON, **headers})
                    error = _error(response, 403, "admin_disabled")
                    assert error["type"] == "permission_error"
            assert _stored(redis_client) == before
            assert _rollout_gauge(http, server) == 0
            assert http.get(f"{server.url}/healthz").status_code == 200
        finally:
            server.stop()

    @pytest.mark.parametrize(
        "headers",
        [
            {},
            {"Authorization": "Bearer wrong-token"},
            {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
            {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"},
            {"Authorization": f"Basic {ADMIN_TOKEN}"},
            {"Authorization": ADMIN_TOKEN},
        ],
        ids=["missing", "wrong", "longer", "prefix", "basic-scheme", "no-scheme"],
    )
    def test_bad_token_is_401(
        self, http: httpx.Client, admin_proxy: ProxyServer, redis_client: redis.Redis, headers: dict[str, str]
    ) -> None:
        """A missing or wrong bearer token is 401 on every admin route (bad bodies unread); nothing changes."""
        before = _stored(redis_client)
        for method, path, body in ADMIN_ROUTES:
            response = http.request(method, f"{admin_proxy.url}{path}", content=body, headers={**JSON, **headers})
            error = _error(response, 401, "invalid_admin_token")
            assert error["type"] == "authentication_error"
            assert ADMIN_TOKEN not in response.text
        assert _stored(redis_client) == before


class TestRead:
    def test_list(self, admin: httpx.Client) -> None:
        """GET /admin/experiments lists the experiment with both arms and its live percent."""
        _put(admin, 3, reason="list", actor="lister")
        response = admin.get("/admin/experiments")
        assert response.status_code == 200
        (exp,) = response.json()["experiments"]
        assert exp["name"] == EXPERIMENT
        assert exp["aliases"] == ["sales-companion", "gpt-4o-mini"]
        assert exp["salt"] == "sales-v2"
        assert exp["control"] == {"model": "base", "upstream": "up-base", "upstream_model": "gpt-4o-mini"}
        assert exp["treatment"] == {
            "model": "finetuned",
            "upstream": "up-ft",
            "upstream_model": "ft:gpt-4o-mini:acme:sales-v2:abc123",
        }
        assert (exp["percent"], exp["updated_by"], exp["reason"], exp["source"]) == (3, "lister", "list", "redis")

    def test_single(self, admin: httpx.Client) -> None:
        """GET /admin/experiments/{name} shows the live percent and when and by whom it was set."""
        _put(admin, 12.5, reason="single", actor="carol")
        exp = admin.get(f"/admin/experiments/{EXPERIMENT}").json()
        assert exp["name"] == EXPERIMENT
        assert exp["percent"] == 12.5
        assert exp["updated_by"] == "carol"
        updated = datetime.fromisoformat(exp["updated_at"].replace("Z", "+00:00"))
        assert abs(updated.timestamp() - time.time()) < 60
        assert exp["stale"] is False

    def test_unknown_experiment_is_404(self, admin: httpx.Client, redis_client: redis.Redis) -> None:
        """GET, PUT and audit of an experiment that does not exist are 404, and nothing is written."""
        keys = set(redis_client.keys("*"))
        for method, path, body in [
            ("GET", "/admin/experiments/nope", None),
            ("PUT", "/admin/experiments/nope/rollout", {"percent": 5}),
            ("GET", "/admin/experiments/nope/audit", None),
        ]:
            _error(admin.request(method, path, json=body), 404, "experiment_not_found")
        assert set(redis_client.keys("*")) == keys


class TestWrite:
    def test_put_answers_the_new_state(self, admin: httpx.Client, admin_proxy: ProxyServer) -> None:
        """PUT answers the new percent, the previous one, who (X-Abproxy-Actor) and why."""
        _put(admin, 10, reason="first")
        state = _put(admin, 25, reason="canary", actor="bob")
        assert state["name"] == EXPERIMENT
        assert state["percent"] == 25
        assert state["previous_percent"] == 10
        assert state["updated_by"] == "bob"
        assert state["reason"] == "canary"
        assert state["source"] == "redis"
        assert _rollout_gauge(admin, admin_proxy) == 25
        anonymous = _put(admin, 33.33)
        assert (anonymous["percent"], anonymous["previous_percent"]) == (33.33, 25)
        assert (anonymous["updated_by"], anonymous["reason"]) == ("admin", None)
        assert admin.get(f"/admin/experiments/{EXPERIMENT}").json()["percent"] == 33.33
        assert _rollout_gauge(admin, admin_proxy) == 33.33

    @pytest.mark.parametrize(
        ("content", "param"),
        [
            (b'{"percent": 101}', "percent"),
            (b'{"percent": -1}', "percent"),
            (b'{"percent": 100.01}', "percent"),
            (b'{"percent": 1.001}', "percent"),
            (b'{"percent": "25"}', "percent"),
            (b'{"percent": true}', "percent"),
            (b'{"percent": null}', "percent"),
            (b'{"percent": NaN}', "percent"),
            (b'{"percent": Infinity}', "percent"),
            (b'{"percent": [25]}', "percent"),
            (b"{}", "percent"),
            (b'{"reason": "no percent"}', "percent"),
            (b'{"percent": 5, "rollout": 5}', "rollout"),
            (b'{"percent": 5, "reason": 7}', "reason"),
            (b'{"percent": 5', None),
            (b"", None),
            (b"[25]", None),
        ],
    )
    def test_invalid_put_is_422_and_changes_nothing(
        self, admin: httpx.Client, redis_client: redis.Redis, content: bytes, param: str | None
    ) -> None:
        """An invalid rollout body is 422 naming the field, and the stored percent and audit stay as they were."""
        _put(admin, 7, reason="baseline")
        before = _stored(redis_client)
        response = admin.put(ROLLOUT, content=content, headers=JSON)
        error = _error(response, 422)
        assert error["param"] == param
        assert error["type"] == "invalid_request_error"
        assert _stored(redis_client) == before
        assert admin.get(f"/admin/experiments/{EXPERIMENT}").json()["percent"] == 7

    def test_audit_newest_first(self, admin: httpx.Client) -> None:
        """The audit lists every change newest first, with from, to, who, when and why."""
        _put(admin, 0, reason="reset")
        for percent, actor in ((10, "ann"), (25, "ben"), (50, "cat")):
            _put(admin, percent, reason=f"step to {percent}", actor=actor)
        response = admin.get(f"/admin/experiments/{EXPERIMENT}/audit")
        assert response.status_code == 200
        entries = response.json()["entries"][:3]
        assert [(e["from"], e["to"], e["by"], e["reason"]) for e in entries] == [
            (25, 50, "cat", "step to 50"),
            (10, 25, "ben", "step to 25"),
            (0, 10, "ann", "step to 10"),
        ]
        times = [datetime.fromisoformat(e["at"].replace("Z", "+00:00")) for e in entries]
        assert times == sorted(times, reverse=True)
        limited = admin.get(f"/admin/experiments/{EXPERIMENT}/audit", params={"limit": 2}).json()["entries"]
        assert [e["to"] for e in limited] == [50, 25]


class TestOps:
    def test_healthz(self, http: httpx.Client, admin_proxy: ProxyServer) -> None:
        """/healthz answers 200 without a token."""
        response = http.get(f"{admin_proxy.url}/healthz")
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}

    def test_readyz(self, http: httpx.Client, admin_proxy: ProxyServer) -> None:
        """/readyz answers 200 once the rollout state was loaded from Redis."""
        response = http.get(f"{admin_proxy.url}/readyz")
        assert response.status_code == 200
        assert response.json()["rollout_loaded"] is True
        assert response.json()["redis_connected"] is True

    def test_metrics_expose_rollout_percent(self, admin: httpx.Client, admin_proxy: ProxyServer) -> None:
        """/metrics exposes abproxy_rollout_percent, following each change."""
        for percent in (15, 42.42):
            _put(admin, percent)
            assert _rollout_gauge(admin, admin_proxy) == percent
