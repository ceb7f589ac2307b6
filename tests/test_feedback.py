"""POST /v1/feedback against a real proxy process and a real Redis: what is accepted lands on the
event stream, everything else is a 4xx in OpenAI's error shape and lands nowhere."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis

from proxy.event_stream import decode_entry
from proxy.ids import RequestIds, RequestIdStatus, UserHasher
from tests.harness import SIGNING_KEY, MockUpstream, ProxyServer, RedisServer, outcomes_config, wait_until

EXPERIMENT = "sales-companion"
STREAM = "abproxy:events"


@pytest.fixture(scope="module")
def proxy(
    upstreams: tuple[MockUpstream, MockUpstream], redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyServer]:
    server = ProxyServer(outcomes_config(*upstreams), tmp_path_factory.mktemp("feedback"), redis_server.url)
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def client(proxy: ProxyServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="sk-client", max_retries=0)


@pytest.fixture()
def stream(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """The shared Redis with the event stream emptied: each test sees only its own entries."""
    client = redis.Redis.from_url(redis_server.url)
    client.delete(STREAM)
    yield client
    client.close()


def _feedback_entries(stream: redis.Redis) -> list[dict[str, Any]]:
    entries = stream.xrange(STREAM)
    events = [decode_entry(eid, fields).event for eid, fields in entries]  # type: ignore[union-attr]
    return [e for e in events if e.get("kind") == "feedback"]


def _ask(client: openai.OpenAI, user: str = "u-1") -> str:
    completion = client.chat.completions.create(
        model=EXPERIMENT, messages=[{"role": "user", "content": "hi"}], user=user
    )
    request_id = completion._request_id  # the proxy's x-request-id, as the openai client exposes it
    assert request_id is not None
    return request_id


class TestAccepted:
    def test_two_line_integration_with_the_openai_client(self, client: openai.OpenAI, stream: redis.Redis) -> None:
        """The README's integration: the completion's request id, posted back through the same client."""
        completion = client.chat.completions.create(
            model=EXPERIMENT, messages=[{"role": "user", "content": "hi"}], user="u-1"
        )
        reply = client.post(
            "/feedback",
            body={"request_id": completion._request_id, "metric": "task_completed", "value": True},
            cast_to=httpx.Response,
        )
        assert reply.status_code == 202
        body = reply.json()
        assert body["object"] == "feedback" and body["status"] == "accepted" and body["id"].startswith("fb_")
        (event,) = _feedback_entries(stream)
        assert event["request_id"] == completion._request_id
        assert event["metric"] == "task_completed" and event["value"] == 1.0 and event["level"] == "request"
        assert event["schema_version"] == 1 and event["feedback_id"] == body["id"]

    def test_counted_per_metric(self, client: openai.OpenAI, proxy: ProxyServer, stream: redis.Redis) -> None:
        def accepted() -> float:
            for line in proxy.metrics_text().splitlines():
                if line.startswith('abproxy_feedback_total{metric="escalated"}'):
                    return float(line.split()[-1])
            return 0.0

        before = accepted()
        request_id = _ask(client)
        httpx.post(f"{proxy.url}/v1/feedback", json={"request_id": request_id, "metric": "escalated", "value": False})
        httpx.post(f"{proxy.url}/v1/feedback", json={"request_id": request_id, "metric": "escalated", "value": 3})
        assert accepted() == before + 1  # the refused one is not counted here

    def test_float_metric_and_episode(self, client: openai.OpenAI, proxy: ProxyServer, stream: redis.Redis) -> None:
        request_id = _ask(client)
        reply = httpx.post(
            f"{proxy.url}/v1/feedback",
            json={"request_id": request_id, "metric": "csat", "value": 4, "episode_id": "conv-9"},
        )
        assert reply.status_code == 202, reply.text
        (event,) = _feedback_entries(stream)
        assert event["value"] == 4.0 and event["episode_id"] == "conv-9"

    def test_user_level_metric_is_hashed(self, proxy: ProxyServer, stream: redis.Redis) -> None:
        reply = httpx.post(
            f"{proxy.url}/v1/feedback",
            json={"user_id": "alice@example.com", "metric": "returned", "value": False, "experiment": EXPERIMENT},
        )
        assert reply.status_code == 202, reply.text
        (event,) = _feedback_entries(stream)
        assert event["level"] == "user" and event["request_id"] is None and event["experiment"] == EXPERIMENT
        assert event["user_hash"] == UserHasher("")("alice@example.com")  # the tests set no user-hash key
        assert b"alice" not in orjson.dumps(event)

    def test_streamed_request_id_is_accepted(self, client: openai.OpenAI, proxy: ProxyServer) -> None:
        with client.chat.completions.create(
            model=EXPERIMENT, messages=[{"role": "user", "content": "hi"}], user="u-2", stream=True
        ) as chunks:
            request_id = chunks.response.headers["x-request-id"]
            for _ in chunks:
                pass
        reply = httpx.post(f"{proxy.url}/v1/feedback", json={"request_id": request_id, "metric": "escalated",
                                                                "value": True})
        assert reply.status_code == 202, reply.text


def _bad(proxy: ProxyServer, body: Any, *, raw: bytes | None = None) -> httpx.Response:
    if raw is not None:
        return httpx.post(f"{proxy.url}/v1/feedback", content=raw, headers={"content-type": "application/json"})
    return httpx.post(f"{proxy.url}/v1/feedback", json=body)


class TestRefused:
    """Each bad submission: a 4xx with OpenAI's error shape naming the problem, and nothing stored."""

    @pytest.mark.parametrize(
        ("body", "status", "code", "param"),
        [
            ({"request_id": "R", "metric": "nps", "value": 9}, 400, "unknown_metric", "metric"),
            ({"request_id": "R", "metric": "task_completed", "value": 1}, 400, "invalid_type", "value"),
            ({"request_id": "R", "metric": "task_completed", "value": "yes"}, 400, "invalid_type", "value"),
            ({"request_id": "R", "metric": "csat", "value": True}, 400, "invalid_type", "value"),
            ({"request_id": "R", "metric": "csat", "value": "4"}, 400, "invalid_type", "value"),
            ({"request_id": "R", "metric": "csat", "value": 6}, 400, "value_out_of_range", "value"),
            ({"request_id": "R", "metric": "csat", "value": 0.5}, 400, "value_out_of_range", "value"),
            ({"metric": "csat", "value": 4}, 400, "missing_request_id", "request_id"),
            ({"user_id": "u", "metric": "csat", "value": 4}, 400, "wrong_level", "user_id"),
            ({"request_id": "R", "metric": "returned", "value": True}, 400, "wrong_level", "request_id"),
            ({"metric": "returned", "value": True}, 400, "missing_user_id", "user_id"),
            ({"user_id": "u", "metric": "returned", "value": True, "experiment": "nope"}, 400, "unknown_experiment",
             "experiment"),
            ({"request_id": "R", "metric": "csat", "value": 4, "rating": 5}, 400, "invalid_value", "rating"),
            ({"request_id": "R", "value": 4}, 400, "invalid_value", "metric"),
            ({"request_id": 12, "metric": "csat", "value": 4}, 400, "invalid_value", "request_id"),
            ([1, 2], 400, "invalid_body", None),
            ({"request_id": "0" * 40, "metric": "csat", "value": 4}, 404, "request_not_found", "request_id"),
            ({"request_id": "not-an-id", "metric": "csat", "value": 4}, 404, "request_not_found", "request_id"),
        ],
    )
    def test_invalid(
        self, client: openai.OpenAI, proxy: ProxyServer, stream: redis.Redis,
        body: Any, status: int, code: str, param: str | None,
    ) -> None:
        if isinstance(body, dict) and body.get("request_id") == "R":
            body = {**body, "request_id": _ask(client)}
        reply = _bad(proxy, body)
        assert reply.status_code == status, reply.text
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == code and error["param"] == param and error["message"]
        assert _feedback_entries(stream) == []

    def test_not_json_and_too_large(self, proxy: ProxyServer, stream: redis.Redis) -> None:
        assert _bad(proxy, None, raw=b"{nope").json()["error"]["code"] == "invalid_json"
        big = orjson.dumps({"user_id": "u" * 20_000, "metric": "returned", "value": True})
        assert _bad(proxy, None, raw=big).json()["error"]["code"] == "body_too_large"
        assert _feedback_entries(stream) == []

    def test_expired_request_id(self, proxy: ProxyServer, stream: redis.Redis) -> None:
        """An id this deployment issued eight days ago: past the default seven-day window."""
        old = RequestIds(SIGNING_KEY).issue(time.time() - 8 * 24 * 3600)
        reply = _bad(proxy, {"request_id": old, "metric": "csat", "value": 4})
        assert reply.status_code == 410
        assert reply.json()["error"]["code"] == "request_expired"
        assert _feedback_entries(stream) == []

    def test_id_signed_with_another_key_is_unknown(self, proxy: ProxyServer, stream: redis.Redis) -> None:
        forged = RequestIds("another deployment").issue(time.time())
        assert _bad(proxy, {"request_id": forged, "metric": "csat", "value": 4}).status_code == 404
        assert _feedback_entries(stream) == []

    def test_get_is_not_feedback(self, proxy: ProxyServer) -> None:
        reply = httpx.get(f"{proxy.url}/v1/feedback")
        assert reply.status_code == 404 and reply.json()["error"]["code"] == "unknown_url"


