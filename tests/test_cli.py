"""proxy.cli: `abproxy assign` against a real Redis, `abproxy rollout` against a real proxy or respx."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import redis.asyncio as aioredis
import respx
from click.testing import CliRunner, Result

from proxy.assignment import bucket, choose_variant, threshold
from proxy.cli import main
from proxy.config import load_settings
from proxy.experiments import Router
from proxy.rollout import RolloutStore
from tests.harness import ADMIN_TOKEN, ProxyServer, RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / "config" / "local.yaml"
ABPROXY = Path(sys.executable).parent / "abproxy"  # the installed console script
SALT = "sales-v2"


def abproxy(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    executable = [str(ABPROXY)] if ABPROXY.exists() else [sys.executable, "-m", "proxy"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ABPROXY_") and k != "REDIS_URL"}
    return subprocess.run([*executable, *args], capture_output=True, text=True, timeout=30, env={**clean, **env})


def assign(*args: str, env: dict[str, str]) -> Result:
    """`abproxy assign` in-process (the console script itself is run once, below)."""
    return CliRunner().invoke(main, ["assign", *args], env={"ABPROXY_CONFIG": None, "REDIS_URL": None, **env})


def fields(line: str) -> dict[str, str]:
    """`key=value` tokens of an `abproxy assign` line."""
    return dict(token.split("=", 1) for token in line.split() if "=" in token)


def set_live_percent(redis_url: str, percent: float) -> None:
    """Write the percent the way the admin API does, through RolloutStore."""
    asyncio.run(_set_live_percent(redis_url, percent))


async def _set_live_percent(redis_url: str, percent: float) -> None:
    client = aioredis.from_url(redis_url, decode_responses=True)
    try:
        await RolloutStore(client, Router(load_settings(LOCAL, {})).defaults()).set_percent(
            "sales-companion", percent, by="test", reason=None
        )
    finally:
        await client.aclose()


def users_on_both_sides(percent: float) -> list[str]:
    cut = threshold(percent)
    users = [f"user-{i}" for i in range(40)]
    control = next(u for u in users if choose_variant(bucket(SALT, u), cut) == "control")
    treatment = next(u for u in users if choose_variant(bucket(SALT, u), cut) == "treatment")
    return [control, treatment, "josé", "用户:42"]


class TestAssign:
    def test_console_script(self, redis_url: str) -> None:
        """The installed `abproxy assign` prints the spec's bucket and the variant under the live percent."""
        set_live_percent(redis_url, 37.5)
        user = "josé"
        result = abproxy("assign", "sales-companion", user, "--config", str(LOCAL), env={"REDIS_URL": redis_url})
        assert result.returncode == 0, result.stderr
        out = fields(result.stdout)
        assert (out["experiment"], out["user"], out["bucket"]) == ("sales-companion", user, str(bucket(SALT, user)))
        assert out["variant"] == choose_variant(bucket(SALT, user), threshold(37.5))
        assert out["percent"] == "37.5" and "(live)" in result.stdout

    def test_prints_bucket_and_variant_under_live_percent(self, redis_url: str) -> None:
        """Users on both sides of the cut get their own bucket and the variant it implies at 37.5 %."""
        set_live_percent(redis_url, 37.5)
        for user in users_on_both_sides(37.5):
            result = assign("sales-companion", user, "--config", str(LOCAL), env={"REDIS_URL": redis_url})
            assert result.exit_code == 0, result.output
            out = fields(result.stdout)
            expected_bucket = bucket(SALT, user)
            assert out["bucket"] == str(expected_bucket)
            assert out["percent"] == "37.5" and "(live)" in result.stdout
            assert out["variant"] == choose_variant(expected_bucket, threshold(37.5))

    def test_follows_a_change(self, redis_url: str) -> None:
        """The same user flips variant when the live percent crosses their bucket."""
        user = "user-7"
        b = bucket(SALT, user)
        env = {"REDIS_URL": redis_url, "ABPROXY_CONFIG": str(LOCAL)}  # config from the environment this time
        set_live_percent(redis_url, b / 100)  # threshold == bucket: control
        assert fields(assign("sales-companion", user, env=env).stdout)["variant"] == "control"
        set_live_percent(redis_url, (b + 1) / 100)  # one bucket more: treatment
        assert fields(assign("sales-companion", user, env=env).stdout)["variant"] == "treatment"

    def test_config_default_when_redis_is_empty(self, redis_url: str) -> None:
        """With nothing in Redis, the config default is used and the output says so."""
        result = assign("sales-companion", "alice", "--config", str(LOCAL), env={"REDIS_URL": redis_url})
        assert result.exit_code == 0, result.output
        assert fields(result.stdout)["percent"] == "0"
        assert fields(result.stdout)["variant"] == "control"
        assert "config default" in result.stdout

    def test_unknown_experiment(self, redis_url: str) -> None:
        """An unknown experiment exits non-zero and lists the known ones."""
        result = assign("nope", "alice", "--config", str(LOCAL), env={"REDIS_URL": redis_url})
        assert result.exit_code != 0
        assert "unknown experiment 'nope'" in result.stderr and "sales-companion" in result.stderr

    def test_redis_unreachable(self) -> None:
        """With Redis down, assign exits non-zero with one line naming the Redis URL, no traceback."""
        url = f"redis://127.0.0.1:{free_port()}/0"
        result = abproxy("assign", "sales-companion", "alice", "--config", str(LOCAL), env={"REDIS_URL": url})
        assert result.returncode != 0
        assert result.stderr.strip() == f"cannot read the live percent: Redis at {url} is unreachable"


