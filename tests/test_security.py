"""Client keys, the admin API's tokens, rate limit and audit, and secrets that must never leak,
against one real proxy process (client_auth on, a read-only admin token, events on the Redis Stream).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import redis

from tests.harness import ADMIN_TOKEN, UPSTREAM_KEYS, MockUpstream, ProxyServer, RedisServer, eventually, proxy_config

CLIENT_KEY = "sk-abproxy-client-5b1e0c9d"
READ_TOKEN = "test-admin-read-token-77"
PROMPT_MARKER = "PROMPT-MARKER-do-not-log-4417"
ADMIN_RATE = 40  # admin requests per minute per token
EXPERIMENT = "sales-companion"
ERROR_KEYS = {"message", "type", "param", "code"}
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="module")
def proxy(
    upstreams: tuple[MockUpstream, MockUpstream],
    redis_server: RedisServer,
    redis_client: redis.Redis,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProxyServer]:
    config = proxy_config(
        *upstreams,
        client_auth={"key_sha256": [hashlib.sha256(CLIENT_KEY.encode()).hexdigest()]},
        admin={"rate_limit_per_minute": ADMIN_RATE},
        events={"redis_stream": {"enabled": True}},
    )
    server = ProxyServer(config, tmp_path_factory.mktemp("security"), redis_server.url,
                         extra_env={"ABPROXY_ADMIN_READ_TOKEN": READ_TOKEN})  # fmt: skip
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def seen() -> list[httpx.Response]:
    """Every response of the module, for the leak check at its end."""
    return []


@pytest.fixture(scope="module")
def http(seen: list[httpx.Response]) -> Iterator[httpx.Client]:
    with httpx.Client(timeout=15, event_hooks={"response": [lambda r: seen.append(r)]}) as client:
        yield client


def _as(token: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}".strip(), **headers}


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    response.read()
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert body["error"]["code"] == code, body
    return dict(body["error"])


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": EXPERIMENT, "messages": [{"role": "user", "content": f"hello {PROMPT_MARKER}"}], **extra}


class TestClientAuth:
    def test_valid_key_is_served_and_not_forwarded(
        self, http: httpx.Client, proxy: ProxyServer, upstreams: tuple[MockUpstream, MockUpstream]
    ) -> None:
        with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=CLIENT_KEY, max_retries=0) as client:
            answer = client.chat.completions.create(**_chat(user="u-valid"))
        assert answer.choices[0].message.content
        (forwarded,) = http.get(f"{upstreams[0].url}/mock/requests").json()[-1:]
        assert forwarded["headers"]["authorization"] == f"Bearer {UPSTREAM_KEYS['base']}"

    @pytest.mark.parametrize("authorization", [
        None, "Bearer sk-wrong", f"Basic {CLIENT_KEY}", "Bearer", f"Bearer {CLIENT_KEY}x",
        hashlib.sha256(CLIENT_KEY.encode()).hexdigest(),
    ], ids=["none", "wrong", "basic", "empty", "longer", "the-hash"])  # fmt: skip
    def test_missing_or_wrong_key_is_401_in_openai_shape(
        self, http: httpx.Client, proxy: ProxyServer, authorization: str | None
    ) -> None:
        headers = {"Authorization": authorization} if authorization else {}
        for method, path, body in (("POST", CHAT, _chat()), ("GET", "/v1/models", None),
                                   ("POST", "/v1/feedback", {"request_id": "x", "metric": "m", "value": 1})):
            response = http.request(method, f"{proxy.url}{path}", json=body, headers=headers)
            error = _error(response, 401, "invalid_api_key")
            assert error["type"] == "invalid_request_error"

    def test_the_openai_client_raises_authentication_error(self, proxy: ProxyServer, http: httpx.Client) -> None:
        with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="sk-nope", max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError):
                client.chat.completions.create(**_chat())

    def test_hash_key_prints_the_sha256(self) -> None:
        done = subprocess.run([sys.executable, "-m", "proxy", "hash-key", "--key", CLIENT_KEY],
                              capture_output=True, text=True, check=True)  # fmt: skip
        assert done.stdout.strip() == hashlib.sha256(CLIENT_KEY.encode()).hexdigest()


class TestAdminTokens:
    def test_read_only_token_reads(self, http: httpx.Client, proxy: ProxyServer) -> None:
        one = f"/admin/experiments/{EXPERIMENT}"
        for path in ("/admin/experiments", one, f"{one}/audit", f"{one}/plan"):
            assert http.get(f"{proxy.url}{path}", headers=_as(READ_TOKEN)).status_code == 200

    def test_read_only_token_cannot_change_anything(
        self, http: httpx.Client, proxy: ProxyServer, redis_client: redis.Redis
    ) -> None:
        before = redis_client.hgetall(f"abproxy:rollout:{EXPERIMENT}")
        response = http.put(f"{proxy.url}/admin/experiments/{EXPERIMENT}/rollout", headers=_as(READ_TOKEN),
                            json={"percent": 60, "reason": "sneaky"})  # fmt: skip
        assert _error(response, 403, "read_only_token")["type"] == "permission_error"
        response = http.post(f"{proxy.url}/admin/experiments/{EXPERIMENT}/plan/pause", headers=_as(READ_TOKEN),
                             json={"reason": "sneaky"})  # fmt: skip
        _error(response, 403, "read_only_token")
        assert redis_client.hgetall(f"abproxy:rollout:{EXPERIMENT}") == before

    @pytest.mark.parametrize("token", ["", "test-admin-token-", "TEST-ADMIN-TOKEN", ADMIN_TOKEN[:-1]])
    def test_near_miss_tokens_are_401(self, http: httpx.Client, proxy: ProxyServer, token: str) -> None:
        _error(http.get(f"{proxy.url}/admin/experiments", headers=_as(token)), 401, "invalid_admin_token")

    def test_every_change_is_audited_with_who_and_why(self, http: httpx.Client, proxy: ProxyServer) -> None:
        """The actor header is kept as printable text only: no newline can forge an audit line."""
        response = http.put(f"{proxy.url}/admin/experiments/{EXPERIMENT}/rollout",
                            headers=_as(ADMIN_TOKEN, **{"X-Abproxy-Actor": "bob"}),
                            json={"percent": 7, "reason": "canary for ticket OPS-12"})  # fmt: skip
        assert response.status_code == 200
        actor = "\xe5lice@example.com\tby: mallory".encode("latin-1")
        response = http.put(f"{proxy.url}/admin/experiments/{EXPERIMENT}/rollout", json={"percent": 8},
                            headers=[(b"Authorization", f"Bearer {ADMIN_TOKEN}".encode()),
                                     (b"X-Abproxy-Actor", actor)])  # fmt: skip
        assert response.status_code == 200
        entries = http.get(f"{proxy.url}/admin/experiments/{EXPERIMENT}/audit", headers=_as(ADMIN_TOKEN)).json()
        latest, previous = entries["entries"][:2]
        assert (previous["by"], previous["reason"], previous["to"]) == ("bob", "canary for ticket OPS-12", 7)
        assert (latest["by"], latest["reason"], latest["from"], latest["to"]) == (
            "lice@example.comby: mallory", None, 7, 8)


    def test_a_hostile_reason_is_shown_as_text_by_the_cli(self, http: httpx.Client, proxy: ProxyServer) -> None:
        """Rich markup and terminal escapes in an audited reason: the audit table prints them as text."""
        reason = "[/x] [bold]fake[/bold] \x1b[2J cleared"
        http.put(f"{proxy.url}/admin/experiments/{EXPERIMENT}/rollout", headers=_as(ADMIN_TOKEN),
                 json={"percent": 9, "reason": reason})  # fmt: skip
        done = subprocess.run([sys.executable, "-m", "proxy", "rollout", "audit", EXPERIMENT, "--limit", "1",
                               "--url", proxy.url, "--token", ADMIN_TOKEN],
                              capture_output=True, text=True, env={"COLUMNS": "200", "PATH": ""})  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "[/x] [bold]fake[/bold] \\x1b[2J cleared" in done.stdout
        assert "\x1b" not in done.stdout


class TestSecretsNeverLeak:
    def test_after_a_run_with_errors_no_secret_is_anywhere(
        self,
        http: httpx.Client,
        proxy: ProxyServer,
        redis_client: redis.Redis,
        upstreams: tuple[MockUpstream, MockUpstream],
        seen: list[httpx.Response],
    ) -> None:
        client_headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
        http.put(f"{proxy.url}/admin/experiments/{EXPERIMENT}/rollout", headers=_as(ADMIN_TOKEN),
                 json={"percent": 50, "reason": "leak check"})  # fmt: skip
        for i in range(30):  # both arms, successes and every kind of failure
            http.post(f"{proxy.url}{CHAT}", json=_chat(user=f"leak-{i}"), headers=client_headers)
            with http.stream("POST", f"{proxy.url}{CHAT}", json=_chat(user=f"leak-{i}", stream=True),
                             headers=client_headers) as response:  # fmt: skip
                response.read()
        for status in (401, 429, 500, 503):
            http.post(f"{proxy.url}{CHAT}", json=_chat(user="err", mock_status=status), headers=client_headers)
        http.post(f"{proxy.url}{CHAT}", content=b"{not json", headers=client_headers)
        http.post(f"{proxy.url}{CHAT}", json=_chat(), headers={"Authorization": f"Bearer {CLIENT_KEY}-wrong"})
        http.get(f"{proxy.url}/admin/experiments", headers=_as(ADMIN_TOKEN + "x"))
        http.put(f"{proxy.url}/admin/experiments/{EXPERIMENT}/rollout", headers=_as(ADMIN_TOKEN), json={"percent": 1e9})
        http.put(f"{proxy.url}/admin/experiments/{EXPERIMENT}/rollout", headers=_as(READ_TOKEN), json={"percent": 3})
        eventually(lambda: _check(redis_client.xlen("abproxy:events") >= 60))

        secrets = [*UPSTREAM_KEYS.values(), ADMIN_TOKEN, READ_TOKEN, CLIENT_KEY]
        places = {
            "stdout (events)": proxy.stdout_path.read_text(),
            "stderr (logs)": proxy.stderr_path.read_text(),
            "metrics": http.get(f"{proxy.url}/metrics").text,
            "responses": "\n".join(f"{r.headers}\n{r.text}" for r in seen if r.is_closed and r.url.port == proxy.port),
            "redis": _redis_dump(redis_client),
        }
        for place, text in places.items():
            assert text, f"{place} is empty: the check would prove nothing"
            for secret in secrets:
                assert secret not in text, f"a secret ({secret[:6]}...) appears in {place}"
            if place != "responses":  # prompts: not logged, not stored, not in metrics (store_prompts is off)
                assert PROMPT_MARKER not in text, f"the prompt appears in {place}"
        # Each upstream saw its own key and no other credential.
        for mock, own in zip(upstreams, UPSTREAM_KEYS.values(), strict=True):
            recorded = str(http.get(f"{mock.url}/mock/requests").json())
            assert own in recorded
            assert all(s not in recorded for s in secrets if s != own)


class TestAdminRateLimit:
    """Last in the module: it spends the read-only token's budget for the minute."""

    def test_past_the_limit_is_429_with_retry_after_and_the_admin_token_is_unaffected(
        self, http: httpx.Client, proxy: ProxyServer
    ) -> None:
        statuses = [http.get(f"{proxy.url}/admin/experiments", headers=_as(READ_TOKEN)).status_code
                    for _ in range(ADMIN_RATE + 5)]  # fmt: skip
        assert statuses.count(429) >= 5 and set(statuses) <= {200, 429}
        assert statuses.index(429) <= ADMIN_RATE and 200 not in statuses[statuses.index(429):]
        response = http.get(f"{proxy.url}/admin/experiments", headers=_as(READ_TOKEN))
        error = _error(response, 429, "admin_rate_limited")
        assert error["type"] == "rate_limit_error" and 1 <= int(response.headers["retry-after"]) <= 60
        # Budgets are per token: the admin token still works.
        assert http.get(f"{proxy.url}/admin/experiments", headers=_as(ADMIN_TOKEN)).status_code == 200

    def test_guessing_tokens_is_rate_limited_too(self, http: httpx.Client, proxy: ProxyServer) -> None:
        statuses = [http.get(f"{proxy.url}/admin/experiments", headers=_as(f"guess-{i}")).status_code
                    for i in range(ADMIN_RATE + 5)]  # fmt: skip
        assert set(statuses) == {401, 429} and statuses[-1] == 429


def _redis_dump(client: redis.Redis) -> str:
    """Every key and value in Redis, as text."""
    out = []
    for key in client.scan_iter():
        kind = client.type(key)
        if kind == b"stream":
            value: Any = client.xrange(key)
        elif kind == b"hash":
            value = client.hgetall(key)
        elif kind == b"string":
            value = client.get(key)
        elif kind == b"list":
            value = client.lrange(key, 0, -1)
        elif kind == b"zset":
            value = client.zrange(key, 0, -1, withscores=True)
        else:
            value = client.smembers(key)
        out.append(f"{key!r} {value!r}")
    return "\n".join(out)


def _check(condition: bool) -> None:
    assert condition
