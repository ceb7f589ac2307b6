"""POST /v1/feedback under faults, end to end: a real proxy writing to a real Redis stream, the
collector (`abproxy collect` or an in-process Collector) writing to SQLite and PostgreSQL, and the
analysis' dataset query reading it back.

- a burst of 2,000 posts for 500 answered requests at concurrency 32: every post answered as
  documented, and the store holds exactly the last value sent per (request, metric);
- the same feedback twice (an app retrying, or retrying after a 503 whose write went through):
  one row, counted once by the analysis;
- malformed, forged, future and expired request ids: 4xx in OpenAI's error shape, nothing on the
  stream;
- feedback that reaches the stream and the store before its request's event: stored, and joined
  to the request once the request arrives.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import pytest
import redis
import redis.asyncio as aioredis
import yaml
from sqlalchemy import Engine, select

from proxy.analysis.dataset import Dataset, Window, load
from proxy.event_stream import decode_entry
from proxy.ids import RequestIds, UserHasher
from proxy.store.collector import Collector
from proxy.store.db import Store, engine_for, migrate
from proxy.store.schema import feedback, requests
from tests.harness import (
    SIGNING_KEY,
    MockUpstream,
    PostgresServer,
    ProxyServer,
    RedisServer,
    outcomes_config,
    wait_until,
)

EXPERIMENT = "sales-companion"
STREAM = "abproxy:events"
TTL_S = 3600  # the module proxy's feedback window (config feedback.ttl_s)
CONCURRENCY = 32
hash_user = UserHasher("")  # the tests set no ABPROXY_USER_HASH_KEY


def _config(upstreams: tuple[MockUpstream, MockUpstream]) -> dict[str, Any]:
    config = outcomes_config(*upstreams, feedback={"ttl_s": TTL_S})
    config["experiments"][EXPERIMENT]["rollout_percent"] = 50  # both arms get users
    return config


@pytest.fixture(scope="module")
def proxy(
    upstreams: tuple[MockUpstream, MockUpstream], redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyServer]:
    server = ProxyServer(_config(upstreams), tmp_path_factory.mktemp("faults-feedback"), redis_server.url)
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def stream(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """The shared Redis with the event stream (and its consumer groups) deleted: each test sees its own entries."""
    client = redis.Redis.from_url(redis_server.url)
    client.delete(STREAM)
    yield client
    client.close()


@pytest.fixture()
def client(proxy: ProxyServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="sk-client", max_retries=0)


@pytest.fixture()
def engine(store_url: str) -> Iterator[Engine]:
    engine = engine_for(store_url)
    migrate(engine)
    yield engine
    engine.dispose()


# -- helpers ---------------------------------------------------------------------------------
def _entries(stream: redis.Redis) -> list[tuple[bytes, dict[bytes, bytes], dict[str, Any]]]:
    """(entry id, raw fields, decoded event) of every entry on the stream, in stream order."""
    raw = cast(list[tuple[bytes, dict[bytes, bytes]]], stream.xrange(STREAM))
    return [(eid, fields, decode_entry(eid, fields).event) for eid, fields in raw]


def _feedback_on_stream(stream: redis.Redis) -> list[dict[str, Any]]:
    return [event for _eid, _fields, event in _entries(stream) if event.get("kind") == "feedback"]


def _request_events_on_stream(stream: redis.Redis, wanted: set[str]) -> dict[str, bytes]:
    """request id -> entry id of the request events among `wanted` the proxy's sink has written so far."""
    return {
        event["request_id"]: eid
        for eid, _fields, event in _entries(stream)
        if event.get("kind", "request") == "request" and event.get("request_id") in wanted
    }


def _ask(client: openai.OpenAI, user: str, prompt: str = "hi") -> str:
    completion = client.chat.completions.create(
        model=EXPERIMENT, messages=[{"role": "user", "content": prompt}], user=user
    )
    assert completion._request_id is not None
    return completion._request_id


