"""The admin API fuzzed by schemathesis from its own OpenAPI schema (`GET /openapi.json` of a real proxy).

One proxy (a three-phase rollout plan, a migrated SQLite store, its own redis-server) serves the module.
Every operation of the schema is called with schemathesis' positive (schema-valid) and negative
(schema-violating) cases, a random experiment name and the real one alike:

- with the admin token (25 cases per operation and mode): no 5xx ever (`not_a_server_error`), and every
  4xx is OpenAI's error shape;
- without it (no header, and whatever the fuzzer puts in the `authorization` header, 25 cases each; a
  wrong token, the token without "Bearer", a Basic header, a prefix of the token, 10 each): every
  /admin route answers 401 or 403 in that shape, nothing is 5xx, and Redis (the rollout percent, its
  audit, the plan, every key) is what it was.

Paths under /eval and /v1 are left out if the schema ever lists them (they are not the admin API).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.openapi import from_dict

from proxy.store.db import engine_for, migrate
from tests.harness import ADMIN_TOKEN, MockUpstream, ProxyServer, RedisServer, proxy_config

Operation = APIOperation[Any, Any, Any, Any]
AnyCase = Case[Any]
EXPERIMENT = "sales-companion"
PLAN = [{"name": "canary", "percent": 10, "min_duration": "2d"}, {"name": "beta", "percent": 50},
        {"name": "ga", "percent": 100}]  # fmt: skip
EXAMPLES = 25  # per operation and generation mode
FEW = 10  # for a fixed wrong credential: the header is the point, the rest varies little
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
KNOWN_ACTIONS = ("pause", "resume", "promote", "abort")
WRONG_CREDENTIALS = [
    pytest.param(None, id="fuzzed-header"),  # whatever schemathesis puts in the documented header
    pytest.param({}, id="no-header"),
    pytest.param({"authorization": "Bearer not-the-token"}, id="wrong-token"),
    pytest.param({"authorization": ADMIN_TOKEN}, id="token-without-bearer"),
    pytest.param({"authorization": f"Basic {ADMIN_TOKEN}"}, id="basic-scheme"),
    pytest.param({"authorization": f"Bearer {ADMIN_TOKEN[:-1]}"}, id="token-prefix"),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("schemathesis")


@pytest.fixture(scope="module")
def redis_alone(workdir: Path) -> Iterator[RedisServer]:
    """A redis-server of this module's own: its whole content is compared before and after."""
    server = RedisServer(workdir)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(
    upstreams: tuple[MockUpstream, MockUpstream], redis_alone: RedisServer, workdir: Path
) -> Iterator[ProxyServer]:
    store = f"sqlite:///{workdir / 'store.db'}"
    engine = engine_for(store)
    migrate(engine)
    engine.dispose()
    config = proxy_config(*upstreams, events={"redis_stream": {"enabled": True}})  # a plan needs the stream
    config["experiments"][EXPERIMENT]["rollout_plan"] = PLAN
    # The admin API's per-token rate limit, high: hundreds of fuzzed calls a minute are the point here.
    config["admin"] = {"rate_limit_per_minute": 1_000_000}
    proxy = ProxyServer(config, workdir, redis_alone.url, extra_env={"ABPROXY_STORE_URL": store})
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def operations(server: ProxyServer) -> list[Operation]:
    """Every operation of the served schema but those under /eval and /v1."""
    document = httpx.get(f"{server.url}/openapi.json", timeout=10).raise_for_status().json()
    document["paths"] = {p: item for p, item in document["paths"].items() if not p.startswith(("/eval", "/v1"))}
    found: list[Operation] = []
    for result in from_dict(document).get_all_operations():
        assert isinstance(result, Ok), result.err()
        found.append(result.ok())
    labels = {op.label for op in found}
    assert {"GET /admin/experiments", "PUT /admin/experiments/{name}/rollout",
            "POST /admin/experiments/{name}/plan/{action}", "GET /admin/experiments/{name}/audit"} <= labels, labels
    return found


def cases(operation: Operation, mode: GenerationMode, headers: dict[str, str] | None) -> st.SearchStrategy[AnyCase]:
    """The operation's cases, and as many again with the real experiment (and each plan action) in the path:
    a random name is only ever "no such experiment"."""
    names = [p.name for p in operation.path_parameters]
    fixed: list[dict[str, str]] = [{}]
    if "name" in names:
        fixed += [{"name": EXPERIMENT, **({"action": a} if "action" in names else {})} for a in KNOWN_ACTIONS]
    return st.one_of([operation.as_strategy(mode, headers=headers, path_parameters=f or None) for f in fixed])


def assert_error_shape(case: AnyCase, status: int, body: Any) -> None:
    """OpenAI's error body: {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}."""
    where = f"{case.as_curl_command()} -> {status} {body!r:.400}"
    assert isinstance(body, dict) and set(body) == {"error"}, where
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, where
    assert isinstance(error["message"], str) and error["message"], where
    assert isinstance(error["type"], str) and error["type"], where
    assert error["param"] is None or isinstance(error["param"], str), where
    assert error["code"] is None or isinstance(error["code"], str), where