class TestRolloutAgainstAProxy:
    @pytest.fixture()
    def proxy(self, module_proxy: ProxyServer, redis_server: RedisServer) -> ProxyServer:
        # Back to the config default (0 %) first: the proxy restores a *different* percent that
        # vanishes from Redis (lost data), but lets one equal to the default go.
        module_proxy.set_percent(0)
        client = redis.Redis.from_url(redis_server.url)
        client.flushall()
        client.close()
        return module_proxy

    @pytest.fixture()
    def env(self, proxy: ProxyServer) -> dict[str, str]:
        return {"ABPROXY_URL": proxy.url, "ABPROXY_ADMIN_TOKEN": ADMIN_TOKEN, "USER": "ci-bot"}

    def test_set_then_get(self, proxy: ProxyServer, env: dict[str, str]) -> None:
        """`rollout set` changes the live percent (audited with the caller) and `rollout get` shows it."""
        result = abproxy("rollout", "set", "sales-companion", "25", "--reason", "canary", env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "sales-companion: 0% -> 25%"

        result = abproxy("rollout", "get", "sales-companion", env=env)
        assert result.returncode == 0, result.stderr
        assert "25%" in result.stdout and "ci-bot" in result.stdout and "canary" in result.stdout

        with proxy.admin() as admin:
            state = admin.get("/admin/experiments/sales-companion").json()
            entry = admin.get("/admin/experiments/sales-companion/audit").json()["entries"][0]
        assert (state["percent"], state["updated_by"]) == (25, "ci-bot")
        assert (entry["from"], entry["to"], entry["by"], entry["reason"]) == (0, 25, "ci-bot", "canary")

    def test_get_all_and_audit(self, proxy: ProxyServer, env: dict[str, str]) -> None:
        """`rollout get` with no name lists every experiment; `rollout audit` shows the history."""
        runner = CliRunner()
        assert runner.invoke(main, ["rollout", "set", "sales-companion", "12.5"], env=env).exit_code == 0
        listing = runner.invoke(main, ["rollout", "get"], env=env)
        assert listing.exit_code == 0, listing.output
        assert "sales-companion" in listing.stdout and "12.5%" in listing.stdout
        audit = runner.invoke(main, ["rollout", "audit", "sales-companion"], env=env)
        assert audit.exit_code == 0, audit.output
        assert "0%" in audit.stdout and "12.5%" in audit.stdout and "ci-bot" in audit.stdout

    @pytest.mark.parametrize(
        ("percent", "message"),
        [
            ("150", "error 422: percent: must be between 0 and 100"),
            ("12.345", "error 422: percent: must have at most two decimals"),
        ],
    )
    def test_bad_percent(self, proxy: ProxyServer, env: dict[str, str], percent: str, message: str) -> None:
        """An out-of-range or too-precise percent exits non-zero with the API's message, and changes nothing."""
        with proxy.admin() as admin:
            before = admin.get("/admin/experiments/sales-companion").json()["percent"]
        result = abproxy("rollout", "set", "sales-companion", percent, env=env)
        assert result.returncode != 0
        assert result.stderr.strip() == message
        with proxy.admin() as admin:
            assert admin.get("/admin/experiments/sales-companion").json()["percent"] == before

    def test_not_a_number(self, proxy: ProxyServer, env: dict[str, str]) -> None:
        """A percent that is not a number is refused by the CLI itself."""
        result = CliRunner().invoke(main, ["rollout", "set", "sales-companion", "ten"], env=env)
        assert result.exit_code == 2
        assert "PERCENT" in result.stderr and "ten" in result.stderr

    def test_missing_token(self, proxy: ProxyServer) -> None:
        """Without a token, rollout commands exit non-zero saying how to give one, before any request."""
        result = abproxy("rollout", "get", "sales-companion", env={"ABPROXY_URL": proxy.url})
        assert result.returncode != 0
        assert result.stderr.strip() == "no admin token: set ABPROXY_ADMIN_TOKEN or pass --token"

    def test_wrong_token(self, proxy: ProxyServer) -> None:
        """A wrong token is reported with the proxy's 401 message."""
        result = CliRunner().invoke(
            main, ["rollout", "set", "sales-companion", "5", "--token", "wrong"], env={"ABPROXY_URL": proxy.url}
        )
        assert result.exit_code != 0
        assert result.stderr.startswith("error 401: missing or invalid admin token")

    def test_unknown_experiment(self, proxy: ProxyServer, env: dict[str, str]) -> None:
        """An unknown experiment is reported with the proxy's 404 message."""
        result = CliRunner().invoke(main, ["rollout", "get", "nope"], env=env)
        assert result.exit_code != 0
        assert result.stderr.strip() == "error 404: no experiment named 'nope'"


API = "http://proxy.test"


class TestRolloutHTTPLayer:
    """The CLI's httpx client against respx: the errors a live proxy rarely produces on demand."""

    @pytest.fixture()
    def api(self) -> Iterator[respx.MockRouter]:
        with respx.mock(base_url=API, assert_all_called=False) as router:
            yield router

    def invoke(self, *args: str) -> Result:
        return CliRunner().invoke(main, ["rollout", *args], env={"ABPROXY_URL": API, "ABPROXY_ADMIN_TOKEN": "tok"})

    def test_store_unavailable(self, api: respx.MockRouter) -> None:
        """A 503 from the admin API (Redis down) is shown with its message and a non-zero exit."""
        body = {
            "error": {
                "message": "rollout store unavailable, nothing changed: Connection refused",
                "type": "service_unavailable",
                "param": None,
                "code": "rollout_store_unavailable",
            }
        }
        api.put("/admin/experiments/sales-companion/rollout").respond(503, json=body)
        result = self.invoke("set", "sales-companion", "30")
        assert result.exit_code == 2
        assert result.stderr.strip() == "error 503: rollout store unavailable, nothing changed: Connection refused"
        assert result.stdout == ""

    def test_non_json_error_body(self, api: respx.MockRouter) -> None:
        """An error that is not OpenAI-shaped (a load balancer page) is shown as its text."""
        api.get("/admin/experiments/sales-companion").respond(502, text="Bad Gateway")
        result = self.invoke("get", "sales-companion")
        assert result.exit_code == 2
        assert result.stderr.strip() == "error 502: Bad Gateway"

    @pytest.mark.parametrize("error", [httpx.ConnectError("Connection refused"), httpx.ReadTimeout("timed out")])
    def test_unreachable(self, api: respx.MockRouter, error: Exception) -> None:
        """A connection failure or timeout says the proxy cannot be reached at its URL, no traceback."""
        api.get("/admin/experiments").mock(side_effect=error)
        result = self.invoke("get")
        assert result.exit_code == 2
        assert result.stderr.startswith(f"cannot reach the proxy at {API}")
        assert "Traceback" not in result.output

    def test_request_carries_token_actor_and_body(self, api: respx.MockRouter, monkeypatch: pytest.MonkeyPatch) -> None:
        """`rollout set` sends the bearer token, the caller as actor, and percent plus reason as JSON."""
        monkeypatch.setenv("USER", "dana")
        route = api.put("/admin/experiments/sales-companion/rollout").respond(
            200, json={"previous_percent": 10.0, "percent": 20.0}
        )
        result = self.invoke("set", "sales-companion", "20", "--reason", "ramp")
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == "sales-companion: 10% -> 20%"
        request = route.calls.last.request
        assert request.headers["authorization"] == "Bearer tok"
        assert request.headers["x-abproxy-actor"] == "dana"
        assert httpx.Response(200, content=request.content).json() == {"percent": 20.0, "reason": "ramp"}

    def test_options_override_environment(self, api: respx.MockRouter) -> None:
        """--url and --token win over ABPROXY_URL and ABPROXY_ADMIN_TOKEN."""
        with respx.mock(base_url="http://other.test") as other:
            route = other.get("/admin/experiments/x").respond(
                404, json={"error": {"message": "no experiment named 'x'"}}
            )
            result = self.invoke("get", "x", "--url", "http://other.test", "--token", "from-option")
        assert route.calls.last.request.headers["authorization"] == "Bearer from-option"
        assert result.stderr.strip() == "error 404: no experiment named 'x'"