def _post(client: openai.OpenAI, body: dict[str, Any]) -> httpx.Response:
    """POST /v1/feedback through the official client, as the README shows; refusals raise APIStatusError."""
    return client.post("/feedback", body=body, cast_to=httpx.Response)


def _drain(redis_url: str, engine: Engine, group: str) -> dict[str, int]:
    """An in-process Collector (its own consumer group) stores what the stream holds now."""

    async def run() -> dict[str, int]:
        client = aioredis.from_url(redis_url)
        try:
            collector = Collector(client, Store(engine), key=STREAM, group=group, consumer="c1")
            await collector.drain()
            return collector.counters()
        finally:
            await client.aclose()

    return asyncio.run(run())


def _collect_command(redis_url: str, store_url: str, tmp_path: Path, group: str) -> None:
    """`python -m proxy collect --once`, the command a deployment runs, as a real process."""
    config = {
        "upstreams": {"up": {"base_url": "http://127.0.0.1:9/v1", "api_key_env": "ABPROXY_TEST_UNSET_KEY"}},
        "models": {"m": {"upstream": "up", "model": "gpt-4o-mini"}},
        "experiments": {EXPERIMENT: {"aliases": [EXPERIMENT], "control": "m", "treatment": "m"}},
        "events": {"redis_stream": {"enabled": True, "key": STREAM}},
        "collector": {"group": group},
    }
    path = tmp_path / f"collect-{group}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABPROXY_")}
    env["REDIS_URL"] = redis_url
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "collect", "--once", "--config", str(path), "--store", store_url],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]


def _stored_feedback(engine: Engine) -> dict[tuple[str, str], float]:
    with engine.connect() as conn:
        return {(row.subject, row.metric): row.value for row in conn.execute(select(feedback))}


def _stored_requests(engine: Engine) -> set[str]:
    # Compared by intersection with a test's own ids: the module's proxy may still be flushing an
    # earlier test's request events when a test empties the stream (pytest-randomly shuffles them).
    with engine.connect() as conn:
        return set(conn.execute(select(requests.c.request_id)).scalars())


def _dataset(engine: Engine) -> Dataset:
    now = time.time()
    with engine.connect() as conn:
        return load(conn, EXPERIMENT, Window(now - 3600, now + 3600), regeneration_window_s=120)


def _joined(data: Dataset, metric: str) -> tuple[int, float]:
    """How many request-level values of `metric` the analysis joined to a request, and their sum."""
    obs = data.request_feedback.get(metric)
    if obs is None:
        return 0, 0.0
    return int(obs.den.sum()), float(obs.num.sum())


def _feedback_accepted_total(proxy: ProxyServer) -> float:
    return sum(
        float(line.split()[-1])
        for line in proxy.metrics_text().splitlines()
        if line.startswith("abproxy_feedback_total{")
    )


def _assert_openai_error(exc: openai.APIStatusError, status: int, code: str, param: str | None) -> None:
    assert exc.status_code == status, exc.response.text
    error = exc.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == (code, param) and error["message"]
    assert (exc.code, exc.param) == (code, param)  # the openai client reads the same fields


# -- burst -----------------------------------------------------------------------------------
N_REQUESTS = 500
N_USERS = 125


def _plan(i: int, request_id: str) -> list[dict[str, Any]]:
    """Four posts about request i, sent in this order (right after its answer)."""
    first_csat = {"request_id": request_id, "metric": "csat", "value": 1 + i % 5}
    posts: list[dict[str, Any]] = [
        {"request_id": request_id, "metric": "task_completed", "value": i % 3 != 0},
        first_csat,
        # every 7th the app sends the very same body again (a retry), the others a corrected value
        dict(first_csat) if i % 7 == 0 else {"request_id": request_id, "metric": "csat", "value": 1.5 + i * 3 % 4},
    ]
    if i % 10 == 0:
        posts.append({"request_id": request_id, "metric": "csat", "value": 9})  # out of range: refused
    elif i < N_USERS:  # one user-level outcome per user (u-i), scoped to the experiment or not
        scope = {"experiment": EXPERIMENT} if i % 2 else {}
        posts.append({"user_id": f"u-{i}", "metric": "returned", "value": i % 4 < 2, **scope})
    else:
        posts.append({"request_id": request_id, "metric": "escalated", "value": i % 4 == 0})
    return posts


