"""The rollout plan's admin API, CLI and webhook, against a real proxy, redis-server and `abproxy controller`.

One proxy with a three-phase plan (canary 10 %, beta 50 %, ga 100 %) serves the module; each test starts
from an empty Redis (the percent set back to the config default first, so the proxy lets it go). Redis is
read directly to prove refused or invalid requests changed nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from click.testing import CliRunner, Result
from prometheus_client.parser import text_string_to_metric_families

from proxy.assignment import bucket, choose_variant, threshold
from proxy.cli import main
from proxy.controller.decide import Decision
from proxy.controller.state import PlanState, Transition, decisions_key, plan_key
from proxy.controller.webhook import Notifier
from proxy.rollout import audit_key, state_key
from proxy.store.db import engine_for, migrate
from tests.harness import ADMIN_TOKEN, MockUpstream, ProxyServer, RedisServer, eventually, proxy_config

EXPERIMENT = "sales-companion"
SALT = "sales-v2"
PLAN: list[dict[str, Any]] = [
    {"name": "canary", "percent": 10, "min_duration": "2d"},
    {"name": "beta", "percent": 50},
    {"name": "ga", "percent": 100},
]
PLAN_URL = f"/admin/experiments/{EXPERIMENT}/plan"
ERROR_KEYS = {"message", "type", "param", "code"}


# -- fixtures ------------------------------------------------------------------------------
def plan_config(upstreams: tuple[MockUpstream, MockUpstream]) -> dict[str, Any]:
    config = proxy_config(*upstreams, events={"redis_stream": {"enabled": True}})
    config["experiments"][EXPERIMENT]["rollout_plan"] = PLAN
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("plan")


@pytest.fixture(scope="module")
def store_url(workdir: Path) -> str:
    """A migrated SQLite store (empty): the controller's dry run reads its evidence from it."""
    url = f"sqlite:///{workdir / 'store.db'}"
    engine = engine_for(url)
    migrate(engine)
    engine.dispose()
    return url


@pytest.fixture(scope="module")
def config_file(workdir: Path, upstreams: tuple[MockUpstream, MockUpstream]) -> Path:
    path = workdir / "plan.yaml"
    path.write_text(yaml.safe_dump(plan_config(upstreams)))
    return path


@pytest.fixture(scope="module")
def rdb(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="module")
def plan_proxy(
    upstreams: tuple[MockUpstream, MockUpstream], redis_server: RedisServer, rdb: redis.Redis, workdir: Path,
    store_url: str,
) -> Iterator[ProxyServer]:  # fmt: skip
    server = ProxyServer(plan_config(upstreams), workdir, redis_server.url, extra_env={"ABPROXY_STORE_URL": store_url})
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def proxy(plan_proxy: ProxyServer, rdb: redis.Redis) -> ProxyServer:
    """The module's proxy on an empty Redis: back to the config default (0 %) first, then flushed."""
    plan_proxy.set_percent(0)
    rdb.flushall()
    return plan_proxy


@pytest.fixture()
def admin(proxy: ProxyServer) -> Iterator[httpx.Client]:
    with proxy.admin() as client:
        yield client


@pytest.fixture()
def env(redis_server: RedisServer, store_url: str) -> dict[str, str]:
    """What `abproxy rollout plan` and `abproxy controller` read besides the config."""
    return {"REDIS_URL": redis_server.url, "ABPROXY_STORE_URL": store_url}


# -- helpers -------------------------------------------------------------------------------
def _post(client: httpx.Client, action: str, reason: str, actor: str | None = None) -> httpx.Response:
    headers = {"X-Abproxy-Actor": actor} if actor else {}
    return client.post(f"{PLAN_URL}/{action}", json={"reason": reason}, headers=headers)


def _act(client: httpx.Client, action: str, reason: str, actor: str | None = None) -> dict[str, Any]:
    response = _post(client, action, reason, actor)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["experiment"] == EXPERIMENT
    state: dict[str, Any] = body["state"]
    return state


def _plan(client: httpx.Client) -> dict[str, Any]:
    response = client.get(PLAN_URL)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _live(client: httpx.Client) -> float:
    response = client.get(f"/admin/experiments/{EXPERIMENT}")
    assert response.status_code == 200, response.text
    return float(response.json()["percent"])


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


