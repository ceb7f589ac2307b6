"""End to end: the official openai client -> a real proxy process -> real mock upstream processes.

One proxy per module serves most tests (a restart costs seconds); each test resets the mocks,
sets the rollout it needs, and reads metrics as before/after deltas, so tests stay independent.
A second proxy, started once, routes extra experiments to a slow mock, an impatient upstream
(timeout_s 0.5) and a port nothing listens on, for the disconnect, timeout and 502 tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from proxy.assignment import bucket, choose_variant, threshold
from tests.harness import UPSTREAM_KEYS, MockUpstream, ProxyServer, RedisServer, eventually, proxy_config, wait_until

EXPERIMENT = "sales-companion"
SALT = "sales-v2"
BASE_MODEL = "gpt-4o-mini"
FT_MODEL = "ft:gpt-4o-mini:acme:sales-v2:abc123"
UPSTREAM_MODEL = {"control": BASE_MODEL, "treatment": FT_MODEL}
MOCK_TAG = {"control": "[base]", "treatment": "[finetuned]"}
PRICING = {"control": (0.15, 0.60), "treatment": (0.30, 1.20)}  # USD per 1M prompt / completion tokens
CLIENT_KEY = "sk-client-key-never-forwarded-7f3a"
ERROR_KEYS = {"message", "type", "param", "code"}
CHAT = "/v1/chat/completions"
CLOSE = {"Connection": "close"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_proxy(
    upstreams: tuple[MockUpstream, MockUpstream], redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyServer]:
    """The standard two-arm proxy, started once for the module on an emptied Redis."""
    _flush(redis_server)
    server = ProxyServer(proxy_config(*upstreams), tmp_path_factory.mktemp("gateway"), redis_server.url)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    """One client for the module's plain HTTP calls: building an httpx.Client costs ~30-70 ms."""
    with httpx.Client(timeout=10) as client:
        yield client


@pytest.fixture()
def proxy(http: httpx.Client, shared_proxy: ProxyServer, upstreams: tuple[MockUpstream, MockUpstream]) -> ProxyServer:
    """Overrides conftest's per-test proxy: the shared one, mocks reset, rollout back at 0 %."""
    for mock in upstreams:
        http.post(f"{mock.url}/mock/reset").raise_for_status()
    _set_percent(http, shared_proxy, 0)
    return shared_proxy


@pytest.fixture(scope="module")
def slow_mock(session_dir: Path) -> Iterator[MockUpstream]:
    mock = MockUpstream("slow", session_dir, api_key=UPSTREAM_KEYS["base"], tokens_per_s=20)
    mock.start()
    yield mock
    mock.stop()



@pytest.fixture(scope="module")
def faulty_proxy(
    upstreams: tuple[MockUpstream, MockUpstream],
    slow_mock: MockUpstream,
    closed_port: int,
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProxyServer]:
    """A proxy with three more experiments: `slow` (20 tok/s), `impatient` (timeout 0.5 s), `dead`."""
    base, finetuned = upstreams
    config = proxy_config(base, finetuned)
    config["upstreams"].update(
        {
            "up-slow": {"base_url": f"{slow_mock.url}/v1", "api_key_env": "BASE_KEY"},
            "up-impatient": {"base_url": f"{base.url}/v1", "api_key_env": "BASE_KEY", "timeout_s": 0.5},
            "up-dead": {"base_url": f"http://127.0.0.1:{closed_port}/v1", "api_key_env": "BASE_KEY"},
        }
    )
    for name in ("slow", "impatient", "dead"):
        config["models"][name] = {"upstream": f"up-{name}", "model": f"{name}-model"}
        config["experiments"][f"{name}-exp"] = {"aliases": [name], "control": name, "treatment": "finetuned"}
    server = ProxyServer(config, tmp_path_factory.mktemp("faulty"), redis_server.url)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sync_client(shared_proxy: ProxyServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{shared_proxy.url}/v1", api_key=CLIENT_KEY, max_retries=0) as c:
        yield c


@pytest.fixture()
def client(proxy: ProxyServer, sync_client: openai.OpenAI) -> openai.OpenAI:
    """The module's sync client, once `proxy` has reset the mocks and the rollout."""
    return sync_client


@pytest.fixture()
async def aclient(proxy: ProxyServer) -> Any:
    async with openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key=CLIENT_KEY, max_retries=0) as c:
        yield c


# -- helpers -------------------------------------------------------------------------------
def _flush(server: RedisServer) -> None:
    client = redis.Redis.from_url(server.url)
    client.flushall()
    client.close()


def _variant_of(user: str, percent: float) -> str:
    """The public formula, computed outside the proxy."""
    return choose_variant(bucket(SALT, user), threshold(percent))


def _user(variant: str, percent: float, prefix: str) -> str:
    """The first `prefix-N` user id the public formula puts in `variant` at `percent`."""
    return next(f"{prefix}-{i}" for i in range(10_000) if _variant_of(f"{prefix}-{i}", percent) == variant)


def _messages(text: str = "hello there") -> list[dict[str, str]]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