async def _burst(proxy_url: str) -> list[tuple[str, list[tuple[dict[str, Any], int, dict[str, Any]]]]]:
    """500 chat requests, each followed at once by its four posts; 32 such chains at a time."""
    gate = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    chat = openai.AsyncOpenAI(base_url=f"{proxy_url}/v1", api_key="sk-client", max_retries=0)
    async with httpx.AsyncClient(base_url=proxy_url, timeout=30, limits=limits) as http, chat:

        async def chain(i: int) -> tuple[str, list[tuple[dict[str, Any], int, dict[str, Any]]]]:
            async with gate:
                completion = await chat.chat.completions.create(
                    model=EXPERIMENT, messages=[{"role": "user", "content": f"question {i}"}], user=f"u-{i % N_USERS}"
                )
                request_id = completion._request_id
                assert request_id is not None
                answered = []
                for body in _plan(i, request_id):
                    reply = await http.post("/v1/feedback", json=body)
                    answered.append((body, reply.status_code, reply.json()))
                return request_id, answered

        return await asyncio.gather(*(chain(i) for i in range(N_REQUESTS)))


class TestBurst:
    def test_2000_posts_for_500_requests_at_concurrency_32(
        self,
        proxy: ProxyServer,
        stream: redis.Redis,
        redis_server: RedisServer,
        postgres_server: PostgresServer,
        tmp_path: Path,
    ) -> None:
        """Every post answered (202, or 400 for the out-of-range ones), every 202 on the stream once, and
        after the collector drains, SQLite and PostgreSQL hold exactly the last value sent per subject
        and metric; the analysis counts one value per request, however many posts it took."""
        accepted_before = _feedback_accepted_total(proxy)
        chains = asyncio.run(_burst(proxy.url))

        expected: dict[tuple[str, str], float] = {}
        accepted_ids: set[str] = set()
        refused = 0
        for i, (request_id, answered) in enumerate(chains):
            assert len(answered) == 4
            for body, status, reply in answered:
                if body["metric"] == "csat" and body["value"] == 9:
                    assert status == 400 and reply["error"]["code"] == "value_out_of_range", reply
                    refused += 1
                    continue
                assert status == 202, (i, body, reply)
                assert reply["status"] == "accepted" and reply["id"] not in accepted_ids
                accepted_ids.add(reply["id"])
                value = float(body["value"])
                if body["metric"] == "returned":
                    subject = f"user:{body.get('experiment', '*')}:{hash_user(body['user_id'])}"
                else:
                    subject = f"req:{request_id}"
                expected[(subject, body["metric"])] = value  # sent one after the other: the last one wins
        assert refused == N_REQUESTS // 10 and len(accepted_ids) == 4 * N_REQUESTS - refused
        request_ids = {request_id for request_id, _ in chains}
        assert len(request_ids) == N_REQUESTS

        # The stream: each accepted post exactly once, no refused one; all 500 request events.
        on_stream = _feedback_on_stream(stream)
        assert sorted(e["feedback_id"] for e in on_stream) == sorted(accepted_ids)
        wait_until(lambda: len(_request_events_on_stream(stream, request_ids)) == N_REQUESTS, timeout=30,
                   what="the burst's request events on the stream")  # fmt: skip
        assert _feedback_accepted_total(proxy) - accepted_before == len(accepted_ids)

        # Into SQLite by `abproxy collect --once`, into PostgreSQL by a Collector of another group.
        sqlite_url = f"sqlite:///{tmp_path / 'burst.db'}"
        _collect_command(redis_server.url, sqlite_url, tmp_path, "burst-sqlite")
        schema = f"t_{uuid.uuid4().hex[:16]}"
        postgres_url = postgres_server.create_schema(schema)
        try:
            pg = engine_for(postgres_url)
            migrate(pg)
            _drain(redis_server.url, pg, "burst-postgres")
            for url, engine in ((sqlite_url, engine_for(sqlite_url)), (postgres_url, pg)):
                try:
                    assert request_ids <= _stored_requests(engine), url
                    assert _stored_feedback(engine) == expected, url
                    data = _dataset(engine)
                    for metric in ("task_completed", "csat", "escalated"):
                        sent = [v for (s, m), v in expected.items() if m == metric and s.startswith("req:")]
                        count, total = _joined(data, metric)
                        assert count == len(sent), (url, metric)  # one per request, not one per post
                        assert total == pytest.approx(sum(sent)), (url, metric)
                    returned = [v for (_s, m), v in expected.items() if m == "returned"]
                    assert float(data.user_feedback["returned"].num.sum()) == sum(returned)
                    assert len(data.user_feedback["returned"].user) == len(returned)
                finally:
                    engine.dispose()
        finally:
            postgres_server.drop_schema(schema)


    def test_more_posts_at_once_than_redis_connections_all_accepted(
        self, proxy: ProxyServer, client: openai.OpenAI, stream: redis.Redis
    ) -> None:
        """300 posts in flight together, past the 100 connections redis-py's default pool allows:
        each waits for a free connection (rollout.redis_max_connections, up to redis_timeout_s)
        instead of a 503 "Too many connections" (bench scenario 7 found 581 such at 128 clients)."""
        request_id = _ask(client, "wide-burst")
        wide = 300

        async def burst() -> list[int]:
            limits = httpx.Limits(max_connections=wide, max_keepalive_connections=wide)
            async with httpx.AsyncClient(base_url=proxy.url, timeout=30, limits=limits) as http:
                answers = await asyncio.gather(*(
                    http.post("/v1/feedback", json={"request_id": request_id, "metric": "csat", "value": 1 + i % 5})
                    for i in range(wide)
                ))  # fmt: skip
            return [answer.status_code for answer in answers]

        statuses = asyncio.run(burst())
        assert statuses == [202] * wide, {status: statuses.count(status) for status in set(statuses)}
        assert len(_feedback_on_stream(stream)) == wide