def fuzz(operation: Operation, mode: GenerationMode, headers: dict[str, str] | None,
         check: Callable[[AnyCase, int, Any], None], base_url: str, examples: int = EXAMPLES) -> int:  # fmt: skip
    """Run `examples` cases of `operation` in `mode` with `headers` fixed (None: the fuzzer's own, {}: no
    authorization header at all); `check` sees each answer. The count of cases run."""
    ran = [0]

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=cases(operation, mode, headers or None))
    def run(case: AnyCase) -> None:
        if headers == {}:
            # The fuzzer may generate an authorization header of its own; "no header" means none.
            case.headers.pop("authorization", None)
        response = case.call(base_url=base_url, timeout=10)
        ran[0] += 1
        case.validate_response(response, checks=[not_a_server_error])
        body = None
        if response.status_code >= 400 or operation.path.startswith("/admin"):
            try:
                body = response.json()
            except ValueError:
                raise AssertionError(f"{case.as_curl_command()} -> {response.status_code}: not JSON") from None
        check(case, response.status_code, body)

    try:
        run()
    except Unsatisfiable:
        # A negative case needs something to break: an operation whose only input is the fixed header has none.
        assert mode is GenerationMode.NEGATIVE and ran[0] == 0, operation.label
    return ran[0]


def redis_content(client: redis.Redis) -> dict[str, object]:
    """Every key with its whole value: hashes, streams (entries), strings, sets, lists."""
    content: dict[str, object] = {}
    for raw in sorted(client.keys("*")):
        key = raw if isinstance(raw, str) else raw.decode()
        kind = client.type(key)
        if kind == "hash":
            content[key] = client.hgetall(key)
        elif kind == "stream":
            content[key] = client.xrange(key)
        elif kind == "string":
            content[key] = client.get(key)
        elif kind == "list":
            content[key] = client.lrange(key, 0, -1)
        elif kind == "set":
            content[key] = sorted(client.smembers(key))
        else:
            content[key] = kind
    return content


@pytest.mark.parametrize("mode", MODES, ids=str)
def test_with_the_admin_token_no_5xx_and_openai_errors(
    server: ProxyServer, operations: list[Operation], mode: GenerationMode
) -> None:
    """Authenticated: no operation answers 5xx, and every 4xx is OpenAI's error shape."""
    statuses: set[int] = set()

    def check(case: AnyCase, status: int, body: Any) -> None:
        statuses.add(status)
        if status >= 400:
            assert_error_shape(case, status, body)

    ran = sum(fuzz(op, mode, {"authorization": f"Bearer {ADMIN_TOKEN}"}, check, server.url) for op in operations)
    assert ran >= len(operations) if mode is GenerationMode.POSITIVE else ran > 0
    # The token was accepted, so the cases reached the handlers: valid ones succeed, broken ones are refused there.
    assert 200 in statuses if mode is GenerationMode.POSITIVE else statuses & {400, 404, 422}, statuses
    assert not statuses & {401, 403}, statuses


@pytest.mark.parametrize("headers", WRONG_CREDENTIALS)
@pytest.mark.parametrize("mode", MODES, ids=str)
def test_without_the_admin_token_every_admin_route_refuses_and_nothing_changes(
    server: ProxyServer, redis_alone: RedisServer, operations: list[Operation], mode: GenerationMode,
    headers: dict[str, str] | None,
) -> None:  # fmt: skip
    """No or a wrong token: every /admin call is 401/403 in OpenAI's shape, nothing 5xx, Redis unchanged."""
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10) as admin:
        admin.put(f"/admin/experiments/{EXPERIMENT}/rollout", json={"percent": 12.34, "reason": "before fuzzing"})
        before_api = admin.get(f"/admin/experiments/{EXPERIMENT}").json()
    client = redis.Redis.from_url(redis_alone.url, decode_responses=True)
    try:
        before = redis_content(client)

        def check(case: AnyCase, status: int, body: Any) -> None:
            if case.operation.path.startswith("/admin"):
                assert status in (401, 403), f"{case.as_curl_command()} -> {status} {body!r:.300}"
                assert_error_shape(case, status, body)
                assert body["error"]["code"] in ("invalid_admin_token", "admin_disabled")
            elif status >= 400:
                assert_error_shape(case, status, body)

        admin_ops = [op for op in operations if op.path.startswith("/admin")]
        examples = FEW if headers else EXAMPLES
        assert sum(fuzz(op, mode, headers, check, server.url, examples) for op in admin_ops) >= len(admin_ops)
        assert redis_content(client) == before
    finally:
        client.close()
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10) as admin:
        after_api = admin.get(f"/admin/experiments/{EXPERIMENT}").json()
    assert after_api["percent"] == before_api["percent"] == 12.34 and after_api["rev"] == before_api["rev"]
