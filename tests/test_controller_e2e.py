"""The staged rollout with every real part: openai client -> proxy -> Redis Stream -> `abproxy collect` ->
SQLite -> the controller -> the percent in Redis -> the proxy's routing. Known truths: a healthy fine-tune is
promoted to GA; one whose upstream fails a third of its calls is rolled back in canary. And two controller
processes, the leader killed mid-plan: the other finishes it, and no step is taken twice."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
import redis.asyncio as aioredis
import sqlalchemy as sa

from proxy.config import load_settings
from proxy.controller.controller import Controller
from proxy.store.db import engine_for
from proxy.store.schema import requests
from tests.harness import MockUpstream, Process, ProxyServer, outcomes_config, wait_until

EXPERIMENT = "sales-companion"
USERS = 150


@pytest.fixture()
def healthy(tmp_path: Path) -> Iterator[tuple[MockUpstream, MockUpstream]]:
    mocks = (MockUpstream("base", tmp_path), MockUpstream("finetuned", tmp_path))
    for mock in mocks:
        mock.start()
    yield mocks
    for mock in mocks:
        mock.stop()


def _stack(mocks: tuple[MockUpstream, MockUpstream], plan: list[dict[str, Any]], redis_url: str,
           tmp_path: Path) -> tuple[ProxyServer, Process, Path, str]:  # fmt: skip
    config = outcomes_config(*mocks)
    config["experiments"][EXPERIMENT]["rollout_plan"] = plan
    config["controller"] = {"interval_s": 0.5, "lease_s": 2}
    store = f"sqlite:///{tmp_path / 'store.db'}"
    proxy = ProxyServer(config, tmp_path, redis_url, extra_env={"ABPROXY_STORE_URL": store})
    proxy.start()
    config_file = tmp_path / f"proxy-{proxy.port}.yaml"
    collector = Process("collector", [sys.executable, "-m", "proxy", "collect", "--config", str(config_file),
                                      "--consumer", "e2e"], tmp_path, {"REDIS_URL": redis_url,
                                                                       "ABPROXY_STORE_URL": store})  # fmt: skip
    collector.start()
    return proxy, collector, config_file, store


def _percent(proxy: ProxyServer) -> float:
    """The percent the proxy serves by (Redis, through the admin API)."""
    with proxy.admin() as admin:
        return float(admin.get(f"/admin/experiments/{EXPERIMENT}").json()["percent"])


def _drive(proxy: ProxyServer, store: str, first_user: int) -> dict[str, int]:
    """USERS users, two requests each, through the official client; until the collector stored them all."""
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="sk-app", max_retries=0)
    seen = {"control": 0, "treatment": 0, "errors": 0}
    for i in range(first_user, first_user + USERS):
        for turn in range(2):
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model=EXPERIMENT, messages=[{"role": "user", "content": f"q {i}.{turn}"}], user=f"user-{i}")
                seen[raw.headers["x-abproxy-variant"]] += 1
            except openai.APIStatusError:
                seen["errors"] += 1
    engine = engine_for(store)

    def stored() -> bool:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("requests"):  # the collector has not migrated the store yet
                return False
            total = conn.execute(sa.select(sa.func.count()).select_from(requests)).scalar_one()
        return bool(total >= (first_user + USERS) * 2)

    try:
        wait_until(stored, timeout=30, what="the collector storing every request")
    finally:
        engine.dispose()
    return seen


async def _controller(config_file: Path, redis_url: str, store: str, clock: list[float]) -> tuple[Controller, Any]:
    settings = load_settings(config_file, {"REDIS_URL": redis_url, "ABPROXY_STORE_URL": store}, upstream_keys=False)
    client = aioredis.from_url(redis_url, decode_responses=True)
    return Controller(settings, client, engine_for(store), owner="e2e", clock=lambda: clock[0]), client


CANARY_THEN_GA = [
    {"name": "canary", "percent": 20, "min_duration": "1d", "min_users_per_variant": 20,
     "gates": [{"guardrail": "error_rate", "max_regression": 0.05}]},
    {"name": "ga", "percent": 100},
]  # fmt: skip


def test_a_healthy_fine_tune_reaches_ga(healthy: tuple[MockUpstream, MockUpstream], redis_url: str,
                                        tmp_path: Path) -> None:  # fmt: skip
    proxy, collector, config_file, store = _stack(healthy, CANARY_THEN_GA, redis_url, tmp_path)

    async def run() -> list[str]:
        clock = [time.time()]
        controller, client = await _controller(config_file, redis_url, store, clock)
        try:
            actions = [(await controller.tick())[EXPERIMENT].decision.action]
            await asyncio.to_thread(lambda: wait_until(lambda: _percent(proxy) == 20, timeout=5, what="20 %"))
            seen = await asyncio.to_thread(_drive, proxy, store, 0)
            assert seen["treatment"] > 0 and seen["control"] > seen["treatment"] and seen["errors"] == 0
            clock[0] += 2 * 86_400
            outcome = (await controller.tick())[EXPERIMENT]
            actions.append(outcome.decision.action)
            evidence = outcome.decision.move.evidence if outcome.decision.move else None
            assert evidence is not None
            gate = next(g for g in evidence["gates"] if g["gate"] == "guardrail:error_rate")
            assert gate["status"] == "pass"
            return actions
        finally:
            await client.aclose()
            controller.engine.dispose()

    try:
        assert asyncio.run(run()) == ["start", "complete"]
        wait_until(lambda: _percent(proxy) == 100, timeout=5, what="100 %")
        after = _drive(proxy, store, USERS)
        assert after["control"] == 0 and after["treatment"] == 2 * USERS
    finally:
        collector.stop()
        proxy.stop()


def test_a_failing_fine_tune_is_rolled_back_in_canary(redis_url: str, tmp_path: Path) -> None:
    mocks = (MockUpstream("base", tmp_path), MockUpstream("finetuned", tmp_path, error_rate=0.3))
    for mock in mocks:
        mock.start()
    proxy, collector, config_file, store = _stack(mocks, CANARY_THEN_GA, redis_url, tmp_path)

    async def run() -> Any:
        clock = [time.time()]
        controller, client = await _controller(config_file, redis_url, store, clock)
        try:
            await controller.tick()
            await asyncio.to_thread(lambda: wait_until(lambda: _percent(proxy) == 20, timeout=5, what="20 %"))
            seen = await asyncio.to_thread(_drive, proxy, store, 0)
            assert seen["errors"] > 0
            return (await controller.tick())[EXPERIMENT]  # no need to wait out the day: harm acts at once
        finally:
            await client.aclose()
            controller.engine.dispose()

    try:
        outcome = asyncio.run(run())
        assert outcome.decision.action == "rollback" and outcome.state.status == "rolled_back"
        gate = next(g for g in outcome.decision.move.evidence["gates"] if g["gate"] == "guardrail:error_rate")
        assert gate["status"] == "fail" and gate["figures"]["diff"] > 0.05
        wait_until(lambda: _percent(proxy) == 0, timeout=5, what="0 %")
        assert _drive(proxy, store, USERS)["treatment"] == 0
    finally:
        collector.stop()
        proxy.stop()
        for mock in mocks:
            mock.stop()


def test_two_controller_processes_one_killed_mid_plan(healthy: tuple[MockUpstream, MockUpstream], redis_url: str,
                                                      tmp_path: Path) -> None:  # fmt: skip
    plan = [{"name": "canary", "percent": 10, "min_duration": "3s"}, {"name": "beta", "percent": 50,
             "min_duration": "3s"}, {"name": "ga", "percent": 100}]  # fmt: skip
    proxy, collector, config_file, store = _stack(healthy, plan, redis_url, tmp_path)
    env = {"REDIS_URL": redis_url, "ABPROXY_STORE_URL": store}
    argv = [sys.executable, "-m", "proxy", "controller", "--config", str(config_file)]
    controllers = [Process(f"controller-{i}", argv, tmp_path, env) for i in range(2)]
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for process in controllers:
            process.start()
        wait_until(lambda: client.hget("abproxy:plan:sales-companion", "phase_name") == "canary", timeout=15,
                   what="the plan to start")  # fmt: skip
        holder = client.get("abproxy:controller:lock")
        assert holder is not None
        # The leader is the process whose pid is in the lock's owner id (host-pid-random).
        leader = next(p for p in controllers if p.proc is not None and f"-{p.proc.pid}-" in holder)
        assert leader.proc is not None
        leader.proc.send_signal(signal.SIGKILL)
        leader.proc.wait(5)
        wait_until(lambda: client.hget("abproxy:plan:sales-companion", "status") == "completed", timeout=30,
                   what="the surviving controller to finish the plan")  # fmt: skip
        records = client.xrange("abproxy:decisions:sales-companion")
        moves = [(f["rev"], f["percent_to"]) for _, f in records if '"action": "hold"' not in f["decision"]
                 and '"action":"hold"' not in f["decision"]]  # fmt: skip
        assert moves == [("0", "10"), ("1", "50"), ("2", "100")]  # each step once, in order, no revision twice
        assert client.get("abproxy:controller:lock") != holder
        assert _percent(proxy) == 100
    finally:
        client.close()
        for process in controllers:
            process.stop()
        collector.stop()
        proxy.stop()