def _chat_body(user: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": EXPERIMENT, "messages": _messages(), **extra}
    if user is not None:
        body["user"] = user
    return body


def _set_percent(http: httpx.Client, proxy: ProxyServer, percent: float) -> None:
    """ProxyServer.set_percent, on the module's client."""
    headers = {"Authorization": f"Bearer {proxy.admin_token}"}
    response = http.put(
        f"{proxy.url}/admin/experiments/{EXPERIMENT}/rollout", json={"percent": percent}, headers=headers
    )
    response.raise_for_status()


def _stats(http: httpx.Client, mock: MockUpstream) -> dict[str, Any]:
    """MockUpstream.stats(), on the module's client."""
    stats: dict[str, Any] = http.get(f"{mock.url}/mock/stats").json()
    return stats


def _seen(http: httpx.Client, mock: MockUpstream) -> list[dict[str, Any]]:
    """MockUpstream.requests(): what the mock received (path, headers, body), oldest first."""
    seen: list[dict[str, Any]] = http.get(f"{mock.url}/mock/requests").json()
    return seen


def _samples(http: httpx.Client, proxy: ProxyServer) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(http.get(f"{proxy.url}/metrics").text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def _value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when none exists yet)."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= lbl)


def _delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return _value(after, name, **labels) - _value(before, name, **labels)



def _events(proxy: ProxyServer, request_ids: set[str], timeout: float = 3.0) -> dict[str, list[dict[str, Any]]]:
    """The proxy's events for these request ids, once every id has at least one."""
    found: dict[str, list[dict[str, Any]]] = {}

    def ready() -> bool:
        found.clear()
        try:
            events = proxy.events()
        except ValueError:  # a line caught mid-write
            return False
        for event in events:
            if event.get("request_id") in request_ids:
                found.setdefault(event["request_id"], []).append(event)
        return set(found) == request_ids

    wait_until(ready, timeout=timeout, what=f"events for {sorted(request_ids)}")
    return found


def _sse_payloads(text: str) -> list[Any]:
    """`data:` payloads of an SSE body, JSON-decoded; the final "[DONE]" kept as a string."""
    payloads: list[Any] = []
    for event in text.replace("\r\n", "\n").split("\n\n"):
        data = "\n".join(line[5:].lstrip() for line in event.split("\n") if line.startswith("data:"))
        if data:
            payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


def _proxy_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Assert an error the proxy itself made: status, OpenAI shape with exactly four keys, code."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == ERROR_KEYS
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert response.headers.get("x-request-id")
    error: dict[str, Any] = body["error"]
    return error


def _mock_embedding(mock_name: str, text: str) -> list[float]:
    """The mock's deterministic vector for `text`, so a test can tell which mock embedded it."""
    digest = hashlib.sha256(f"{mock_name}\x00{text}".encode()).digest()
    return [round(b / 127.5 - 1.0, 6) for b in digest[:8]]


def _cost(variant: str, prompt: int, completion: int) -> float:
    per_in, per_out = PRICING[variant]
    return (prompt * per_in + completion * per_out) / 1e6


# -- the endpoints, through the official client --------------------------------------------
class TestEndpoints:
    def test_chat_sync(self, client: openai.OpenAI) -> None:
        """Sync chat.completions.create gets the base mock's answer with usage."""
        completion = client.chat.completions.create(model=EXPERIMENT, messages=_messages(), user="ep-sync")
        assert completion.choices[0].message.content.startswith("[base] reply from model gpt-4o-mini")
        assert completion.model == BASE_MODEL
        assert completion.usage is not None and completion.usage.completion_tokens > 0

    async def test_chat_async(self, aclient: openai.AsyncOpenAI) -> None:
        """Async chat.completions.create gets the base mock's answer."""
        completion = await aclient.chat.completions.create(model=EXPERIMENT, messages=_messages(), user="ep-async")
        assert (completion.choices[0].message.content or "").startswith("[base] reply from model gpt-4o-mini")

    def test_completions_sync(self, client: openai.OpenAI) -> None:
        """Legacy completions.create works through the proxy."""
        completion = client.completions.create(model=EXPERIMENT, prompt="say hi", user="ep-sync")
        assert completion.choices[0].text.startswith("[base] reply from model gpt-4o-mini to 1 prompts")
        assert completion.usage is not None and completion.usage.prompt_tokens == 2

    async def test_completions_async(self, aclient: openai.AsyncOpenAI) -> None:
        """Async legacy completions.create works through the proxy."""
        completion = await aclient.completions.create(model=EXPERIMENT, prompt=["a b", "c"], user="ep-async")
        assert completion.choices[0].text.startswith("[base] reply from model gpt-4o-mini to 2 prompts")

    def test_embeddings_sync(self, client: openai.OpenAI) -> None:
        """Sync embeddings.create (base64 on the wire, decoded by the client) returns the base mock's vectors."""
        result = client.embeddings.create(model=EXPERIMENT, input=["one two", "three"], user="ep-sync")
        assert [d.embedding for d in result.data] == [
            pytest.approx(_mock_embedding("base", text), abs=1e-6) for text in ("one two", "three")
        ]
        assert result.usage.prompt_tokens == 3

    async def test_embeddings_async(self, aclient: openai.AsyncOpenAI) -> None:
        """Async embeddings.create with float encoding returns the base mock's vector."""
        result = await aclient.embeddings.create(model=EXPERIMENT, input="hello", encoding_format="float")
        assert result.data[0].embedding == pytest.approx(_mock_embedding("base", "hello"), abs=1e-6)

    def test_models_sync(self, client: openai.OpenAI) -> None:
        """GET /v1/models lists both aliases of the experiment."""
        assert {m.id for m in client.models.list()} == {"sales-companion", "gpt-4o-mini"}

    async def test_models_async(self, aclient: openai.AsyncOpenAI) -> None:
        """Async models.list lists both aliases."""
        assert {m.id async for m in aclient.models.list()} == {"sales-companion", "gpt-4o-mini"}

    def test_chat_stream_sync(self, client: openai.OpenAI) -> None:
        """A streamed chat arrives as several chunks that add up to the base mock's answer."""
        stream = client.chat.completions.create(model=EXPERIMENT, messages=_messages(), user="st", stream=True)
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(chunks) > 5
        assert text.startswith("[base] reply from model gpt-4o-mini to 2 messages")
        assert chunks[-1].choices[0].finish_reason == "stop"

    async def test_chat_stream_async(self, aclient: openai.AsyncOpenAI) -> None:
        """An async streamed chat adds up to the base mock's answer."""
        stream = await aclient.chat.completions.create(model=EXPERIMENT, messages=_messages(), stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text.startswith("[base] reply from model gpt-4o-mini")

    def test_completions_stream_sync(self, client: openai.OpenAI) -> None:
        """A streamed legacy completion adds up to the base mock's answer."""
        stream = client.completions.create(model=EXPERIMENT, prompt="say hi", stream=True)
        chunks = list(stream)
        assert len(chunks) > 5
        assert "".join(c.choices[0].text for c in chunks if c.choices).startswith("[base] reply from model")

    async def test_completions_stream_async(self, aclient: openai.AsyncOpenAI) -> None:
        """An async streamed legacy completion adds up to the base mock's answer."""
        stream = await aclient.completions.create(model=EXPERIMENT, prompt="say hi", stream=True)
        text = "".join([c.choices[0].text async for c in stream if c.choices])
        assert text.startswith("[base] reply from model gpt-4o-mini to 1 prompts")


# -- routing -------------------------------------------------------------------------------
class TestRouting:
    def test_zero_percent_sends_everyone_to_base(
        self,
        http: httpx.Client,
        proxy: ProxyServer,
        client: openai.OpenAI,
        upstreams: tuple[MockUpstream, MockUpstream],
    ) -> None:
        """At 0 % every user gets the base mock, variant control, with the experiment named."""
        for i in range(10):
            raw = client.chat.completions.with_raw_response.create(
                model=EXPERIMENT, messages=_messages(), user=f"zero-{i}"
            )
            assert (raw.parse().choices[0].message.content or "").startswith("[base]")
            assert raw.headers["x-abproxy-variant"] == "control"
            assert raw.headers["x-abproxy-experiment"] == EXPERIMENT
        assert _stats(http, upstreams[0])["requests"] == 10
        assert _stats(http, upstreams[1])["requests"] == 0

    def test_full_rollout_sends_everyone_to_finetuned(
        self,
        http: httpx.Client,
        proxy: ProxyServer,
        client: openai.OpenAI,
        upstreams: tuple[MockUpstream, MockUpstream],
    ) -> None:
        """At 100 % every user gets the fine-tuned mock, which receives the fine-tuned model id."""
        _set_percent(http, proxy, 100)
        for i in range(10):
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=_messages(), user=f"full-{i}"
            )
            assert (raw.parse().choices[0].message.content or "").startswith(f"[finetuned] reply from model {FT_MODEL}")
            assert raw.headers["x-abproxy-variant"] == "treatment"
            assert raw.headers["x-abproxy-experiment"] == EXPERIMENT
        assert _stats(http, upstreams[0])["requests"] == 0
        assert [r["body"]["model"] for r in _seen(http, upstreams[1])] == [FT_MODEL] * 10

    def test_body_forwarded_unchanged_but_model(
        self, http: httpx.Client, proxy: ProxyServer, upstreams: tuple[MockUpstream, MockUpstream]
    ) -> None:
        """The upstream receives the client's exact body, only `model` rewritten to the arm's id."""
        _set_percent(http, proxy, 100)
        sent = {
            "model": EXPERIMENT,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "temperature": 0.25,
            "max_tokens": 17,
            "metadata": {"team": "sales", "nested": {"k": [1, 2.5, None, True]}},
            "user": "body-user",
            "x_vendor_extension": {"keep": "me"},
            "unicode": "héllo ✓",
        }
        response = http.post(f"{proxy.url}{CHAT}", json=sent)
        assert response.status_code == 200
        (forwarded,) = _seen(http, upstreams[1])
        assert forwarded["path"] == CHAT
        assert forwarded["body"] == {**sent, "model": FT_MODEL}

    def test_client_body_forwarded_unchanged_but_model(
        self,
        http: httpx.Client,
        proxy: ProxyServer,
        client: openai.OpenAI,
        upstreams: tuple[MockUpstream, MockUpstream],
    ) -> None:
        """What the official client sends (typed and extra_body fields) reaches the upstream as sent but `model`."""
        _set_percent(http, proxy, 100)
        client.chat.completions.create(
            model=EXPERIMENT,
            messages=_messages("keep me"),
            temperature=0.3,
            metadata={"ticket": "T-1"},
            safety_identifier="sid-1",
            extra_body={"x_vendor_extension": [1, "two"]},
        )
        (forwarded,) = _seen(http, upstreams[1])
        assert forwarded["body"] == {
            "model": FT_MODEL,
            "messages": _messages("keep me"),
            "temperature": 0.3,
            "metadata": {"ticket": "T-1"},
            "safety_identifier": "sid-1",
            "x_vendor_extension": [1, "two"],
        }

    def test_streamed_body_only_gains_include_usage(
        self, http: httpx.Client, proxy: ProxyServer, upstreams: tuple[MockUpstream, MockUpstream]
    ) -> None:
        """A streamed request is forwarded unchanged but for `model` and stream_options.include_usage."""
        sent = {"model": EXPERIMENT, "prompt": "p", "stream": True, "seed": 7, "stop": ["\n"], "user": "s"}
        response = http.post(f"{proxy.url}/v1/completions", json=sent)
        assert response.status_code == 200
        (forwarded,) = _seen(http, upstreams[0])
        assert forwarded["body"] == {**sent, "model": BASE_MODEL, "stream_options": {"include_usage": True}}


# -- the split ------------------------------------------------------------------------------
async def _variants(proxy: ProxyServer, users: list[str], concurrency: int = 64) -> dict[str, str]:
    """One chat request per user; the variant each got, checked against who answered.

    aiohttp, not httpx: httpx's pool measured ~7x slower here (3,000 requests: 10 s vs 1.5 s).
    """
    limit = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(proxy.url, connector=connector) as session:

        async def one(user: str) -> tuple[str, str]:
            async with limit, session.post(CHAT, json=_chat_body(user)) as response:
                assert response.status == 200, await response.text()
                variant = response.headers["x-abproxy-variant"]
                body = await response.json()
            assert body["choices"][0]["message"]["content"].startswith(MOCK_TAG[variant])
            return user, variant

        return dict(await asyncio.gather(*(one(u) for u in users)))


class TestSplit:
    async def test_share_matches_public_formula(self, http: httpx.Client, proxy: ProxyServer) -> None:
        """At 30 %, 3,000 users split as the public bucket formula says, within 4.5 sigma of 30 %."""
        _set_percent(http, proxy, 30)
        users = [f"split-{uuid.uuid4().hex[:8]}-{i}" for i in range(3000)]
        got = await _variants(proxy, users)
        expected = {u: _variant_of(u, 30) for u in users}
        assert got == expected
        n = len(users)
        expected_share = sum(v == "treatment" for v in expected.values()) / n
        observed_share = sum(v == "treatment" for v in got.values()) / n
        assert abs(expected_share - 0.30) <= 4.5 * math.sqrt(0.30 * 0.70 / n)
        assert abs(observed_share - expected_share) <= 4.5 * math.sqrt(expected_share * (1 - expected_share) / n)

    async def test_same_user_same_variant(self, http: httpx.Client, proxy: ProxyServer) -> None:
        """Each user keeps its variant across repeated requests."""
        _set_percent(http, proxy, 50)
        users = [f"sticky-{i}" for i in range(40)]
        rounds = [await _variants(proxy, users) for _ in range(3)]
        assert rounds[0] == rounds[1] == rounds[2]
        assert set(rounds[0].values()) == {"control", "treatment"}

    async def test_raising_never_moves_treated_users_back(self, http: httpx.Client, proxy: ProxyServer) -> None:
        """10 % -> 50 %: nobody leaves treatment, and some control users join it."""
        users = [f"ramp-up-{i}" for i in range(400)]
        _set_percent(http, proxy, 10)
        low = await _variants(proxy, users)
        _set_percent(http, proxy, 50)
        high = await _variants(proxy, users)
        assert [u for u in users if low[u] == "treatment" and high[u] == "control"] == []
        assert any(low[u] == "treatment" for u in users)
        assert any(low[u] == "control" and high[u] == "treatment" for u in users)

    async def test_lowering_never_moves_control_users_in(self, http: httpx.Client, proxy: ProxyServer) -> None:
        """50 % -> 10 %: nobody joins treatment, and some treated users leave it."""
        users = [f"ramp-down-{i}" for i in range(400)]
        _set_percent(http, proxy, 50)
        high = await _variants(proxy, users)
        _set_percent(http, proxy, 10)
        low = await _variants(proxy, users)
        assert [u for u in users if high[u] == "control" and low[u] == "treatment"] == []
        assert any(high[u] == "treatment" and low[u] == "control" for u in users)


# -- whose id counts --------------------------------------------------------------------------
class TestUserId:
    def _send(
        self, http: httpx.Client, proxy: ProxyServer, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> httpx.Response:
        response = http.post(f"{proxy.url}{CHAT}", json=body, headers=headers)
        assert response.status_code == 200
        return response

    def _bucket_of(self, proxy: ProxyServer, response: httpx.Response) -> int | None:
        rid = response.headers["x-request-id"]
        (event,) = _events(proxy, {rid})[rid]
        value: int | None = event["bucket"]
        return value

    def test_header_beats_body_user_and_safety_identifier(self, http: httpx.Client, proxy: ProxyServer) -> None:
        """X-User-Id decides the bucket even when the body names other ids."""
        _set_percent(http, proxy, 50)
        header_user, body_user = _user("treatment", 50, "hdr"), _user("control", 50, "bdy")
        body = _chat_body(body_user, safety_identifier=_user("control", 50, "sid"))
        response = self._send(http, proxy, body, {"X-User-Id": header_user})
        assert response.headers["x-abproxy-variant"] == "treatment"
        assert self._bucket_of(proxy, response) == bucket(SALT, header_user)

    def test_body_user_beats_safety_identifier(self, http: httpx.Client, proxy: ProxyServer) -> None:
        """Without the header, body `user` decides over `safety_identifier`."""
        _set_percent(http, proxy, 50)
        body_user, safety_id = _user("treatment", 50, "bdy"), _user("control", 50, "sid")
        response = self._send(http, proxy, _chat_body(body_user, safety_identifier=safety_id))
        assert response.headers["x-abproxy-variant"] == "treatment"
        assert self._bucket_of(proxy, response) == bucket(SALT, body_user)

    def test_safety_identifier_used_alone(self, http: httpx.Client, proxy: ProxyServer) -> None:
        """`safety_identifier` is the id when nothing else names one."""
        _set_percent(http, proxy, 50)
        safety_id = _user("treatment", 50, "sid")
        response = self._send(http, proxy, _chat_body(safety_identifier=safety_id))
        assert response.headers["x-abproxy-variant"] == "treatment"
        assert self._bucket_of(proxy, response) == bucket(SALT, safety_id)

    def test_no_id_goes_to_control_and_is_counted(self, http: httpx.Client, proxy: ProxyServer) -> None:
        """With no id at all, even at 100 % the request goes to control and counts as unidentified."""
        _set_percent(http, proxy, 100)
        name = "abproxy_unidentified_requests_total"
        before = _samples(http, proxy)
        response = self._send(http, proxy, _chat_body(), {"X-User-Id": ""})
        assert response.headers["x-abproxy-variant"] == "control"
        assert response.json()["choices"][0]["message"]["content"].startswith("[base]")
        assert self._bucket_of(proxy, response) is None
        eventually(lambda: _check_delta(before, _samples(http, proxy), name, 1, experiment=EXPERIMENT))


def _check_delta(before: Samples, after: Samples, name: str, expected: float, **labels: str) -> None:
    assert _delta(before, after, name, **labels) == pytest.approx(expected, rel=1e-9, abs=1e-15), (name, labels)


# -- usage, cost, events ------------------------------------------------------------------------
class TestAccounting:
    def test_tokens_and_cost_per_variant(self, http: httpx.Client, proxy: ProxyServer, client: openai.OpenAI) -> None:
        """Token and cost counters per variant equal the responses' usage times the configured prices."""
        _set_percent(http, proxy, 50)
        before = _samples(http, proxy)
        sums = {v: [0, 0] for v in ("control", "treatment")}
        for variant in ("control", "treatment"):
            for i in range(3):
                user = _user(variant, 50, f"acct-{i}")
                chat = client.chat.completions.with_raw_response.create(
                    model=EXPERIMENT, messages=_messages("x " * (i + 1)), user=user
                )
                assert chat.headers["x-abproxy-variant"] == variant
                legacy = client.completions.create(model=EXPERIMENT, prompt="a b c " * (i + 1), user=user)
                emb = client.embeddings.create(model=EXPERIMENT, input="one two three four", user=user)
                for usage in (chat.parse().usage, legacy.usage):
                    assert usage is not None
                    sums[variant][0] += usage.prompt_tokens
                    sums[variant][1] += usage.completion_tokens
                sums[variant][0] += emb.usage.prompt_tokens

        def check() -> None:
            after = _samples(http, proxy)
            for variant, (prompt, completion) in sums.items():
                arm = {"experiment": EXPERIMENT, "variant": variant, "model": UPSTREAM_MODEL[variant]}
                _check_delta(before, after, "abproxy_tokens_total", prompt, kind="prompt", **arm)
                _check_delta(before, after, "abproxy_tokens_total", completion, kind="completion", **arm)
                _check_delta(before, after, "abproxy_cost_usd_total", _cost(variant, prompt, completion), **arm)
                for endpoint in ("chat.completions", "completions", "embeddings"):
                    _check_delta(
                        before, after, "abproxy_requests_total", 3, endpoint=endpoint, stream="false", code="200", **arm
                    )
                _check_delta(before, after, "abproxy_request_duration_seconds_count", 9, **arm)

        eventually(check)

    def test_streams_count_tokens_and_ttft(self, http: httpx.Client, proxy: ProxyServer, client: openai.OpenAI) -> None:
        """Streams count tokens from the usage chunk (asked for or not) and observe time to first token."""
        plain = client.chat.completions.create(model=EXPERIMENT, messages=_messages("count me"), user="st-u")
        legacy = client.completions.create(model=EXPERIMENT, prompt="count me too", user="st-u")
        assert plain.usage is not None and legacy.usage is not None
        before = _samples(http, proxy)
        list(client.chat.completions.create(model=EXPERIMENT, messages=_messages("count me"), user="st-u", stream=True))
        list(client.completions.create(model=EXPERIMENT, prompt="count me too", user="st-u", stream=True))
        prompt = plain.usage.prompt_tokens + legacy.usage.prompt_tokens
        completion = plain.usage.completion_tokens + legacy.usage.completion_tokens
        arm = {"experiment": EXPERIMENT, "variant": "control", "model": BASE_MODEL}

        def check() -> None:
            after = _samples(http, proxy)
            _check_delta(before, after, "abproxy_tokens_total", prompt, kind="prompt", **arm)
            _check_delta(before, after, "abproxy_tokens_total", completion, kind="completion", **arm)
            _check_delta(before, after, "abproxy_cost_usd_total", _cost("control", prompt, completion), **arm)
            for endpoint in ("chat.completions", "completions"):
                _check_delta(before, after, "abproxy_time_to_first_token_seconds_count", 1, endpoint=endpoint, **arm)
                _check_delta(before, after, "abproxy_requests_total", 1, endpoint=endpoint, stream="true", **arm)

        eventually(check)

    def test_one_event_per_request_without_prompt_or_user(
        self, http: httpx.Client, proxy: ProxyServer, client: openai.OpenAI
    ) -> None:
        """Each request writes one event with its ids, bucket, hashed user, tokens and cost; no prompt text."""
        _set_percent(http, proxy, 50)
        secret = f"SECRET-PROMPT-{uuid.uuid4().hex}"
        results = {}
        for variant in ("control", "treatment"):
            user = _user(variant, 50, f"evt-{uuid.uuid4().hex[:6]}")
            raw = client.chat.completions.with_raw_response.create(
                model=EXPERIMENT,
                messages=_messages(secret),
                user=user,
                extra_headers={"X-Episode-Id": f"episode-{variant}"},
            )
            results[raw.headers["x-request-id"]] = (variant, user, raw.parse().usage)
        stream = client.chat.completions.with_raw_response.create(
            model=EXPERIMENT, messages=_messages(secret), user="evt-stream", stream=True
        )
        list(stream.parse())
        events = _events(proxy, {*results, stream.headers["x-request-id"]})
        for rid, (variant, user, usage) in results.items():
            assert usage is not None
            (event,) = events[rid]
            assert event["experiment"] == EXPERIMENT
            assert event["variant"] == variant
            assert event["bucket"] == bucket(SALT, user)
            assert event["user_hash"] and event["user_hash"] != user
            assert user not in json.dumps(event)
            assert event["episode_id"] == f"episode-{variant}"
            assert event["status"] == 200
            assert (event["prompt_tokens"], event["completion_tokens"]) == (
                usage.prompt_tokens,
                usage.completion_tokens,
            )
            assert event["cost_usd"] == pytest.approx(_cost(variant, usage.prompt_tokens, usage.completion_tokens))
            assert event["latency_ms"] > 0
        (streamed,) = events[stream.headers["x-request-id"]]
        assert streamed["stream"] is True and streamed["ttft_ms"] > 0 and streamed["completion_tokens"] > 0
        assert streamed["episode_id"] is None
        logs = proxy.stdout_path.read_text() + proxy.stderr_path.read_text()
        assert secret not in logs
        assert [user for _, user, _ in results.values() if user in logs] == []


# -- stream_options.include_usage ------------------------------------------------------------------
class TestIncludeUsage:
    def test_hidden_when_not_asked_but_still_counted(
        self,
        http: httpx.Client,
        proxy: ProxyServer,
        client: openai.OpenAI,
        upstreams: tuple[MockUpstream, MockUpstream],
    ) -> None:
        """Without stream_options the client sees no usage, the upstream was asked for it, tokens count."""
        plain = client.chat.completions.create(model=EXPERIMENT, messages=_messages("usage?"), user="iu")
        assert plain.usage is not None
        before = _samples(http, proxy)
        raw = http.post(f"{proxy.url}{CHAT}", json=_chat_body("iu", messages=_messages("usage?"), stream=True))
        assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
        payloads = _sse_payloads(raw.text)
        assert payloads[-1] == "[DONE]"
        chunks = payloads[:-1]
        assert chunks and all(isinstance(c, dict) for c in chunks)
        assert [c for c in chunks if c.get("usage") is not None or c.get("choices") == []] == []
        via_client = list(client.chat.completions.create(model=EXPERIMENT, messages=_messages("usage?"), stream=True))
        assert via_client and all(c.usage is None for c in via_client)
        forwarded = [r["body"] for r in _seen(http, upstreams[0]) if r["body"].get("stream")]
        assert len(forwarded) == 2
        assert all(b["stream_options"] == {"include_usage": True} for b in forwarded)
        arm = {"experiment": EXPERIMENT, "variant": "control", "model": BASE_MODEL}
        eventually(
            lambda: _check_delta(
                before,
                _samples(http, proxy),
                "abproxy_tokens_total",
                2 * plain.usage.completion_tokens,
                kind="completion",
                **arm,
            )
        )

    def test_hidden_when_client_says_false(
        self, http: httpx.Client, proxy: ProxyServer, upstreams: tuple[MockUpstream, MockUpstream]
    ) -> None:
        """stream_options.include_usage false: the upstream is asked anyway, the client sees no usage."""
        body = _chat_body("iu-false", stream=True, stream_options={"include_usage": False})
        raw = http.post(f"{proxy.url}{CHAT}", json=body)
        assert [c for c in _sse_payloads(raw.text)[:-1] if c.get("usage") is not None] == []
        assert _seen(http, upstreams[0])[-1]["body"]["stream_options"] == {"include_usage": True}

    def test_legacy_completions_hidden_when_not_asked(self, http: httpx.Client, proxy: ProxyServer) -> None:
        """Streamed legacy completions also drop the usage-only chunk the client did not ask for."""
        raw = http.post(f"{proxy.url}/v1/completions", json={"model": EXPERIMENT, "prompt": "p", "stream": True})
        chunks = _sse_payloads(raw.text)[:-1]
        assert chunks and [c for c in chunks if c.get("usage") is not None or c.get("choices") == []] == []

    def test_shown_when_asked(self, proxy: ProxyServer, client: openai.OpenAI) -> None:
        """With include_usage the client's last chunk carries the usage, equal to the unstreamed one."""
        plain = client.chat.completions.create(model=EXPERIMENT, messages=_messages("usage!"), user="iu2")
        chunks = list(
            client.chat.completions.create(
                model=EXPERIMENT,
                messages=_messages("usage!"),
                user="iu2",
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert chunks[-1].choices == []
        assert chunks[-1].usage == plain.usage
        assert all(c.usage is None for c in chunks[:-1])


# -- disconnects ---------------------------------------------------------------------------------
class TestDisconnect:
    def test_client_disconnect_cancels_upstream(
        self, http: httpx.Client, faulty_proxy: ProxyServer, slow_mock: MockUpstream
    ) -> None:
        """Closing a stream after its first chunk cancels the upstream stream within ~2 s."""
        http.post(f"{slow_mock.url}/mock/reset")
        before = _samples(http, faulty_proxy)
        # 16 letters: the mock's reply is then its longest (24 words, ~1.2 s at 20 tok/s).
        body = {"model": "slow", "messages": _messages("abcdefghijklmnop"), "stream": True, "user": "quitter"}
        with httpx.Client(base_url=faulty_proxy.url, timeout=10) as own:  # its own connection, to drop
            with own.stream("POST", CHAT, json=body) as response:
                assert response.status_code == 200
                first = next(response.iter_raw())
                assert first.startswith(b"data: ")
            closed_at = time.monotonic()
        wait_until(lambda: _stats(http, slow_mock)["streams_cancelled"] == 1, timeout=2, what="upstream cancel")
        assert time.monotonic() - closed_at < 2
        assert _stats(http, slow_mock)["streams_completed"] == 0
        arm = {"experiment": "slow-exp", "variant": "control", "model": "slow-model"}
        eventually(
            lambda: _check_delta(
                before, _samples(http, faulty_proxy), "abproxy_upstream_errors_total", 1, reason="cancelled", **arm
            )
        )
        # The relay's task ended (its cancellation by the watcher did not escape) and left nothing
        # running: the in-flight slot is free and the process's tasks are back to their count before.
        after = _samples(http, faulty_proxy)
        assert _value(after, "abproxy_in_flight_requests", **arm) == 0
        eventually(lambda: _check_delta(before, _samples(http, faulty_proxy), "abproxy_asyncio_tasks", 0))


# -- errors -------------------------------------------------------------------------------------
class TestErrors:
    def test_upstream_429_is_a_rate_limit_error(self, client: openai.OpenAI) -> None:
        """An upstream 429 reaches the client as openai.RateLimitError with the mock's message."""
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(
                model=EXPERIMENT, messages=_messages(), user="rl", extra_body={"mock_status": 429}
            )
        assert caught.value.status_code == 429
        assert caught.value.code == "mock_429"
        assert "mock error 429" in caught.value.message
        assert caught.value.response.headers["x-abproxy-variant"] == "control"

    def test_upstream_5xx_passes_through_unchanged(self, http: httpx.Client, proxy: ProxyServer) -> None:
        """An upstream 503 keeps its status and its exact body."""
        response = http.post(f"{proxy.url}{CHAT}", json=_chat_body("e5", mock_status=503))
        assert response.status_code == 503
        assert response.json() == {
            "error": {"message": "mock error 503", "type": "mock_error", "param": None, "code": "mock_503"}
        }
        assert response.headers["x-request-id"]

    def test_upstream_timeout_is_504(self, http: httpx.Client, faulty_proxy: ProxyServer) -> None:
        """An upstream slower than its timeout_s (0.5 s) becomes a 504 upstream_timeout, promptly."""
        before = _samples(http, faulty_proxy)
        started = time.monotonic()
        response = http.post(
            f"{faulty_proxy.url}{CHAT}",
            json={**_chat_body("slowpoke"), "model": "impatient", "mock_latency_ms": 2000},
            timeout=10,
        )
        assert time.monotonic() - started < 1.8
        _proxy_error(response, 504, "upstream_timeout")
        assert response.headers["x-abproxy-experiment"] == "impatient-exp"
        arm = {"experiment": "impatient-exp", "variant": "control"}
        eventually(
            lambda: _check_delta(
                before, _samples(http, faulty_proxy), "abproxy_upstream_errors_total", 1, reason="timeout", **arm
            )
        )

    def test_unreachable_upstream_is_502(self, http: httpx.Client, faulty_proxy: ProxyServer) -> None:
        """A refused connection becomes a 502 upstream_unreachable, also through the client."""
        response = http.post(f"{faulty_proxy.url}{CHAT}", json={**_chat_body("u"), "model": "dead"})
        error = _proxy_error(response, 502, "upstream_unreachable")
        assert error["type"] == "upstream_error"
        with openai.OpenAI(base_url=f"{faulty_proxy.url}/v1", api_key=CLIENT_KEY, max_retries=0) as c:
            with pytest.raises(openai.InternalServerError) as caught:
                c.chat.completions.create(model="dead", messages=_messages())
        assert caught.value.status_code == 502
        assert caught.value.code == "upstream_unreachable"

    @pytest.mark.parametrize(
        ("raw", "code"),
        [
            (b'{"model": "sales-companion", "messages": [', "invalid_json"),
            (b"", "invalid_json"),
            (b'[{"model": "sales-companion"}]', "invalid_body"),
            (b'"sales-companion"', "invalid_body"),
            (b"null", "invalid_body"),
            (b'{"messages": [{"role": "user", "content": "hi"}]}', "missing_model"),
            (b'{"model": 42, "messages": []}', "missing_model"),
            (b'{"model": "", "messages": []}', "missing_model"),
        ],
    )
    def test_bad_body_is_400_and_not_forwarded(
        self,
        http: httpx.Client,
        proxy: ProxyServer,
        upstreams: tuple[MockUpstream, MockUpstream],
        raw: bytes,
        code: str,
    ) -> None:
        """Malformed JSON, a non-object body or a missing model: 400 in OpenAI shape, nothing forwarded."""
        for path in (CHAT, "/v1/completions", "/v1/embeddings"):
            response = http.post(f"{proxy.url}{path}", content=raw, headers={"Content-Type": "application/json"})
            error = _proxy_error(response, 400, code)
            assert error["type"] == "invalid_request_error"
        assert [_stats(http, m)["requests"] for m in upstreams] == [0, 0]

    def test_unknown_model_is_404(
        self, http: httpx.Client, client: openai.OpenAI, upstreams: tuple[MockUpstream, MockUpstream]
    ) -> None:
        """A model no experiment routes is openai.NotFoundError, code model_not_found, nothing forwarded."""
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model="gpt-5-turbo", messages=_messages())
        assert caught.value.code == "model_not_found"
        assert caught.value.param == "model"
        response = http.post(str(client.base_url) + "embeddings", json={"model": "nope", "input": "x"})
        _proxy_error(response, 404, "model_not_found")
        assert [_stats(http, m)["requests"] for m in upstreams] == [0, 0]

    def test_unknown_route_and_wrong_method(self, http: httpx.Client, proxy: ProxyServer) -> None:
        """An unknown /v1 path is 404 and GET on a POST endpoint 400, both in OpenAI shape."""
        _proxy_error(http.post(f"{proxy.url}/v1/responses", json={"model": EXPERIMENT}), 404, "unknown_url")
        _proxy_error(http.get(f"{proxy.url}{CHAT}"), 400, "method_not_allowed")


# -- headers and secrets ----------------------------------------------------------------------------
class TestHeaders:
    def test_request_id_on_every_response(self, http: httpx.Client, proxy: ProxyServer, client: openai.OpenAI) -> None:
        """Successes, streams and errors all carry x-request-id; routed answers name experiment and variant."""
        url = f"{proxy.url}{CHAT}"
        routed = [
            http.post(url, json=_chat_body("h")),
            http.post(url, json=_chat_body("h", stream=True)),
            http.post(url, json=_chat_body("h", mock_status=429)),
            http.post(f"{proxy.url}/v1/embeddings", json={"model": EXPERIMENT, "input": "x"}),
        ]
        unrouted = [
            http.get(f"{proxy.url}/v1/models"),
            http.post(url, content=b"{"),
            http.post(url, json={"model": "nope"}),
        ]
        ids = [r.headers["x-request-id"] for r in routed + unrouted]
        assert len(set(ids)) == len(ids) and all(ids)
        for response in routed:
            assert response.headers["x-abproxy-experiment"] == EXPERIMENT
            assert response.headers["x-abproxy-variant"] == "control"

    @pytest.mark.parametrize("header", ["X-Client-Request-Id", "X-Request-Id"])
    def test_client_request_id_is_recorded_not_used(self, http: httpx.Client, proxy: ProxyServer, header: str) -> None:
        """The id of record is the proxy's own (feedback checks it); the client's id is kept for tracing."""
        rid = f"client-{uuid.uuid4().hex}"
        response = http.post(f"{proxy.url}{CHAT}", json=_chat_body("r"), headers={header: rid})
        own = response.headers["x-request-id"]
        assert own != rid and len(own) == 40
        (event,) = _events(proxy, {own})[own]
        assert event["status"] == 200 and event["client_request_id"] == rid

    def test_client_key_replaced_by_upstream_key(
        self,
        http: httpx.Client,
        proxy: ProxyServer,
        client: openai.OpenAI,
        upstreams: tuple[MockUpstream, MockUpstream],
    ) -> None:
        """Each upstream sees its own key, never the client's Authorization."""
        client.chat.completions.create(model=EXPERIMENT, messages=_messages(), user="k1")
        _set_percent(http, proxy, 100)
        client.chat.completions.create(model=EXPERIMENT, messages=_messages(), user="k1")
        for mock, key in zip(upstreams, (UPSTREAM_KEYS["base"], UPSTREAM_KEYS["finetuned"]), strict=True):
            (seen,) = _seen(http, mock)
            assert seen["headers"]["authorization"] == f"Bearer {key}"
            assert CLIENT_KEY not in json.dumps(seen)

    def test_upstream_keys_never_leak(self, http: httpx.Client, proxy: ProxyServer, client: openai.OpenAI) -> None:
        """No response body or header, and no proxy log line, contains an upstream key or the client key."""
        url = f"{proxy.url}{CHAT}"
        auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
        responses = [
            http.post(url, json=_chat_body("leak"), headers=auth),
            http.post(url, json=_chat_body("leak", stream=True), headers=auth),
            http.post(url, json=_chat_body("leak", mock_status=401), headers=auth),
            http.post(url, json=_chat_body("leak", mock_status=500), headers=auth),
            http.post(url, json={"model": "nope"}, headers=auth),
            http.get(f"{proxy.url}/v1/models", headers=auth),
            http.get(f"{proxy.url}/metrics"),
        ]
        secrets = [*UPSTREAM_KEYS.values(), CLIENT_KEY]
        for response in responses:
            exposed = response.text + json.dumps(list(response.headers.multi_items()))
            assert not [s for s in secrets if s in exposed], response.request.url
        time.sleep(0.2)  # the event buffer flushes every 100 ms
        logs = proxy.stdout_path.read_text() + proxy.stderr_path.read_text()
        assert not [s for s in secrets if s in logs]

    def test_hop_by_hop_and_credential_headers_not_forwarded(
        self, http: httpx.Client, proxy: ProxyServer, upstreams: tuple[MockUpstream, MockUpstream]
    ) -> None:
        """Connection and the headers it names, Keep-Alive, TE, Proxy-Authorization and credentials stay behind."""
        headers = {
            "Connection": "keep-alive, X-Foo",
            "X-Foo": "hop",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
            "Api-Key": "azure-style-key",
            "X-Api-Key": "anthropic-style-key",
            "Cookie": "session=abc",
            "X-End-To-End": "kept",
        }
        response = http.post(f"{proxy.url}{CHAT}", json=_chat_body("hop"), headers=headers)
        assert response.status_code == 200
        (seen,) = _seen(http, upstreams[0])
        forwarded = seen["headers"]
        assert forwarded["x-end-to-end"] == "kept"
        dropped = {"x-foo", "keep-alive", "te", "proxy-authorization", "api-key", "x-api-key", "cookie"}
        assert dropped & set(forwarded) == set()
        assert "X-Foo" not in forwarded.get("connection", "")


# -- several worker processes ----------------------------------------------------------------------
class TestWorkers:
    def test_two_workers_serve_and_follow_the_rollout(
        self,
        http: httpx.Client,
        proxy: ProxyServer,
        upstreams: tuple[MockUpstream, MockUpstream],
        redis_server: RedisServer,
        tmp_path: Path,
    ) -> None:
        """A proxy with workers=2 runs two workers; both serve and follow a rollout change."""
        server = ProxyServer(proxy_config(*upstreams), tmp_path, redis_server.url, workers=2)
        server.start()
        try:
            # Each worker logs its start on stderr, as JSON; stdout carries only events.
            wait_until(lambda: server.stderr_path.read_text().count('"proxy_started"') == 2, what="two workers")
            url = f"{server.url}{CHAT}"
            for i in range(8):
                assert (
                    http.post(url, json=_chat_body(f"w-{i}"), headers=CLOSE).headers["x-abproxy-variant"] == "control"
                )
            _set_percent(http, server, 100)

            def all_treated() -> bool:
                # A new connection per request, so the kernel spreads them over both workers.
                return all(
                    http.post(url, json=_chat_body(f"w-{i}"), headers=CLOSE).headers["x-abproxy-variant"] == "treatment"
                    for i in range(16)
                )

            wait_until(all_treated, timeout=3, what="both workers at 100 %")
            time.sleep(0.2)  # the event buffers flush every 100 ms
            stdout = server.stdout_path.read_text().splitlines()
            assert stdout and all(json.loads(line)["experiment"] == EXPERIMENT for line in stdout)
        finally:
            server.stop()
        assert not server.alive