class TestWithoutRedis:
    def test_redis_down_is_503_and_retryable(
        self, upstreams: tuple[MockUpstream, MockUpstream], closed_port: int, tmp_path: Path
    ) -> None:
        """Nothing stored and the app told so: a 503 it may retry (feedback is idempotent)."""
        server = ProxyServer(outcomes_config(*upstreams), tmp_path, f"redis://127.0.0.1:{closed_port}/0")
        server.start(wait_ready=False)
        try:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk", max_retries=0)
            request_id = _ask(client)  # the chat path does not need Redis
            reply = httpx.post(f"{server.url}/v1/feedback", json={"request_id": request_id, "metric": "csat",
                                                                  "value": 4})
            assert reply.status_code == 503
            assert reply.json()["error"]["code"] == "feedback_unavailable"
        finally:
            server.stop()


class TestFeedbackOff:
    def test_no_metrics_declared(self, module_proxy: ProxyServer) -> None:
        reply = httpx.post(f"{module_proxy.url}/v1/feedback", json={"request_id": "x", "metric": "csat", "value": 4})
        assert reply.status_code == 404 and reply.json()["error"]["code"] == "feedback_disabled"


class TestRequestIds:
    def test_issued_ids_check_and_are_unique(self) -> None:
        ids = RequestIds("k")
        now = time.time()
        issued = {ids.issue(now) for _ in range(10_000)}
        assert len(issued) == 10_000
        assert all(ids.check(i, now, 60) is RequestIdStatus.VALID for i in list(issued)[:100])

    @pytest.mark.parametrize(
        ("mutate", "status"),
        [
            (lambda i: i[:-1] + ("0" if i[-1] != "0" else "1"), RequestIdStatus.UNKNOWN),  # tag altered
            (lambda i: ("f" if i[0] != "f" else "e") + i[1:], RequestIdStatus.UNKNOWN),  # time altered
            (lambda i: i[:30], RequestIdStatus.UNKNOWN),
            (lambda i: i[:-1] + "g", RequestIdStatus.UNKNOWN),  # not hex
        ],
    )
    def test_tampering(self, mutate: Any, status: RequestIdStatus) -> None:
        ids = RequestIds("k")
        now = time.time()
        assert ids.check(mutate(ids.issue(now)), now, 60) is status

    def test_age(self) -> None:
        ids = RequestIds("k")
        now = time.time()
        assert ids.check(ids.issue(now - 59), now, 60) is RequestIdStatus.VALID
        assert ids.check(ids.issue(now - 61), now, 60) is RequestIdStatus.EXPIRED
        assert ids.check(ids.issue(now + 3600), now, 60) is RequestIdStatus.UNKNOWN  # from the future