def _stored(rdb: redis.Redis) -> tuple[Any, ...]:
    """Everything a plan action may write: plan hash, decisions, rollout hash, audit."""
    return (rdb.hgetall(plan_key(EXPERIMENT)), rdb.xlen(decisions_key(EXPERIMENT)),
            rdb.hgetall(state_key(EXPERIMENT)), rdb.xlen(audit_key(EXPERIMENT)))  # fmt: skip


def _gauge(proxy: ProxyServer) -> float:
    """The percent this proxy process routes by (its in-memory state, exported)."""
    for family in text_string_to_metric_families(proxy.metrics_text()):
        for sample in family.samples:
            if sample.name == "abproxy_rollout_percent" and sample.labels == {"experiment": EXPERIMENT}:
                return float(sample.value)
    raise AssertionError("abproxy_rollout_percent not exposed")


def _variant(proxy: ProxyServer, user: str) -> str:
    response = httpx.post(
        f"{proxy.url}/v1/chat/completions", timeout=10,
        headers={"Authorization": "Bearer sk-client", "X-User-Id": user},
        json={"model": EXPERIMENT, "messages": [{"role": "user", "content": "hi"}]},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    return response.headers["x-abproxy-variant"]


def _cli(*args: str, env: dict[str, str] | None = None) -> Result:
    clean: dict[str, str | None] = {"ABPROXY_URL": None, "ABPROXY_ADMIN_TOKEN": None, "ABPROXY_CONFIG": None,
                                    "REDIS_URL": None, "ABPROXY_STORE_URL": None, "USER": "ci-bot"}  # fmt: skip
    return CliRunner().invoke(main, list(args), env={**clean, **(env or {})})


def _rows(text: str) -> list[list[str]]:
    """The cells of every table row Rich drew (header rows included)."""
    return [[cell.strip() for cell in line.strip()[1:-1].replace("┃", "│").split("│")]
            for line in text.splitlines() if line.strip()[:1] in ("│", "┃")]  # fmt: skip


def _flat(text: str) -> str:
    """Rich wraps long lines at the console width: compare with whitespace collapsed."""
    return " ".join(text.split())


# -- the admin API ---------------------------------------------------------------------------
class TestPlanAPI:
    def test_full_lifecycle(self, admin: httpx.Client) -> None:
        """resume starts, pause/resume toggle, promote walks canary -> beta -> ga, abort drops to 0 %;
        actions that do not apply are 409 plan_action_refused; the decisions are listed newest first."""
        actor = "dana"
        empty = _plan(admin)
        assert empty["experiment"] == EXPERIMENT
        assert empty["state"] is None and empty["decisions"] == []
        assert [(p["name"], p["percent"], p["min_duration"]) for p in empty["phases"]] == [
            ("canary", 10, 172800.0), ("beta", 50, 0.0), ("ga", 100, 0.0)]  # fmt: skip

        state = _act(admin, "resume", "r1 start", actor)
        assert (state["phase"], state["phase_name"], state["status"]) == (0, "canary", "running")
        assert state["updated_by"] == actor
        assert _live(admin) == 10

        assert _act(admin, "pause", "r2 pause", actor)["status"] == "paused"
        assert _live(admin) == 10  # pausing keeps the percent

        error = _error(_post(admin, "pause", "r3 again", actor), 409, "plan_action_refused")
        assert error["param"] == "action" and "paused" in error["message"]

        state = _act(admin, "resume", "r4 resume", actor)
        assert (state["phase_name"], state["status"]) == ("canary", "running")
        assert _live(admin) == 10

        state = _act(admin, "promote", "r5 to beta", actor)
        assert (state["phase"], state["phase_name"], state["status"]) == (1, "beta", "running")
        assert _live(admin) == 50

        state = _act(admin, "promote", "r6 to ga", actor)
        assert (state["phase"], state["phase_name"], state["status"]) == (2, "ga", "completed")
        assert _live(admin) == 100

        error = _error(_post(admin, "promote", "r7 beyond", actor), 409, "plan_action_refused")
        assert "completed" in error["message"]

        state = _act(admin, "abort", "r8 abort", actor)
        assert (state["phase_name"], state["status"]) == ("ga", "aborted")
        assert _live(admin) == 0

        plan = _plan(admin)
        assert plan["state"]["status"] == "aborted" and plan["state"]["reason"] == f"abort by {actor}: r8 abort"
        decisions = plan["decisions"]
        assert [d["action"] for d in decisions] == ["abort", "complete", "promote", "resume", "pause", "start"]
        assert {d["by"] for d in decisions} == {actor}
        assert [d["reason"].rsplit(": ", 1)[-1] for d in decisions] == [
            "r8 abort", "r6 to ga", "r5 to beta", "r4 resume", "r2 pause", "r1 start"]  # fmt: skip
        assert [(d["percent_from"], d["percent_to"]) for d in decisions] == [
            (100, 0), (50, 100), (10, 50), (10, 10), (10, 10), (0, 10)]  # fmt: skip
        assert [d["status"] for d in decisions] == ["aborted", "completed", "running", "running", "paused", "running"]
        assert decisions[-1]["phase_from"] is None and decisions[0]["phase_to"] == "ga"
        assert [d["at"] for d in decisions] == sorted((d["at"] for d in decisions), reverse=True)
        assert len(_plan_limited(admin, 2)) == 2

        # Every percent move is in the rollout audit too, by the same person.
        entries = admin.get(f"/admin/experiments/{EXPERIMENT}/audit").json()["entries"]
        assert [(e["from"], e["to"], e["by"]) for e in entries] == [
            (100, 0, actor), (50, 100, actor), (10, 50, actor), (0, 10, actor)]  # fmt: skip

    def test_abort_then_resume_restarts_at_the_first_phase(self, admin: httpx.Client) -> None:
        """After an abort, abort is refused, and resume re-enters the first phase at its percent."""
        _act(admin, "promote", "start it")  # promote with no state starts the plan
        _act(admin, "promote", "beta")
        assert _act(admin, "abort", "pager")["status"] == "aborted"
        _error(_post(admin, "abort", "again"), 409, "plan_action_refused")
        state = _act(admin, "resume", "fixed")
        assert (state["phase_name"], state["status"]) == ("canary", "running")
        assert _live(admin) == 10
        # No X-Abproxy-Actor header: the actor is "admin".
        assert {d["by"] for d in _plan(admin)["decisions"]} == {"admin"}

    def test_pause_before_start_is_refused(self, admin: httpx.Client, rdb: redis.Redis) -> None:
        before = _stored(rdb)
        error = _error(_post(admin, "pause", "nothing yet"), 409, "plan_action_refused")
        assert "not started" in error["message"]
        assert _stored(rdb) == before

    def test_unknown_action_is_404(self, admin: httpx.Client, rdb: redis.Redis) -> None:
        _act(admin, "resume", "start")
        before = _stored(rdb)
        error = _error(_post(admin, "explode", "why not"), 404, "unknown_action")
        assert error["param"] == "action"
        _error(admin.post("/admin/experiments/nope/plan/pause", json={"reason": "x"}), 404, "experiment_not_found")
        _error(admin.get("/admin/experiments/nope/plan"), 404, "experiment_not_found")
        assert _stored(rdb) == before

    def test_without_a_valid_token_is_401(self, proxy: ProxyServer, admin: httpx.Client, rdb: redis.Redis) -> None:
        _act(admin, "resume", "start")
        before = _stored(rdb)
        with httpx.Client(base_url=proxy.url, timeout=10) as anonymous:
            _error(anonymous.post(f"{PLAN_URL}/abort", json={"reason": "x"}), 401, "invalid_admin_token")
            _error(anonymous.post(f"{PLAN_URL}/abort", content=b"{"), 401, "invalid_admin_token")  # auth first
            _error(anonymous.get(PLAN_URL), 401, "invalid_admin_token")
            wrong = {"Authorization": "Bearer wrong"}
            _error(anonymous.post(f"{PLAN_URL}/pause", json={"reason": "x"}, headers=wrong), 401,
                   "invalid_admin_token")  # fmt: skip
        assert _stored(rdb) == before

    @pytest.mark.parametrize(
        "body",
        [b"{}", b'{"reason": ""}', b'{"reason": null}', b'{"reason": 5}', b"{", b"",
         b'{"reason": "ok", "extra": 1}', json.dumps({"reason": "x" * 501}).encode()],
    )  # fmt: skip
    def test_invalid_body_is_422_and_changes_nothing(self, admin: httpx.Client, rdb: redis.Redis, body: bytes) -> None:
        _act(admin, "resume", "start")
        before = _stored(rdb)
        response = admin.post(f"{PLAN_URL}/abort", content=body, headers={"Content-Type": "application/json"})
        error = _error(response, 422, "invalid_value")
        assert error["type"] == "invalid_request_error"
        assert _stored(rdb) == before
        assert _live(admin) == 10

    def test_put_rollout_pauses_a_running_plan(self, admin: httpx.Client, proxy: ProxyServer) -> None:
        """A percent set by hand pauses a running plan (audited as a pause by that person); not otherwise."""
        answer = admin.put(f"/admin/experiments/{EXPERIMENT}/rollout", json={"percent": 5}).json()
        assert answer["plan_paused"] is False and answer["percent"] == 5
        assert _plan(admin)["state"] is None  # no plan state: nothing to pause, and none created

        _act(admin, "resume", "start")
        response = admin.put(f"/admin/experiments/{EXPERIMENT}/rollout", json={"percent": 20, "reason": "hotfix"},
                             headers={"X-Abproxy-Actor": "sam"})  # fmt: skip
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["plan_paused"] is True and answer["percent"] == 20 and answer["previous_percent"] == 10
        plan = _plan(admin)
        assert (plan["state"]["status"], plan["state"]["phase_name"], plan["state"]["updated_by"]) == (
            "paused", "canary", "sam")  # fmt: skip
        latest = plan["decisions"][0]
        assert (latest["action"], latest["by"], latest["status"]) == ("pause", "sam", "paused")
        assert "percent set by hand to 20" in latest["reason"]
        assert _live(admin) == 20 and _gauge(proxy) == 20

        count = len(plan["decisions"])
        answer = admin.put(f"/admin/experiments/{EXPERIMENT}/rollout", json={"percent": 30}).json()
        assert answer["plan_paused"] is False and answer["percent"] == 30
        plan = _plan(admin)
        assert plan["state"]["status"] == "paused" and len(plan["decisions"]) == count

    def test_put_rollout_on_a_completed_plan(self, admin: httpx.Client) -> None:
        _act(admin, "resume", "start")
        _act(admin, "promote", "beta")
        _act(admin, "promote", "ga")
        answer = admin.put(f"/admin/experiments/{EXPERIMENT}/rollout", json={"percent": 90}).json()
        assert answer["plan_paused"] is False
        assert _plan(admin)["state"]["status"] == "completed"

    def test_proxy_routes_by_the_phase_percent(self, admin: httpx.Client, proxy: ProxyServer) -> None:
        """After each move the live percent is the phase's, and a user between 10 % and 50 % moves to treatment
        on promotion to beta while one above 50 % stays in control."""
        users = [f"user-{i}" for i in range(200)]
        middle = next(u for u in users if threshold(10) <= bucket(SALT, u) < threshold(50))
        high = next(u for u in users if bucket(SALT, u) >= threshold(50))
        low = next(u for u in users if bucket(SALT, u) < threshold(10))

        _act(admin, "resume", "start")
        assert _live(admin) == 10 and _gauge(proxy) == 10
        assert [_variant(proxy, u) for u in (low, middle, high)] == ["treatment", "control", "control"]

        _act(admin, "promote", "beta")
        assert _live(admin) == 50 and _gauge(proxy) == 50
        assert _variant(proxy, middle) == choose_variant(bucket(SALT, middle), threshold(50)) == "treatment"
        assert _variant(proxy, high) == "control" and _variant(proxy, low) == "treatment"

        _act(admin, "abort", "stop")
        assert _live(admin) == 0 and _gauge(proxy) == 0
        assert [_variant(proxy, u) for u in (low, middle, high)] == ["control"] * 3


def _plan_limited(client: httpx.Client, limit: int) -> list[dict[str, Any]]:
    response = client.get(PLAN_URL, params={"limit": limit})
    assert response.status_code == 200, response.text
    decisions: list[dict[str, Any]] = response.json()["decisions"]
    return decisions


# -- the CLI ---------------------------------------------------------------------------------
class TestPlanCLI:
    def test_override_commands_print_the_new_state(self, proxy: ProxyServer, admin: httpx.Client) -> None:
        conn = ("--url", proxy.url, "--token", ADMIN_TOKEN)
        result = _cli("rollout", "resume", EXPERIMENT, "--reason", "go", *conn)
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == f"{EXPERIMENT}: resume -> phase canary, running"

        result = _cli("rollout", "pause", EXPERIMENT, "--reason", "x", *conn)
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == f"{EXPERIMENT}: pause -> phase canary, paused"

        result = _cli("rollout", "pause", EXPERIMENT, "--reason", "again", *conn)
        assert result.exit_code == 2
        assert result.stderr.strip() == "error 409: the plan is paused, not running"

        for action, shown in [("resume", "canary, running"), ("promote", "beta, running"), ("abort", "beta, aborted")]:
            result = _cli("rollout", action, EXPERIMENT, "--reason", f"cli {action}", *conn)
            assert result.exit_code == 0, result.output
            assert result.stdout.strip() == f"{EXPERIMENT}: {action} -> phase {shown}"

        decisions = _plan(admin)["decisions"]
        assert [d["action"] for d in decisions] == ["abort", "promote", "resume", "pause", "start"]
        assert {d["by"] for d in decisions} == {"ci-bot"}  # the CLI sends $USER as the actor
        assert decisions[0]["reason"] == "abort by ci-bot: cli abort"

    def test_missing_reason_exits_non_zero(self, proxy: ProxyServer, rdb: redis.Redis) -> None:
        before = _stored(rdb)
        result = _cli("rollout", "pause", EXPERIMENT, "--url", proxy.url, "--token", ADMIN_TOKEN)
        assert result.exit_code == 2
        assert "--reason" in result.stderr
        result = _cli("rollout", "resume", EXPERIMENT, "--reason", "", "--url", proxy.url, "--token", ADMIN_TOKEN)
        assert result.exit_code == 2 and result.stderr.startswith("error 422: reason:")
        assert _stored(rdb) == before

    def test_plan_shows_phases_state_and_decisions(
        self, admin: httpx.Client, config_file: Path, env: dict[str, str]
    ) -> None:
        result = _cli("rollout", "plan", EXPERIMENT, "--config", str(config_file), env=env)
        assert result.exit_code == 0, result.output
        assert [row[:3] for row in _rows(result.stdout)] == [
            ["phase", "percent", "min duration"], ["canary", "10%", "2d 0h"], ["beta", "50%", "0s"],
            ["ga", "100%", "0s"]]  # fmt: skip
        out = _flat(result.stdout)
        assert "not started" in out and "dry run" not in out

        _act(admin, "resume", "kick off", "dana")
        _act(admin, "pause", "looking at a dashboard", "dana")
        result = _cli("rollout", "plan", EXPERIMENT, "--config", str(config_file), env=env)
        assert result.exit_code == 0, result.output
        out = _flat(result.stdout)
        assert [row[0] for row in _rows(result.stdout)][:4] == ["phase", "▶ canary", "beta", "ga"]
        assert "phase canary, paused since" in out and "by dana: pause by dana: looking at a dashboard" in out
        assert "latest decisions" in out
        assert "resume by dana: kick off" in out and "0% -> 10%" in out
        assert out.index("looking at a dashboard") < out.index("kick off", out.index("latest decisions"))

    def test_plan_dry_run(self, admin: httpx.Client, config_file: Path, env: dict[str, str], rdb: redis.Redis) -> None:
        result = _cli("rollout", "plan", EXPERIMENT, "--dry-run", "--config", str(config_file), env=env)
        assert result.exit_code == 0, result.output
        assert "dry run: the controller would start: plan started: phase canary at 10 %" in _flat(result.stdout)
        assert rdb.exists(plan_key(EXPERIMENT)) == 0  # a dry run writes nothing

        _act(admin, "resume", "start")
        before = _stored(rdb)
        result = _cli("rollout", "plan", EXPERIMENT, "--dry-run", "--config", str(config_file), env=env)
        assert result.exit_code == 0, result.output
        out = _flat(result.stdout)
        assert "dry run: the controller would hold: holding in canary" in out
        assert "gates now" in out and "min_duration wait" in out
        assert _stored(rdb) == before

    def test_plan_unknown_experiment(self, config_file: Path, env: dict[str, str]) -> None:
        result = _cli("rollout", "plan", "nope", "--config", str(config_file), env=env)
        assert result.exit_code == 2 and "no experiment named 'nope'" in result.stderr


# -- `abproxy controller --once` and the webhook --------------------------------------------
class Hook:
    """A webhook on a free port that records the JSON bodies posted to it and answers `status`."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.content_types: list[str] = []
        self.status = 200
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                hook.bodies.append(json.loads(self.rfile.read(length)))
                hook.content_types.append(self.headers.get("Content-Type", ""))
                self.send_response(hook.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/secret"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def texts(self) -> list[str]:
        return [str(b["text"]) for b in self.bodies]


@pytest.fixture()
def hook() -> Iterator[Hook]:
    h = Hook()
    h.thread.start()
    yield h
    h.server.shutdown()
    h.server.server_close()


def _controller(config_file: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ABPROXY_") and k != "REDIS_URL"}
    argv = [sys.executable, "-m", "proxy", "controller", "--config", str(config_file), "--once"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, env={**clean, **env})


class TestControllerOnce:
    def test_starts_a_plan_not_started(
        self, proxy: ProxyServer, admin: httpx.Client, rdb: redis.Redis, config_file: Path, env: dict[str, str],
        hook: Hook,
    ) -> None:  # fmt: skip
        done = _controller(config_file, {**env, "ABPROXY_WEBHOOK_URL": hook.url})
        assert done.returncode == 0, done.stderr
        stored = rdb.hgetall(plan_key(EXPERIMENT))
        assert (stored["status"], stored["phase_name"], stored["updated_by"]) == ("running", "canary", "controller")
        assert float(rdb.hget(state_key(EXPERIMENT), "percent") or "nan") == 10
        assert rdb.exists("abproxy:controller:lock") == 0  # released on the way out
        eventually(lambda: _gauge_is(proxy, 10))  # the proxy follows the controller's write
        assert _plan(admin)["decisions"][0]["action"] == "start"
        assert len(hook.texts) == 1 and EXPERIMENT in hook.texts[0] and "start" in hook.texts[0]

        # The next round writes no transition: canary waits 2 days.
        done = _controller(config_file, env)
        assert done.returncode == 0, done.stderr
        assert rdb.hget(plan_key(EXPERIMENT), "rev") == stored["rev"]
        assert float(rdb.hget(state_key(EXPERIMENT), "percent") or "nan") == 10

    def test_leaves_an_aborted_plan_alone(
        self, admin: httpx.Client, rdb: redis.Redis, config_file: Path, env: dict[str, str]
    ) -> None:
        _act(admin, "abort", "not yet")  # abort before the start keeps the controller from starting it
        before = _stored(rdb)
        done = _controller(config_file, env)
        assert done.returncode == 0, done.stderr
        assert _stored(rdb) == before
        assert rdb.hget(plan_key(EXPERIMENT), "status") == "aborted"


def _gauge_is(proxy: ProxyServer, percent: float) -> None:
    assert _gauge(proxy) == percent


# -- the notifier ----------------------------------------------------------------------------
def _promotion() -> tuple[Decision, PlanState]:
    reason = "promoted canary -> beta: every gate passed"
    move = Transition(action="promote", phase=1, phase_name="beta", status="running", entered_at=1.0e9,
                      data_since=1.0e9, percent=50.0, by="controller", reason=reason)  # fmt: skip
    state = PlanState(EXPERIMENT, 1, "beta", "running", 1.0e9, 1.0e9, 3, 1.0e9, "controller", reason)
    return Decision("promote", reason, move), state


class TestNotifier:
    async def test_posts_slack_text(self, hook: Hook) -> None:
        decision, state = _promotion()
        notifier = Notifier(hook.url)
        await notifier.tell(EXPERIMENT, decision, state)
        assert notifier.failures == 0
        assert len(hook.bodies) == 1 and set(hook.bodies[0]) == {"text"}
        assert hook.content_types[0].startswith("application/json")
        text = hook.texts[0]
        assert f"*{EXPERIMENT}*" in text and "promote -> beta" in text and "(50 %)" in text
        assert decision.reason in text

    async def test_a_500_is_counted_not_raised(self, hook: Hook) -> None:
        hook.status = 500
        notifier = Notifier(hook.url)
        decision, state = _promotion()
        await notifier.tell(EXPERIMENT, decision, state)
        await notifier.tell(EXPERIMENT, decision, state)
        assert notifier.failures == 2 and len(hook.bodies) == 2

    async def test_unreachable_is_counted_not_raised(self, closed_port: int) -> None:
        notifier = Notifier(f"http://127.0.0.1:{closed_port}/hook", timeout_s=2)
        await notifier.tell(EXPERIMENT, *_promotion())
        assert notifier.failures == 1

    async def test_a_malformed_url_is_counted_not_raised(self, hook: Hook) -> None:
        notifier = Notifier(hook.url + "\n")
        await notifier.tell(EXPERIMENT, *_promotion())
        assert notifier.failures == 1
