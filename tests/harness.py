"""Real processes for tests: redis-server, PostgreSQL, mock upstreams and proxies, each on a free port.

Nothing here is a fake: tests talk to the same binaries a user runs. Every process is started
with its output in a file under the test's tmp dir, so a failing test can show it.
"""

from __future__ import annotations

import glob
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import yaml
from psycopg import sql

ADMIN_TOKEN = "test-admin-token"
UPSTREAM_KEYS = {"base": "sk-base-secret-0001", "finetuned": "sk-ft-secret-0002"}


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, never one this test run handed out already.

    The kernel may offer a just-released port again; two callers that have not bound theirs yet
    (a proxy's port and its metrics_port) would then collide. Under pytest-xdist each worker
    draws from its own block below the kernel's ephemeral range (32768+), so two workers never
    hand out the same port and no outgoing connection takes one before its server binds it.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    while True:
        if worker.startswith("gw"):
            low = 10_000 + int(worker[2:]) % 4 * 5_000
            port = random.randrange(low, low + 5_000)
            if port in _HANDED_OUT or not _bindable(port):
                continue
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (OSError, httpx.HTTPError):
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def eventually(check: Callable[[], None], timeout: float = 5.0) -> None:
    """Retry an assertion: metrics and events are recorded just after the response is sent."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Process:
    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.env = {**os.environ, **(env or {})}
        self.stdout_path = log_dir / f"{name}.stdout"
        self.stderr_path = log_dir / f"{name}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self.stdout_path.open("ab"),
            stderr=self.stderr_path.open("ab"),
            env=self.env,
            start_new_session=True,
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self) -> str:
        out = self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""
        err = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return f"--- {self.name} stdout ---\n{out[-4000:]}\n--- {self.name} stderr ---\n{err[-4000:]}"


class RedisServer(Process):
    """A throwaway redis-server; stop() and start() again keep the same port (outage tests).

    By default nothing is persisted: a restart is empty. `extra_args` are appended to the command
    line (later options win), e.g. `["--appendonly", "yes", "--appendfsync", "always"]`; with
    them the server's files live in a directory of its own under `log_dir` (`data_dir`), which a
    restart (kill() or stop(), then start()) keeps, so it comes back with what it had persisted.
    """

    def __init__(self, log_dir: Path, extra_args: list[str] | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.data_dir: Path | None = None
        if extra_args:
            self.data_dir = log_dir / f"redis-{self.port}-data"
            self.data_dir.mkdir(parents=True, exist_ok=True)
            argv += ["--dir", str(self.data_dir), *extra_args]
        super().__init__(f"redis-{self.port}", argv, log_dir)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        super().start()
        wait_until(lambda: _port_open(self.port), what="redis-server")
        if self.data_dir is not None:  # it answers LOADING while it reads its files back: wait for a PING
            wait_until(self._answers, what="redis-server to answer")

    def _answers(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")


def postgres_bindir() -> Path | None:
    """Where initdb and postgres live: pg_config's answer, else the newest Debian install."""
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip()
        if found and Path(found, "initdb").exists():
            return Path(found)
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if candidates:
        return Path(candidates[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer(Process):
    """A throwaway PostgreSQL cluster: trust auth, no durability (fsync off), on 127.0.0.1.

    PostgreSQL refuses to run as root, so under root the cluster belongs to the `postgres`
    user, in a directory of its own under the system temp dir (pytest's are private to root).
    """

    def __init__(self, log_dir: Path, settings: dict[str, str] | None = None) -> None:
        """`settings` are extra `-c name=value` options, after (and so overriding) the defaults below."""
        bindir = postgres_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        self.bindir = bindir
        self.port = free_port()
        self.as_user: dict[str, Any] = {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}
        self.root = Path(tempfile.mkdtemp(prefix=f"pg-{self.port}-"))
        self.data = self.root / "data"
        argv = [str(bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}",
                "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                "-c", "max_connections=200"]  # fmt: skip
        for name, value in (settings or {}).items():
            argv += ["-c", f"{name}={value}"]
        super().__init__(f"postgres-{self.port}", argv, log_dir, {"LC_ALL": "C"})

    def _initdb(self) -> None:
        if self.as_user:
            shutil.chown(self.root, "postgres", "postgres")
        argv = [str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync",
                "-E", "UTF8", "--locale=C"]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, env=self.env, **self.as_user)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{done.stdout}\n{done.stderr}")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        """initdb on the first start; a later start() serves the same data on the same port."""
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self.stdout_path.open("ab"),
            stderr=self.stderr_path.open("ab"),
            env=self.env,
            start_new_session=True,
            **self.as_user,
        )
        try:
            wait_until(self._accepts, timeout=30, what=self.name)
        except TimeoutError:
            raise RuntimeError(f"{self.name} did not start\n{self.logs()}") from None

    def _accepts(self) -> bool:
        if not self.alive:
            raise RuntimeError(f"{self.name} exited\n{self.logs()}")
        try:
            with psycopg.connect(self._dsn("postgres"), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def stop(self, sig: int = signal.SIGINT, timeout: float = 10.0) -> None:
        """SIGINT is PostgreSQL's fast shutdown (SIGTERM would wait for every client to leave)."""
        super().stop(sig, timeout)

    def remove(self) -> None:
        """Stop, and delete the cluster's files."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def _dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _admin(self, statement: str, name: str, database: str = "postgres") -> None:
        with psycopg.connect(self._dsn(database), autocommit=True) as conn:
            conn.execute(sql.SQL(statement).format(sql.Identifier(name)))

    def create_database(self, name: str) -> str:
        self._admin("CREATE DATABASE {}", name)
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def drop_database(self, name: str) -> None:
        self._admin("DROP DATABASE IF EXISTS {} WITH (FORCE)", name)

    def create_schema(self, name: str, database: str = "postgres") -> str:
        """A URL whose connections use the new, empty schema `name` (search_path): faster than a database."""
        self._admin("CREATE SCHEMA {}", name, database)
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}?options=-csearch_path%3D{name}"

    def drop_schema(self, name: str, database: str = "postgres") -> None:
        self._admin("DROP SCHEMA IF EXISTS {} CASCADE", name, database)


class MockUpstream(Process):
    def __init__(self, name: str, log_dir: Path, *, api_key: str | None = None, **options: float | str | Path) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "proxy", "mock-upstream", "--port", str(self.port), "--name", name]
        for key, value in options.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        super().__init__(f"mock-{name}-{self.port}", argv, log_dir, {"MOCK_API_KEY": api_key} if api_key else None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        super().start()
        wait_until(lambda: _port_open(self.port), what=self.name)

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/mock/stats").json()  # type: ignore[no-any-return]

    def requests(self) -> list[dict[str, Any]]:
        return httpx.get(f"{self.url}/mock/requests").json()  # type: ignore[no-any-return]

    def reset(self) -> None:
        httpx.post(f"{self.url}/mock/reset")


def proxy_config(base: MockUpstream, finetuned: MockUpstream, **overrides: Any) -> dict[str, Any]:
    """The standard two-arm config used by the tests, pointing at two mock upstreams."""
    config: dict[str, Any] = {
        "upstreams": {
            "up-base": {"base_url": f"{base.url}/v1", "api_key_env": "BASE_KEY", "timeout_s": 5},
            "up-ft": {"base_url": f"{finetuned.url}/v1", "api_key_env": "FT_KEY", "timeout_s": 5},
        },
        "models": {
            "base": {
                "upstream": "up-base",
                "model": "gpt-4o-mini",
                "pricing": {"input_per_1m": 0.15, "output_per_1m": 0.60},
            },
            "finetuned": {
                "upstream": "up-ft",
                "model": "ft:gpt-4o-mini:acme:sales-v2:abc123",
                "pricing": {"input_per_1m": 0.30, "output_per_1m": 1.20},
            },
        },
        "experiments": {
            "sales-companion": {
                "aliases": ["sales-companion", "gpt-4o-mini"],
                "control": "base",
                "treatment": "finetuned",
                "salt": "sales-v2",
                "rollout_percent": 0,
            }
        },
        "rollout": {"resync_interval_s": 1.0, "redis_timeout_s": 0.5},
    }
    for key, value in overrides.items():
        config[key] = value
    return config


# Outcome metrics as the issue declares them; tests of feedback, the store and the report share them.
OUTCOME_METRICS: dict[str, Any] = {
    "task_completed": {"type": "boolean", "higher_is_better": True},
    "csat": {"type": "float", "min": 1, "max": 5},
    "escalated": {"type": "boolean", "higher_is_better": False},
    "turns": {"type": "float", "higher_is_better": False},
    "returned": {"type": "boolean", "level": "user"},
}
SIGNING_KEY = "test-signing-key"


def outcomes_config(base: MockUpstream, finetuned: MockUpstream, **overrides: Any) -> dict[str, Any]:
    """proxy_config with outcome metrics declared and events on the Redis Stream (feedback needs it)."""
    config = proxy_config(base, finetuned, metrics=OUTCOME_METRICS, events={"redis_stream": {"enabled": True}})
    config.update(overrides)
    return config


class ProxyServer(Process):
    def __init__(
        self,
        config: dict[str, Any],
        log_dir: Path,
        redis_url: str,
        *,
        admin_token: str | None = ADMIN_TOKEN,
        extra_env: dict[str, str] | None = None,
        workers: int = 1,
    ) -> None:
        self.port = free_port()
        config_file = log_dir / f"proxy-{self.port}.yaml"
        config_file.write_text(yaml.safe_dump(config))
        env = {"REDIS_URL": redis_url, "BASE_KEY": UPSTREAM_KEYS["base"], "FT_KEY": UPSTREAM_KEYS["finetuned"],
               "ABPROXY_SIGNING_KEY": SIGNING_KEY}  # fmt: skip
        if admin_token:
            env["ABPROXY_ADMIN_TOKEN"] = admin_token
        else:
            env["ABPROXY_ADMIN_TOKEN"] = ""
        env.update(extra_env or {})
        argv = [sys.executable, "-m", "proxy", "serve", "--config", str(config_file), "--host", "127.0.0.1",
                "--port", str(self.port), "--workers", str(workers), "--log-level", "info"]  # fmt: skip
        super().__init__(f"proxy-{self.port}", argv, log_dir, env)
        self.admin_token = admin_token

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait_ready: bool = True) -> None:
        super().start()
        try:
            wait_until(lambda: httpx.get(f"{self.url}/healthz").status_code == 200, timeout=20, what=self.name)
            if wait_ready:
                wait_until(lambda: httpx.get(f"{self.url}/readyz").status_code == 200, timeout=10, what="ready")
        except TimeoutError:
            raise RuntimeError(f"{self.name} did not start\n{self.logs()}") from None

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.admin_token}"}, timeout=10)

    def set_percent(
        self, percent: float, experiment: str = "sales-companion", reason: str | None = None
    ) -> dict[str, Any]:
        with self.admin() as client:
            body = {"percent": percent, "reason": reason}
            response = client.put(f"/admin/experiments/{experiment}/rollout", json=body)
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def metrics_text(self) -> str:
        return httpx.get(f"{self.url}/metrics").text

    def events(self) -> list[dict[str, Any]]:
        """The per-request JSON events the proxy wrote to stdout so far (flushed every 100 ms)."""
        import json

        lines = self.stdout_path.read_text().splitlines() if self.stdout_path.exists() else []
        return [json.loads(line) for line in lines if line.startswith("{")]


class PrometheusServer(Process):
    """A real Prometheus (Debian's `prometheus` package) scraping `targets` every second, with
    `rule_files` loaded and evaluated every second, in a throwaway TSDB under `log_dir`."""

    def __init__(self, log_dir: Path, targets: list[str], rule_files: list[Path], job: str = "abproxy") -> None:
        binary = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
        if binary is None:
            raise RuntimeError("prometheus is not installed (apt-get install -y --no-install-recommends prometheus)")
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}],
        }
        config_file = log_dir / f"prometheus-{self.port}.yml"
        config_file.write_text(yaml.safe_dump(config))
        argv = [binary, f"--config.file={config_file}", f"--storage.tsdb.path={log_dir / f'tsdb-{self.port}'}",
                f"--web.listen-address=127.0.0.1:{self.port}"]  # fmt: skip
        super().__init__(f"prometheus-{self.port}", argv, log_dir)
        self.http = httpx.Client(base_url=self.url, timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        super().start()
        try:
            wait_until(lambda: self.http.get("/-/ready").status_code == 200, timeout=30, what=self.name)
        except TimeoutError:
            raise RuntimeError(f"{self.name} did not become ready\n{self.logs()}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        super().stop(sig, timeout)
        self.http.close()

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>; raises with Prometheus's own error text unless the status is success."""
        response = self.http.get(f"/api/v1/{path}", params=params)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"/api/v1/{path} {params}: {response.status_code} {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query at now: the result vector, each item {"metric": {...}, "value": [t, "v"]}."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", f"{expr!r} returned a {data['resultType']}"
        return data["result"]  # type: ignore[no-any-return]


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`, in a /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