class TestRequestEventFields:
    """What the request event now carries for the analysis: the percent in force and a prompt fingerprint."""

    def test_prompt_hash_and_rollout_percent(
        self, client: openai.OpenAI, proxy: ProxyServer, stream: redis.Redis
    ) -> None:
        proxy.set_percent(25)
        try:
            asked = [_ask(client, "u-7"), _ask(client, "u-7"), _ask(client, "u-8")]
            other = client.chat.completions.create(
                model=EXPERIMENT, messages=[{"role": "user", "content": "something else"}], user="u-7"
            )._request_id
            anonymous = client.chat.completions.create(
                model=EXPERIMENT, messages=[{"role": "user", "content": "hi"}]
            )._request_id
        finally:
            proxy.set_percent(0)  # the Redis is shared with later modules
        wanted = {*asked, other, anonymous}
        wait_until(lambda: wanted <= {e.get("request_id") for e in proxy.events()}, what="events")
        by_id = {e["request_id"]: e for e in proxy.events() if e.get("request_id") in wanted}
        first, again, third = (by_id[i]["prompt_hash"] for i in asked)
        assert first == again == third and len(first) == 16  # same prompt, same fingerprint (any user)
        assert by_id[other]["prompt_hash"] != first
        assert by_id[anonymous]["prompt_hash"] is None  # regeneration is per user: no user, no fingerprint
        assert {by_id[i]["rollout_percent"] for i in wanted} == {25.0}
        assert "prompt" not in by_id[other] and "completion" not in by_id[other]  # not stored unless configured


class TestStorePrompts:
    def test_prompt_and_completion_only_where_configured(
        self, upstreams: tuple[MockUpstream, MockUpstream], redis_url: str, tmp_path: Path
    ) -> None:
        config = outcomes_config(*upstreams)
        config["experiments"][EXPERIMENT]["analysis"] = {"store_prompts": True}
        server = ProxyServer(config, tmp_path, redis_url)
        server.start()
        try:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk", max_retries=0)
            messages: Any = [{"role": "user", "content": "write a haiku"}]
            plain = client.chat.completions.create(model=EXPERIMENT, messages=messages, user="u")
            with client.chat.completions.create(model=EXPERIMENT, messages=messages, user="u", stream=True) as s:
                streamed_id = s.response.headers["x-request-id"]
                streamed_text = "".join(c.choices[0].delta.content or "" for c in s if c.choices)
            ids = {plain._request_id, streamed_id}
            wait_until(lambda: ids <= {e.get("request_id") for e in server.events()}, what="events")
            by_id = {e["request_id"]: e for e in server.events() if e.get("request_id") in ids}
            assert by_id[plain._request_id]["prompt"] == messages
            assert by_id[plain._request_id]["completion"] == plain.choices[0].message.content
            assert by_id[streamed_id]["completion"] == streamed_text and streamed_text
        finally:
            server.stop()
