"""Redis faults under live traffic, against real processes: proxies talk to a real redis-server
through tests/faultproxy.py, which makes every command slow, cuts the link or partitions it.

For each fault, traffic runs the whole time (a thread sending requests, streamed and not, for many
users) and is checked request by request afterwards:
- nothing failed: every request got a 200 and its event;
- routed by a known percent: the answer's variant is the public formula's for the percent its event
  says was in force, and that percent is one ops set (never a config default Redis "forgot");
- per instance, once an instance served the new percent it never served the old one again.
No timing is asserted: each run is bounded by its phases, not by a deadline.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis

from proxy.assignment import bucket, choose_variant, threshold
from proxy.rollout import RESTORER
from tests.faultproxy import FaultProxy
from tests.harness import MockUpstream, ProxyServer, RedisServer, eventually, proxy_config, wait_until

SALT = "sales-v2"
CHAT = "/v1/chat/completions"
EXPERIMENT = "/admin/experiments/sales-companion"


class Traffic:
    """Requests to some proxies from a background thread until stopped: `concurrency` at a time,
    users drawn round-robin from `users`, every third one streamed. `sent` counts answers so far."""

    def __init__(self, proxies: list[ProxyServer], users: int = 300, concurrency: int = 8) -> None:
        self.proxies = proxies
        self.users = users
        self.concurrency = concurrency
        self.results: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "traffic did not stop"

    @property
    def sent(self) -> int:
        return len(self.results)

    def wait_for(self, more: int) -> None:
        """Block until `more` further answers came back (the fault has been tried under load)."""
        target = self.sent + more
        wait_until(lambda: self.sent >= target, timeout=60, what=f"{more} more answers")

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency * len(self.proxies))
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            counter = iter(range(10**9))
            await asyncio.gather(*(self._worker(client, counter) for _ in range(self.concurrency)))

    async def _worker(self, client: httpx.AsyncClient, counter: Iterator[int]) -> None:
        while not self._stop.is_set():
            i = next(counter)
            proxy = self.proxies[i % len(self.proxies)]
            user = f"redis-fault-{i % self.users}"
            body = {"model": "sales-companion", "user": user, "stream": i % 3 == 0,
                    "messages": [{"role": "user", "content": f"q{i}"}]}  # fmt: skip
            result = {"proxy": proxy.port, "user": user, "stream": body["stream"], "status": 0, "text": "",
                      "request_id": None, "variant": None, "sent": time.monotonic()}  # fmt: skip
            try:
                async with client.stream("POST", f"{proxy.url}{CHAT}", json=body) as response:
                    result["text"] = (await response.aread()).decode()
                result.update(status=response.status_code, request_id=response.headers.get("x-request-id"),
                              variant=response.headers.get("x-abproxy-variant"))  # fmt: skip
            except httpx.HTTPError as exc:
                result["text"] = repr(exc)  # counted as a failure by check_routing
            result["done"] = time.monotonic()
            self.results.append(result)


def check_routing(traffic: Traffic, percents: set[float]) -> dict[int, list[float]]:
    """Every answer a 200 with exactly one event, routed by the formula for a percent ops set, and no
    instance ever went back: a request sent after another one's answer came back was routed by at least
    that one's percent (the percents in these tests only rise). Requests in flight together may finish in
    either order, so only this causal order is checked. Returns, per proxy port, the percents its
    requests were routed by in the order they first appeared."""
    failed = [r for r in traffic.results if r["status"] != 200]
    assert not failed, f"{len(failed)} of {traffic.sent} failed, first: {failed[0]}"
    assert all(r["text"].endswith("data: [DONE]\n\n") for r in traffic.results if r["stream"])
    eventually(lambda: _check(sum(len(p.events()) for p in traffic.proxies) >= traffic.sent))  # flushed
    events: dict[str, dict[str, Any]] = {}
    for proxy in traffic.proxies:
        for event in proxy.events():
            assert event["request_id"] not in events, "two events for one request"
            events[event["request_id"]] = {**event, "proxy": proxy.port}
    by_proxy: dict[int, list[dict[str, Any]]] = {}
    for r in traffic.results:
        event = events[r["request_id"]]
        assert event["proxy"] == r["proxy"] and event["status"] == 200
        percent = event["rollout_percent"]
        assert percent in percents, f"routed by {percent} %, set were {percents}"
        assert r["variant"] == event["variant"] == choose_variant(bucket(SALT, r["user"]), threshold(percent)), r
        by_proxy.setdefault(r["proxy"], []).append({**r, "percent": percent})
    seen: dict[int, list[float]] = {}
    for port, answered in by_proxy.items():
        finished = sorted(answered, key=lambda r: r["done"])
        highest_answered, i = 0.0, 0
        order = seen.setdefault(port, [])
        for r in sorted(answered, key=lambda r: r["sent"]):
            while i < len(finished) and finished[i]["done"] < r["sent"]:
                highest_answered = max(highest_answered, finished[i]["percent"])
                i += 1
            assert r["percent"] >= highest_answered, (
                f"instance {port} went back: routed by {r['percent']} % after answering by {highest_answered} %"
            )
            if r["percent"] not in order:
                order.append(r["percent"])
    return seen


@pytest.fixture()
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """Its own redis-server: these tests kill it."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def fault(own_redis: RedisServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy("127.0.0.1", own_redis.port)
    yield proxy
    proxy.close()


def _start_proxy(
    upstreams: tuple[MockUpstream, MockUpstream], tmp_path: Path, redis_url: str, *, stream_sink: bool = False
) -> ProxyServer:
    config = proxy_config(*upstreams)
    if stream_sink:  # events also go to the Redis Stream: a second Redis client on the request's side
        config["events"] = {"redis_stream": {"enabled": True}}
    proxy = ProxyServer(config, tmp_path, redis_url)
    proxy.start()
    return proxy