# -- duplicates ------------------------------------------------------------------------------
class TestDuplicates:
    def test_same_feedback_twice_is_one_value(
        self, client: openai.OpenAI, stream: redis.Redis, redis_server: RedisServer, engine: Engine
    ) -> None:
        """The contract (feedback.py, db.py): one value per (request, metric), the last one sent wins.
        Posting the same body twice gives two 202s and two stream entries, but one row, counted once;
        a corrected value replaces the earlier one; the id spelled in capitals is the same request."""
        twice, corrected = _ask(client, "u-dup-1"), _ask(client, "u-dup-2")
        first = _post(client, {"request_id": twice, "metric": "csat", "value": 4}).json()
        again = _post(client, {"request_id": twice, "metric": "csat", "value": 4}).json()
        assert first["id"] != again["id"]  # each post is an event; the store folds them
        shouted = _post(client, {"request_id": twice.upper(), "metric": "task_completed", "value": True}).json()
        assert shouted["request_id"] == twice  # stored under the id the proxy issued, so it joins
        _post(client, {"request_id": twice, "metric": "task_completed", "value": True})
        for value in (2, 5, 3):
            _post(client, {"request_id": corrected, "metric": "csat", "value": value})
        assert len(_feedback_on_stream(stream)) == 7
        wait_until(lambda: len(_request_events_on_stream(stream, {twice, corrected})) == 2, what="request events")

        _drain(redis_server.url, engine, "dup")
        assert _stored_feedback(engine) == {
            (f"req:{twice}", "csat"): 4.0,
            (f"req:{twice}", "task_completed"): 1.0,
            (f"req:{corrected}", "csat"): 3.0,
        }
        data = _dataset(engine)
        assert _joined(data, "csat") == (2, 7.0)
        assert _joined(data, "task_completed") == (1, 1.0)

    def test_retry_after_a_503_whose_write_went_through_is_one_value(
        self, upstreams: tuple[MockUpstream, MockUpstream], tmp_path: Path
    ) -> None:
        """Redis frozen (SIGSTOP) past the proxy's 0.5 s timeout: the post is answered 503
        `feedback_unavailable`, although its XADD may still be applied once Redis thaws. The app
        retries as the message says; whether the stream then holds one entry or two, the store
        holds one value."""
        own_redis = RedisServer(tmp_path)
        own_redis.start()
        server = ProxyServer(_config(upstreams), tmp_path, own_redis.url)
        sync = redis.Redis.from_url(own_redis.url)
        try:
            server.start()
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk", max_retries=0)
            request_id = _ask(client, "u-retry")
            wait_until(lambda: _request_events_on_stream(sync, {request_id}), what="the request event")
            body = {"request_id": request_id, "metric": "csat", "value": 5}
            assert own_redis.proc is not None
            own_redis.proc.send_signal(signal.SIGSTOP)
            try:
                with pytest.raises(openai.APIStatusError) as refused:
                    _post(client, body)
            finally:
                own_redis.proc.send_signal(signal.SIGCONT)
            _assert_openai_error(refused.value, 503, "feedback_unavailable", None)
            assert "retry" in refused.value.message
            assert _post(client, body).status_code == 202  # the retry
            on_stream = len(_feedback_on_stream(sync))
            assert on_stream in (1, 2)

            engine = engine_for(f"sqlite:///{tmp_path / 'retry.db'}")
            try:
                migrate(engine)
                _drain(own_redis.url, engine, "retry")
                assert _stored_feedback(engine) == {(f"req:{request_id}", "csat"): 5.0}
                assert _joined(_dataset(engine), "csat") == (1, 5.0)
            finally:
                engine.dispose()
        finally:
            sync.close()
            server.stop()
            own_redis.stop()


