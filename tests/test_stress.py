"""A bounded stress run with faults: thousands of requests and streams through a real proxy while
Redis is killed and restarted empty, the rollout is raised, and upstreams fail on purpose.

Checked afterwards, request by request:
- lost: every request got an answer, and exactly one event carries its request id;
- failed: only the requests that asked their upstream to fail did, each with its expected error;
- mis-routed: every answer's variant is the public formula's for the percent the event says was in
  force, that percent is one the test set, and no user ever went from treatment back to control;
- leaked: once idle again, the proxy holds no more tasks or file descriptors than when it was idle
  and warm before the run, and nothing is in flight.
No timing is asserted; the run is bounded by its request count (it takes ~20 s on 2 cores).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.assignment import bucket, choose_variant, threshold
from tests.harness import MockUpstream, ProxyServer, RedisServer, eventually, proxy_config

REQUESTS = 3000
CONCURRENCY = 32
USERS = 400
SALT = "sales-v2"
CHAT = "/v1/chat/completions"


def _gauge(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not exposed")


def _idle_resources(proxy: ProxyServer, http: httpx.Client) -> tuple[float, int]:
    """(asyncio tasks, open fds) of the idle proxy process."""
    assert proxy.proc is not None
    tasks = _gauge(http.get(f"{proxy.url}/metrics").text, "abproxy_asyncio_tasks")
    return tasks, len(os.listdir(f"/proc/{proxy.proc.pid}/fd"))


def _plan(seed: int) -> list[dict[str, Any]]:
    """The requests: a user, streamed or not, and whether it asks its upstream to fail."""
    rng = random.Random(seed)
    plan = []
    for i in range(REQUESTS):
        fault = rng.choices(["none", "status-503", "die"], weights=[94, 3, 3])[0]
        stream = fault == "die" or rng.random() < 0.35
        plan.append({"i": i, "user": f"stress-{rng.randrange(USERS)}", "stream": stream, "fault": fault})
    return plan


async def _send(client: httpx.AsyncClient, url: str, item: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "sales-companion", "user": item["user"], "stream": item["stream"],
                            "messages": [{"role": "user", "content": f"question {item['i']}"}]}  # fmt: skip
    if item["fault"] == "status-503":
        body["mock_status"] = 503
    elif item["fault"] == "die":
        body["mock_die_after"] = 2
    async with client.stream("POST", f"{url}{CHAT}", json=body) as response:
        text = (await response.aread()).decode()
    return {**item, "status": response.status_code, "text": text,
            "request_id": response.headers.get("x-request-id"), "variant": response.headers.get("x-abproxy-variant")}


async def _run(url: str, plan: list[dict[str, Any]], at: dict[int, Any]) -> list[dict[str, Any]]:
    """Send the plan with CONCURRENCY workers; `at[k]()` runs (in a thread) when request k is taken."""
    queue = list(reversed(plan))
    results: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def worker() -> None:
            while queue:
                item = queue.pop()
                action = at.pop(item["i"], None)
                if action is not None:
                    await asyncio.to_thread(action)
                results.append(await _send(client, url, item))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return results


@pytest.mark.slow
def test_stress_with_faults_loses_and_misroutes_nothing(tmp_path: Path, session_dir: Path) -> None:
    redis_server = RedisServer(tmp_path)  # its own: this test kills it
    redis_server.start()
    mocks = [MockUpstream(name, session_dir, tokens_per_s=0) for name in ("stress-base", "stress-ft")]
    for mock in mocks:
        mock.start()
    config = proxy_config(*mocks)
    for upstream in config["upstreams"].values():
        upstream.pop("api_key_env")
    proxy = ProxyServer(config, tmp_path, redis_server.url)
    proxy.start()
    try:
        with httpx.Client(timeout=10) as http:
            proxy.set_percent(30, reason="stress")
            asyncio.run(_run(proxy.url, _plan(seed=1)[:200], {}))  # warm: pools filled, code paths run
            eventually(lambda: _check(_gauge(http.get(f"{proxy.url}/metrics").text,
                                             "abproxy_in_flight_requests") == 0))  # fmt: skip
            eventually(lambda: _check(len(proxy.events()) == 200))  # flushed (every 0.1 s) before the cut
            warm_tasks, warm_fds = _idle_resources(proxy, http)
            proxy.stdout_path.write_text("")  # only the run's events from here on

            plan = _plan(seed=2)
            at = {
                REQUESTS // 5: lambda: proxy.set_percent(40, reason="raise mid-run"),
                2 * REQUESTS // 5: redis_server.kill,
                3 * REQUESTS // 5: redis_server.start,  # restarted empty: the proxy writes 40 % back
            }
            results = asyncio.run(_run(proxy.url, plan, at))
            assert not at, "every fault was injected"

            eventually(lambda: _check(_gauge(http.get(f"{proxy.url}/metrics").text,
                                             "abproxy_in_flight_requests") == 0))  # fmt: skip
            eventually(lambda: _check(len(proxy.events()) >= REQUESTS), timeout=10)
            eventually(lambda: _check(_idle_resources(proxy, http)[0] <= warm_tasks), timeout=10)
            tasks, fds = _idle_resources(proxy, http)
            admin = {"Authorization": f"Bearer {proxy.admin_token}"}

            def state() -> dict[str, Any]:
                return http.get(f"{proxy.url}/admin/experiments/sales-companion", headers=admin).json()  # type: ignore[no-any-return]

            # Redis came back empty; the write-back waits for the proxy's next resync, its reconnect
            # backing off up to 1 s: the run can end before it.
            eventually(lambda: _check(state()["updated_by"] is not None), timeout=10)
            restored = state()
    finally:
        proxy.stop()
        for mock in mocks:
            mock.stop()
        redis_server.stop()

    # Nothing lost: one answer per request, one event per answer.
    assert len(results) == REQUESTS
    events: dict[str, list[dict[str, Any]]] = {}
    for event in proxy.events():
        events.setdefault(event["request_id"], []).append(event)
    assert all(r["request_id"] for r in results)
    assert {r["request_id"] for r in results} == set(events)
    assert all(len(found) == 1 for found in events.values())

    # Nothing failed that was not asked to fail, and each injected failure failed as documented.
    by_fault: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_fault.setdefault(r["fault"], []).append(r)
    assert all(r["status"] == 200 for r in by_fault["none"])
    assert all(r["text"].endswith("data: [DONE]\n\n") for r in by_fault["none"] if r["stream"])
    assert all(r["status"] == 503 and json.loads(r["text"])["error"]["code"] == "mock_503"
               for r in by_fault["status-503"])  # fmt: skip
    assert all(r["status"] == 200 and '"upstream_interrupted"' in r["text"].rsplit("data: ", 1)[-1]
               for r in by_fault["die"])  # fmt: skip

    # Nothing mis-routed.
    seen_percents = set()
    last_variant: dict[str, str] = {}
    for r in sorted(results, key=lambda r: events[r["request_id"]][0]["ts"]):
        event = events[r["request_id"]][0]
        percent = event["rollout_percent"]
        seen_percents.add(percent)
        expected = choose_variant(bucket(SALT, r["user"]), threshold(percent))
        assert r["variant"] == event["variant"] == expected, r
        if last_variant.get(r["user"]) == "treatment":
            assert r["variant"] == "treatment", f"{r['user']} moved back to control"
        last_variant[r["user"]] = r["variant"]
    assert seen_percents == {30.0, 40.0}
    assert (restored["percent"], restored["updated_by"]) == (40.0, "abproxy:restore")

    # Nothing leaked.
    assert tasks <= warm_tasks
    assert fds <= warm_fds + 4, f"{fds} open fds after the run, {warm_fds} before"


def _check(condition: bool) -> None:
    assert condition