def _ready(proxy: ProxyServer) -> dict[str, Any]:
    response = httpx.get(f"{proxy.url}/readyz", timeout=10)
    return {"status_code": response.status_code, **response.json()}


def test_slow_redis_costs_no_request(
    upstreams: tuple[MockUpstream, MockUpstream], tmp_path: Path, own_redis: RedisServer, fault: FaultProxy
) -> None:
    """Every Redis command takes 300 ms+ (150 ms each way) while requests flow, events go to the
    Redis Stream and ops raise the rollout: no request fails, the raise still lands everywhere."""
    proxy = _start_proxy(upstreams, tmp_path, fault.url, stream_sink=True)
    try:
        proxy.set_percent(30, reason="before")
        with Traffic([proxy]) as traffic:
            traffic.wait_for(100)
            fault.latency(150)
            traffic.wait_for(300)
            assert _ready(proxy)["status_code"] == 200
            proxy.set_percent(60, reason="raised while Redis is slow")  # slow, under the 0.5 s timeout
            traffic.wait_for(300)
            fault.heal()
            traffic.wait_for(100)
        assert check_routing(traffic, {30.0, 60.0}) == {proxy.port: [30.0, 60.0]}
        with redis.Redis.from_url(own_redis.url) as stream:  # the slow sink delivered every event
            eventually(lambda: _check(_stream_request_ids(stream) == {r["request_id"] for r in traffic.results}))
    finally:
        proxy.stop()


def test_redis_killed_and_restarted_empty_under_two_proxies(
    upstreams: tuple[MockUpstream, MockUpstream], tmp_path: Path, own_redis: RedisServer
) -> None:
    """Redis SIGKILLed mid-traffic and started again with no data: both instances keep serving the
    live 40 %, one of them writes it back (audited as abproxy:restore, once), and neither falls
    back to the config's 0 %."""
    first = _start_proxy(upstreams, tmp_path, own_redis.url)
    second = _start_proxy(upstreams, tmp_path, own_redis.url)
    try:
        first.set_percent(40, reason="live rollout")
        with Traffic([first, second]) as traffic:
            traffic.wait_for(200)
            own_redis.kill()
            traffic.wait_for(300)
            assert {_ready(p)["redis_connected"] for p in (first, second)} == {False}
            own_redis.start()  # empty: no persistence configured
            for proxy in (first, second):
                wait_until(lambda proxy=proxy: _ready(proxy)["redis_connected"], timeout=10, what="reconnect")
            traffic.wait_for(200)
        assert check_routing(traffic, {40.0}) == {first.port: [40.0], second.port: [40.0]}
        for proxy in (first, second):
            with proxy.admin() as admin:
                state = admin.get(EXPERIMENT).json()
                audit = admin.get(f"{EXPERIMENT}/audit").json()
            assert (state["percent"], state["updated_by"]) == (40.0, RESTORER)
            assert [(e["by"], e["to"]) for e in audit["entries"]] == [(RESTORER, 40.0)], "restored once"
    finally:
        first.stop()
        second.stop()


def test_partitioned_instance_serves_its_last_percent_and_converges(
    upstreams: tuple[MockUpstream, MockUpstream], tmp_path: Path, own_redis: RedisServer, fault: FaultProxy
) -> None:
    """One instance is partitioned from Redis (its connections hang, no byte moves) while ops raise
    the rollout through the other: it keeps serving its last known 20 %, stays ready, refuses an admin
    write with an honest 503, and on heal follows the raise; the other follows at once."""
    cut = _start_proxy(upstreams, tmp_path, fault.url)
    direct = _start_proxy(upstreams, tmp_path, own_redis.url)
    try:
        direct.set_percent(20, reason="before the partition")
        eventually(lambda: _check(_ready(cut)["redis_connected"] is True))
        with Traffic([cut, direct]) as traffic:
            traffic.wait_for(200)
            fault.partition()
            wait_until(lambda: _ready(cut)["redis_connected"] is False, timeout=15, what="partition noticed")
            assert _ready(cut)["status_code"] == 200  # serving last known percents is ready
            direct.set_percent(50, reason="raised during the partition")
            with cut.admin() as admin:
                refused = admin.put(f"{EXPERIMENT}/rollout", json={"percent": 70})
            assert refused.status_code == 503
            error = refused.json()["error"]
            assert error["type"] == "service_unavailable" and "may or may not have been applied" in error["message"]
            traffic.wait_for(300)
            fault.heal()
            wait_until(lambda: _ready(cut)["redis_connected"] is True, timeout=15, what="heal noticed")
            traffic.wait_for(200)
        # The write queued in the partition may have landed on heal (as TCP would deliver it): whichever
        # percent won, both instances agree on it and routed by nothing else.
        with direct.admin() as admin:
            final = admin.get(EXPERIMENT).json()["percent"]
        assert final in {50.0, 70.0}
        with cut.admin() as admin:
            eventually(lambda: _check(admin.get(EXPERIMENT).json()["percent"] == final))
        routed = check_routing(traffic, {20.0, 50.0, 70.0})
        assert routed[direct.port][:2] == [20.0, 50.0]
        assert routed[cut.port][0] == 20.0 and len(routed[cut.port]) >= 2, "the partitioned instance caught up"
    finally:
        cut.stop()
        direct.stop()


def _stream_request_ids(client: redis.Redis) -> set[str]:
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange("abproxy:events"))
    return {fields[b"request_id"].decode() for _, fields in entries}


def _check(condition: bool) -> None:
    assert condition