# -- request ids the proxy did not issue, or issued too long ago -------------------------------
def _flip_tag(request_id: str) -> str:
    return request_id[:-1] + ("0" if request_id[-1] != "0" else "1")


def _signed(age_s: float) -> str:
    """An id this deployment could have issued `age_s` ago (negative: in the future)."""
    return RequestIds(SIGNING_KEY).issue(time.time() - age_s)


# (name, make the id from a real one, status, code, param)
REFUSED_IDS: list[tuple[str, Any, int, str, str | None]] = [
    ("tag altered", _flip_tag, 404, "request_not_found", "request_id"),
    ("one character short", lambda i: i[:-1], 404, "request_not_found", "request_id"),
    ("one character long", lambda i: i + "0", 404, "request_not_found", "request_id"),
    ("trailing newline", lambda i: i + "\n", 404, "request_not_found", "request_id"),
    ("space inside", lambda i: i[:20] + " " + i[20:], 404, "request_not_found", "request_id"),
    ("0x prefix", lambda i: "0x" + i[:38], 404, "request_not_found", "request_id"),
    ("not ascii", lambda i: "é" * 40, 404, "request_not_found", "request_id"),
    ("signed with another key", lambda i: RequestIds("another").issue(time.time()), 404, "request_not_found",
     "request_id"),
    ("signed, an hour in the future", lambda i: _signed(-3600), 404, "request_not_found", "request_id"),
    ("signed, past the window", lambda i: _signed(TTL_S + 60), 410, "request_expired", "request_id"),
    ("empty", lambda i: "", 400, "invalid_value", "request_id"),
    ("longer than 128", lambda i: i * 4, 400, "invalid_value", "request_id"),
    ("null", lambda i: None, 400, "missing_request_id", "request_id"),
]  # fmt: skip


