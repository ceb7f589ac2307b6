"""GET /admin/experiments/{name}/report from a real proxy process reading a real store."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.store.db import Store, engine_for, migrate
from tests.harness import ADMIN_TOKEN, MockUpstream, ProxyServer, RedisServer, outcomes_config
from tests.synthetic import DAY, EXPERIMENT, Scenario, generate


@pytest.fixture(scope="module")
def store_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("store") / "store.db"
    engine = engine_for(f"sqlite:///{path}")
    migrate(engine)
    Store(engine).write(generate(Scenario(users=600), time.time() - 11 * DAY))
    engine.dispose()
    return path


def _proxy(upstreams: tuple[MockUpstream, MockUpstream], redis_url: str, log_dir: Path, store: str) -> ProxyServer:
    config = outcomes_config(*upstreams)
    config["experiments"][EXPERIMENT]["analysis"] = {"primary_metric": "task_completed", "mde": 0.05}
    return ProxyServer(config, log_dir, redis_url, extra_env={"ABPROXY_STORE_URL": store})


@pytest.fixture(scope="module")
def proxy(
    upstreams: tuple[MockUpstream, MockUpstream], redis_server: RedisServer, store_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProxyServer]:
    server = _proxy(upstreams, redis_server.url, tmp_path_factory.mktemp("api"), f"sqlite:///{store_file}")
    server.start()
    yield server
    server.stop()


class TestReportEndpoint:
    def test_report_as_json(self, proxy: ProxyServer) -> None:
        with proxy.admin() as admin:
            body = admin.get(f"/admin/experiments/{EXPERIMENT}/report").json()
        assert body["experiment"] == EXPERIMENT
        assert body["srm"]["mismatch"] is False
        assert body["plan"]["primary_metric"] == "task_completed"
        (task,) = [m for m in body["metrics"] if m["name"] == "task_completed"]
        assert task["role"] == "primary" and task["control"]["users"] > 100
        assert body["verdict"]["decision"] in {"ship", "keep_running"}
        assert {g["name"] for g in body["guardrails"]} == {"error_rate", "latency_p95", "cost_per_query"}

    def test_window(self, proxy: ProxyServer) -> None:
        with proxy.admin() as admin:
            full = admin.get(f"/admin/experiments/{EXPERIMENT}/report").json()
            recent = admin.get(f"/admin/experiments/{EXPERIMENT}/report", params={"since": "3d"}).json()
        assert recent["arms"]["control"]["requests"] < full["arms"]["control"]["requests"]

    @pytest.mark.parametrize(("params", "param"), [
        ({"since": "last tuesday"}, "since"), ({"until": "x"}, "until"),
        # Found by schemathesis: these parsed as floats and overflowed datetime (a 500).
        ({"since": "NaN"}, "since"), ({"until": "-1.5e206"}, "until"), ({"since": "99999999999d"}, "since"),
        ({"since": "0001-01-01"}, "since"),
    ])  # fmt: skip
    def test_bad_time(self, proxy: ProxyServer, params: dict[str, str], param: str) -> None:
        with proxy.admin() as admin:
            reply = admin.get(f"/admin/experiments/{EXPERIMENT}/report", params=params)
        assert reply.status_code == 400
        assert reply.json()["error"]["param"] == param and reply.json()["error"]["code"] == "invalid_time"

    def test_unknown_experiment(self, proxy: ProxyServer) -> None:
        with proxy.admin() as admin:
            reply = admin.get("/admin/experiments/nope/report")
        assert reply.status_code == 404 and reply.json()["error"]["code"] == "experiment_not_found"

    def test_needs_the_admin_token(self, proxy: ProxyServer) -> None:
        assert httpx.get(f"{proxy.url}/admin/experiments/{EXPERIMENT}/report").status_code == 401
        wrong = {"Authorization": f"Bearer {ADMIN_TOKEN}x"}
        assert httpx.get(f"{proxy.url}/admin/experiments/{EXPERIMENT}/report", headers=wrong).status_code == 401


def test_store_without_tables_is_503(
    upstreams: tuple[MockUpstream, MockUpstream], redis_url: str, tmp_path: Path
) -> None:
    server = _proxy(upstreams, redis_url, tmp_path, f"sqlite:///{tmp_path / 'empty.db'}")
    server.start()
    try:
        with server.admin() as admin:
            reply = admin.get(f"/admin/experiments/{EXPERIMENT}/report")
        assert reply.status_code == 503
        error = reply.json()["error"]
        assert error["code"] == "store_unavailable" and "abproxy collect" in error["message"]
    finally:
        server.stop()