class TestRefusedIds:
    @pytest.mark.parametrize(
        ("make", "status", "code", "param"),
        [pytest.param(*case[1:], id=case[0]) for case in REFUSED_IDS],
    )
    def test_refused_in_openai_shape_and_nothing_written(
        self, client: openai.OpenAI, proxy: ProxyServer, stream: redis.Redis,
        make: Any, status: int, code: str, param: str | None,
    ) -> None:  # fmt: skip
        real = _ask(client, "u-ids")
        with pytest.raises(openai.APIStatusError) as refused:
            _post(client, {"request_id": make(real), "metric": "csat", "value": 4})
        _assert_openai_error(refused.value, status, code, param)
        assert _feedback_on_stream(stream) == []

    def test_window_is_the_configured_ttl(self, client: openai.OpenAI, stream: redis.Redis) -> None:
        """feedback.ttl_s (an hour here): an id issued just inside it is accepted, just outside is 410."""
        inside = _signed(TTL_S - 60)
        assert _post(client, {"request_id": inside, "metric": "csat", "value": 4}).status_code == 202
        with pytest.raises(openai.APIStatusError) as refused:
            _post(client, {"request_id": _signed(TTL_S + 60), "metric": "csat", "value": 4})
        _assert_openai_error(refused.value, 410, "request_expired", "request_id")
        assert [e["request_id"] for e in _feedback_on_stream(stream)] == [inside]


# -- feedback ahead of its request ----------------------------------------------------------
class TestFeedbackAheadOfItsRequest:
    def test_stored_first_and_joined_when_the_request_arrives(
        self, client: openai.OpenAI, stream: redis.Redis, redis_server: RedisServer, engine: Engine
    ) -> None:
        """The request events are held back (taken off the stream) while their feedback is posted and
        collected, then put back after it. The feedback is stored with no request to join; once the
        requests arrive, the analysis joins every value, and nothing stored earlier is lost. A validly
        signed id whose request never arrives (its event dropped) is stored and never counted."""
        asked = [_ask(client, f"u-race-{i % 5}", f"prompt {i}") for i in range(20)]
        wait_until(lambda: len(_request_events_on_stream(stream, set(asked))) == len(asked), what="request events")
        held = [(eid, fields) for eid, fields, event in _entries(stream) if event.get("request_id") in set(asked)]
        assert stream.xdel(STREAM, *[eid for eid, _ in held]) == len(asked)

        csat = {request_id: 1 + i % 5 for i, request_id in enumerate(asked)}
        for request_id in asked:
            _post(client, {"request_id": request_id, "metric": "csat", "value": csat[request_id]})
            _post(client, {"request_id": request_id, "metric": "task_completed", "value": csat[request_id] > 2})
        orphan = _signed(0)  # issued by this deployment (valid signature), but no request event ever comes
        _post(client, {"request_id": orphan, "metric": "csat", "value": 1})
        expected = {(f"req:{r}", "csat"): float(v) for r, v in csat.items()}
        expected |= {(f"req:{r}", "task_completed"): float(v > 2) for r, v in csat.items()}
        expected[(f"req:{orphan}", "csat")] = 1.0

        counters = _drain(redis_server.url, engine, "race")
        assert counters["feedback"] == len(expected) and counters["malformed"] == 0
        assert not _stored_requests(engine) & set(asked) and _stored_feedback(engine) == expected
        assert _dataset(engine).request_feedback == {}  # nothing to join yet, and no error

        # The held-back request events arrive after their feedback, as the proxy's sink writes them.
        pipe = stream.pipeline(transaction=False)
        for _eid, fields in held:
            pipe.xadd(STREAM, cast(Any, fields))
        pipe.execute()
        counters = _drain(redis_server.url, engine, "race")
        assert counters["feedback"] == 0
        assert set(asked) <= _stored_requests(engine)
        assert _stored_feedback(engine) == expected  # nothing lost or changed by the late requests
        after = _dataset(engine)
        assert _joined(after, "csat") == (len(asked), float(sum(csat.values())))
        assert _joined(after, "task_completed") == (len(asked), float(sum(v > 2 for v in csat.values())))
        assert {hash_user(f"u-race-{i}") for i in range(5)} <= set(after.users)
