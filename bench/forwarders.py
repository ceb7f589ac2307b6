"""Reproduce the "Speed" comparison of issue 3 in one run: the proxy against minimal forwarders.

    python bench/forwarders.py [--duration 10] [--rounds 3] [--concurrency 32] [--all]
                               [--extra-proxy LABEL=DIR ...]   # A/B a change in the same run

Layout on a 2-core machine (the spec's setup):
    core 0   the server under test, one uvicorn worker (uvloop, httptools, no access log)
    core 1   nginx (the fixed upstream: a static chat.completion) + wrk -t1 (+ redis-server)

Candidates, alternated round by round so drift on a noisy box hits all of them alike:
    reference      Starlette route + one pooled aiohttp session   (bench/forwarders_ref.py)
    proxy          `python -m proxy serve`: routing at 50 %, metrics, event log, real Redis
    raw-asgi       raw ASGI callable + aiohttp                     (bench/forwarders_ref.py)
    fastapi-route  FastAPI route + aiohttp, with --all             (bench/forwarders_ref.py)

Only ratios to the reference measured in this run are meaningful; absolute req/s move from run
to run. The one absolute figure is the added p50 at concurrency 1 (proxy minus nginx direct),
because the spec's target for it is absolute. Every process started here is in its own process
group and is stopped on exit, Ctrl-C or error. All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
LUA = BENCH / "chat.lua"
SUT_CPU, LOAD_CPU = "0", "1"
ADMIN_TOKEN = "bench-admin-token"
EXPERIMENT = "sales-companion"

# The spec's targets (issue 3, "Speed").
TARGET_RPS_RATIO = 0.75
TARGET_P99_RATIO = 1.6
TARGET_C1_ADDED_MS = 0.5

# What nginx answers: shaped like a real OpenAI chat.completion, usage included (the proxy
# parses it to count tokens and cost). No single quotes or `$`: it sits inside nginx quotes.
CHAT_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench0000000000000000000001",
        "object": "chat.completion",
        "created": 1735689600,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "The premium plan gives your team of twelve priority support and unlimited shared "
                    "workspaces, so nobody waits on a seat or a ticket. It also adds deal analytics that show "
                    "which opportunities are most likely to close this quarter.",
                    "refusal": None,
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 41,
            "completion_tokens": 48,
            "total_tokens": 89,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        },
        "service_tier": "default",
        "system_fingerprint": "fp_bench0001",
    },
    separators=(",", ":"),
)
assert "'" not in CHAT_COMPLETION and "$" not in CHAT_COMPLETION


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- processes ------------------------------------------------------------------------------
class Processes:
    """Every child in its own process group, stopped as a group (uvicorn, nginx's workers)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        cpu: str,
        env: dict[str, str] | None = None,
        stdout: Path | None = None,
        cwd: Path = REPO,
    ) -> subprocess.Popen[bytes]:
        out = (stdout or self.workdir / f"{name}.stdout").open("ab")
        err = (self.workdir / f"{name}.stderr").open("ab")
        proc = subprocess.Popen(
            ["taskset", "-c", cpu, *argv],
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()
        err.close()
        self.procs.append((name, proc))
        _GROUP_CORE[proc.pid] = cpu  # start_new_session: the pid is the group id
        return proc

    def pid(self, name: str) -> int:
        # taskset execs the command, so the pid is the server's own.
        return next(proc.pid for n, proc in self.procs if n == name)

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")

    def tail(self, name: str) -> str:
        path = self.workdir / f"{name}.stderr"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop_all(self) -> None:
        for name, proc in reversed(self.procs):
            _stop_group(name, proc)
        self.procs.clear()


def _stop_group(name: str, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the group, wait, then SIGKILL whatever is left of it (nginx's worker, threads).

    The group is signalled only while its leader is unreaped (a zombie at worst), so its id
    cannot have been reused by an unrelated process."""
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while not _exited(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    else:
        # Reaped already (it died during the run): kill any member it left behind.
        for pid in _group_members(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        log(f"  could not reap {name} (pid {proc.pid})")


def _exited(pid: int) -> bool:
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    members.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass
    return members


def wait_http(url: str, *, timeout: float = 20.0, procs: Processes | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if procs is not None:
            procs.check_alive()
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout:g}s")


def wait_port(port: int, *, timeout: float = 10.0, procs: Processes | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if procs is not None:
            procs.check_alive()
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} not open after {timeout:g}s")


def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


# -- the fixed upstream, redis, candidates ----------------------------------------------------
def start_nginx(procs: Processes, workdir: Path) -> int:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        raise RuntimeError("nginx not found: apt-get install -y nginx-light wrk")
    port = free_port()
    prefix = workdir / "nginx"
    for sub in ("", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    temp_paths = "\n".join(
        f"  {kind}_temp_path {prefix}/tmp/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  default_type application/json;
{temp_paths}
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{port};
    location = /v1/chat/completions {{
      add_header x-request-id $request_id;
      return 200 '{CHAT_COMPLETION}';
    }}
    location / {{ return 404 '{{"error":{{"message":"not found"}}}}'; }}
  }}
}}
"""
    )
    procs.start("nginx", [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")], cpu=LOAD_CPU)
    wait_port(port, procs=procs)
    return port


def start_redis(procs: Processes, workdir: Path) -> int:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: apt-get install -y redis-server")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(workdir)]
    procs.start("redis", argv, cpu=LOAD_CPU)
    wait_port(port, procs=procs)
    return port


UVICORN = ["--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]


def start_ref(procs: Processes, name: str, factory: str, upstream: str) -> int:
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "--factory", "--app-dir", str(BENCH), f"forwarders_ref:{factory}"]
    argv += ["--host", "127.0.0.1", "--port", str(port), *UVICORN]
    procs.start(name, argv, cpu=SUT_CPU, env={"BENCH_UPSTREAM": upstream})
    wait_port(port, procs=procs)
    return port


def proxy_config(upstream: str) -> str:
    # Two upstream entries on the same nginx, so each arm has its own upstream as in production.
    return f"""upstreams:
  base-upstream:      {{base_url: "{upstream}", api_key_env: BENCH_BASE_KEY, timeout_s: 30}}
  finetuned-upstream: {{base_url: "{upstream}", api_key_env: BENCH_FT_KEY, timeout_s: 30}}
models:
  base:      {{upstream: base-upstream, model: gpt-4o-mini, pricing: {{input_per_1m: 0.15, output_per_1m: 0.60}}}}
  finetuned: {{upstream: finetuned-upstream, model: "ft:gpt-4o-mini:acme:sales-v2:abc123",
               pricing: {{input_per_1m: 0.30, output_per_1m: 1.20}}}}
experiments:
  {EXPERIMENT}:
    aliases: [sales-companion, gpt-4o-mini]
    control: base
    treatment: finetuned
    salt: sales-v2
    rollout_percent: 50
"""


def start_proxy(
    procs: Processes, workdir: Path, upstream: str, redis_port: int, *, name: str = "proxy", src: Path = REPO
) -> tuple[int, Path]:
    port = free_port()
    config = workdir / f"{name}.yaml"
    config.write_text(proxy_config(upstream))
    events = workdir / f"{name}-events.jsonl"
    env = {
        # `python -m proxy` from `src`: this checkout, or another one given by --extra-proxy.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])),
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "ABPROXY_ADMIN_TOKEN": ADMIN_TOKEN,
        "BENCH_BASE_KEY": "sk-bench-base-000000000000",
        "BENCH_FT_KEY": "sk-bench-ft-000000000000",
    }
    argv = [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--log-level", "warning"]
    where = subprocess.run(
        [sys.executable, "-c", "import proxy; print(proxy.__file__)"],
        cwd=src,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()
    if not Path(where).resolve().is_relative_to(src.resolve()):
        raise RuntimeError(f"{name}: `import proxy` from {src} loads {where}")
    # stdout is the event stream (one JSON line per request): into a file, as a deployment would.
    procs.start(name, argv, cpu=SUT_CPU, env=env, stdout=events, cwd=src)
    wait_http(f"http://127.0.0.1:{port}/readyz", procs=procs)
    status, _, body = http(
        "PUT",
        f"http://127.0.0.1:{port}/admin/experiments/{EXPERIMENT}/rollout",
        {"percent": 50, "reason": "benchmark"},
        {"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    if status != 200:
        raise RuntimeError(f"setting the rollout to 50 % failed: {status} {body[:300]!r}")
    return port, events


def sanity_check(name: str, port: int, *, proxy: bool) -> None:
    """One correct answer before any timing; for the proxy, both arms must be in use."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    variants: dict[str, int] = {}
    for i in range(200 if proxy else 1):
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "user": f"sanity-{i}"}
        status, headers, payload = http("POST", url, body)
        if status != 200 or json.loads(payload).get("usage", {}).get("total_tokens") != 89:
            raise RuntimeError(f"{name}: unexpected answer {status} {payload[:300]!r}")
        if proxy:
            variants[headers.get("x-abproxy-variant", "?")] = variants.get(headers.get("x-abproxy-variant", "?"), 0) + 1
    if proxy and not (40 <= variants.get("treatment", 0) <= 160 and 40 <= variants.get("control", 0) <= 160):
        raise RuntimeError(f"proxy: both arms should be used at 50 %, got {variants}")


# -- load -------------------------------------------------------------------------------------
@dataclass
class Sample:
    candidate: str
    round: int
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    # Server CPU per request: steadier than req/s when other work steals the server's core.
    cpu_us_per_req: float
    raw: dict[str, Any] = field(repr=False)


_BENCH_JSON = re.compile(r"^BENCH_JSON (\{.*\})$", re.M)


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of the whole process (all threads), from /proc."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def core_busy_seconds() -> dict[str, float]:
    """Busy time per core (everything but idle and iowait), from /proc/stat."""
    busy = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name[3:] in (SUT_CPU, LOAD_CPU) and name.startswith("cpu"):
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, values[:8])
            busy[name[3:]] = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return busy


_GROUP_CORE: dict[int, str] = {}  # process group -> the core its processes are pinned to


def own_cpu_seconds() -> dict[str, float]:
    """CPU used so far by this script's children, per core they are pinned to: every process in
    a group started by `Processes` (nginx's worker included), plus reaped children (wrk)."""
    own = {
        SUT_CPU: 0.0,
        LOAD_CPU: resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
        + resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime,
    }
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        core = _GROUP_CORE.get(int(fields[2]))  # pgrp
        if core is not None:
            own[core] += (int(fields[11]) + int(fields[12])) / tick
    return own


class CoreLoad:
    """How much of each core went to work other than this benchmark's: the noise gauge."""

    def __init__(self) -> None:
        self.busy, self.own, self.wall = core_busy_seconds(), own_cpu_seconds(), time.monotonic()

    def other(self) -> dict[str, float]:
        busy, own, wall = core_busy_seconds(), own_cpu_seconds(), time.monotonic() - self.wall
        return {
            core: round(max(0.0, (busy[core] - self.busy[core] - (own[core] - self.own[core])) / wall), 3)
            for core in (SUT_CPU, LOAD_CPU)
        }


def wrk(
    port: int, duration: int, connections: int, candidate: str = "", round_: int = 0, pid: int | None = None
) -> Sample:
    argv = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
    argv += ["-s", str(LUA), f"http://127.0.0.1:{port}/v1/chat/completions"]
    cpu_before, load = cpu_seconds(pid), CoreLoad()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=duration + 30)
    finally:
        _stop_group("wrk", proc, timeout=2)
    cpu = cpu_seconds(pid) - cpu_before
    other = load.other()
    text = out.decode(errors="replace")
    match = _BENCH_JSON.search(text)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {text[-1500:]} {err.decode(errors='replace')[-1500:]}")
    raw = json.loads(match.group(1))
    raw["server_cpu_s"] = cpu
    raw["other_load"] = other  # share of each core used by other jobs on the box during the run
    errors = raw["non2xx"] + raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    return Sample(
        candidate,
        round_,
        connections,
        raw["requests"] / (raw["duration_us"] / 1e6),
        raw["p50_us"] / 1000,
        raw["p99_us"] / 1000,
        errors,
        cpu * 1e6 / max(raw["requests"], 1),
        raw,
    )


# -- reporting --------------------------------------------------------------------------------
def summarise(samples: list[Sample], names: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        mine = [s for s in samples if s.candidate == name]
        out[name] = {
            "rps": statistics.median(s.rps for s in mine),
            "p50_ms": statistics.median(s.p50_ms for s in mine),
            "p99_ms": statistics.median(s.p99_ms for s in mine),
            "errors": sum(s.errors for s in mine),
            "cpu_us_per_req": statistics.median(s.cpu_us_per_req for s in mine),
            "other_load_max": max(max(s.raw["other_load"].values()) for s in mine),
            "rounds": [round(s.rps) for s in mine],
        }
    ref = out["reference"]
    for row in out.values():
        row["rps_ratio"] = row["rps"] / ref["rps"]
        row["p99_ratio"] = row["p99_ms"] / ref["p99_ms"]
        row["cpu_ratio"] = row["cpu_us_per_req"] / ref["cpu_us_per_req"]
    return out


def paired_ratios(samples: list[Sample], name: str) -> list[float]:
    """proxy/reference within each round: adjacent in time, so less exposed to drift."""
    by_round: dict[int, dict[str, float]] = {}
    for s in samples:
        by_round.setdefault(s.round, {})[s.candidate] = s.rps
    return [r[name] / r["reference"] for r in by_round.values() if name in r and "reference" in r]


def proxy_counts(port: int) -> dict[str, float]:
    """Requests the proxy itself counted per variant (abproxy_requests_total)."""
    _, _, body = http("GET", f"http://127.0.0.1:{port}/metrics")
    counts: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line.startswith("abproxy_requests_total{"):
            variant = re.search(r'variant="([^"]+)"', line)
            code = re.search(r'code="([^"]+)"', line)
            key = f"{variant.group(1) if variant else '?'}:{code.group(1) if code else '?'}"
            counts[key] = counts.get(key, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in (
        "uvicorn",
        "uvloop",
        "httptools",
        "starlette",
        "fastapi",
        "aiohttp",
        "orjson",
        "mmh3",
        "prometheus-client",
        "redis",
        "llm-ab-proxy",
    ):
        try:
            found[dist] = md.version(dist)
        except md.PackageNotFoundError:
            found[dist] = "-"
    for tool, flag in (("nginx", "-v"), ("redis-server", "--version")):
        try:
            done = subprocess.run([tool, flag], capture_output=True, text=True, timeout=5)
            found[tool] = (done.stdout + done.stderr).strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired, IndexError):
            found[tool] = "-"
    try:
        found["git"] = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        found["git"] = "-"
    return found


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(
    args: argparse.Namespace,
    table: dict[str, dict[str, Any]],
    samples: list[Sample],
    c1: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, bool]:
    print(
        f"\n## Forwarders at concurrency {args.concurrency} "
        f"(median of {args.rounds} alternating rounds of {args.duration:g}s; one uvicorn worker on core 0)\n"
    )
    print(
        "| candidate | req/s (median) | ratio to reference | p50 ms | p99 ms | p99 ratio | errors "
        "| server CPU us/req | CPU ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in table.items():
        print(
            f"| {name} | {row['rps']:,.0f} | {row['rps_ratio']:.2f} | {row['p50_ms']:.2f} | "
            f"{row['p99_ms']:.2f} | {row['p99_ratio']:.2f} | {row['errors']} | "
            f"{row['cpu_us_per_req']:.0f} | {row['cpu_ratio']:.2f} |"
        )
    noisy = max(row["other_load_max"] for row in table.values())
    if noisy > 0.05:
        print(
            f"\nNote: other jobs on this machine used up to {noisy:.0%} of a benchmark core during some runs; "
            "trust the per-round ratios over single numbers, and rerun on a quieter machine to confirm."
        )
    print()
    for name in (n for n in table if n != "reference"):
        print(f"{name}/reference per round: {', '.join(f'{r:.2f}' for r in paired_ratios(samples, name))}")
    print("req/s per round: " + "; ".join(f"{n} {row['rounds']}" for n, row in table.items()))
    print(
        f"\nAdded p50 latency at concurrency 1 (median of {args.rounds} rounds, p50 minus nginx direct "
        f"{c1['nginx_p50_ms']:.3f} ms): " + ", ".join(f"{n} +{ms:.3f} ms" for n, ms in c1["added_ms"].items())
    )
    print(
        f"proxy stdout (event stream) -> {extra['events_path']} ({extra['events_written']:,} events; "
        f"proxy counted {extra['proxy_requests']:,.0f} requests: {extra['proxy_by_variant']})"
    )

    proxy, ref = table["proxy"], table["reference"]
    errors = sum(s.errors for s in samples) + c1["errors"]
    checks = {
        "rps": proxy["rps_ratio"] >= TARGET_RPS_RATIO,
        "p99": proxy["p99_ratio"] <= TARGET_P99_RATIO,
        "errors": errors == 0,
        "c1": c1["proxy_added_ms"] < TARGET_C1_ADDED_MS,
    }
    print('\n## Targets (issue 3, "Speed")\n')
    print(f"- {verdict(checks['rps'])} proxy req/s >= {TARGET_RPS_RATIO} x reference: {proxy['rps_ratio']:.2f}")
    print(
        f"- {verdict(checks['p99'])} proxy p99 <= {TARGET_P99_RATIO} x reference p99: {proxy['p99_ratio']:.2f} "
        f"({proxy['p99_ms']:.2f} / {ref['p99_ms']:.2f} ms)"
    )
    print(f"- {verdict(checks['errors'])} no errors (non-2xx + socket errors, all runs): {errors}")
    print(f"- {verdict(checks['c1'])} added p50 at c=1 < {TARGET_C1_ADDED_MS} ms: {c1['proxy_added_ms']:.3f} ms")
    return checks


# -- main -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run [10]")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds [3]")
    parser.add_argument("--concurrency", type=int, default=32, help="wrk connections [32]")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load before each measured run [2]")
    parser.add_argument("--c1-duration", type=int, default=None, help="seconds per c=1 run [min(duration, 5)]")
    parser.add_argument("--all", action="store_true", help="also measure fastapi-route")
    parser.add_argument(
        "--extra-proxy",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="also measure the proxy from another checkout DIR (to A/B a change in the same run)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with every process's output")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0 or args.concurrency < 1:
        parser.error("--rounds, --duration and --concurrency must be positive")
    if (os.cpu_count() or 1) < 2:
        parser.error("needs 2 cores: the server under test on core 0, nginx and wrk on core 1")
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found: apt-get install -y nginx-light wrk")
    c1_duration = args.c1_duration or min(args.duration, 5)

    # SIGTERM (e.g. from a CI timeout) unwinds through the finally below like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="abproxy-bench-"))
    procs = Processes(workdir)
    started = time.time()
    try:
        log(f"workdir {workdir}")
        nginx_port = start_nginx(procs, workdir)
        upstream = f"http://127.0.0.1:{nginx_port}/v1"
        redis_port = start_redis(procs, workdir)
        ports = {"reference": start_ref(procs, "reference", "reference", upstream)}
        ports["proxy"], events_path = start_proxy(procs, workdir, upstream, redis_port)
        for spec in args.extra_proxy:
            label, _, src = spec.partition("=")
            if not label or not src or not (Path(src) / "proxy" / "__init__.py").exists():
                parser.error(f"--extra-proxy {spec!r}: expected LABEL=DIR with DIR/proxy/__init__.py")
            ports[f"proxy@{label}"], _ = start_proxy(
                procs, workdir, upstream, redis_port, name=f"proxy@{label}", src=Path(src).resolve()
            )
        ports["raw-asgi"] = start_ref(procs, "raw-asgi", "raw_asgi", upstream)
        if args.all:
            ports["fastapi-route"] = start_ref(procs, "fastapi-route", "fastapi_route", upstream)
        names = list(ports)
        pids = {name: procs.pid(name) for name in names}
        for name, port in ports.items():
            sanity_check(name, port, proxy=name.startswith("proxy"))
        log(f"nginx :{nginx_port}  redis :{redis_port}  " + "  ".join(f"{n} :{p}" for n, p in ports.items()))

        samples: list[Sample] = []
        for round_ in range(1, args.rounds + 1):
            for name in names:
                procs.check_alive()
                if args.warmup > 0:
                    wrk(ports[name], args.warmup, args.concurrency)
                s = wrk(ports[name], args.duration, args.concurrency, name, round_, pids[name])
                samples.append(s)
                log(
                    f"round {round_} {name:14s} {s.rps:9,.0f} req/s  p50 {s.p50_ms:6.2f} ms  "
                    f"p99 {s.p99_ms:6.2f} ms  cpu {s.cpu_us_per_req:4.0f} us/req  errors {s.errors}  "
                    f"other load: core {SUT_CPU} {s.raw['other_load'][SUT_CPU]:.0%}, "
                    f"core {LOAD_CPU} {s.raw['other_load'][LOAD_CPU]:.0%}"
                )

        # Concurrency 1: what a single caller pays for the extra hop.
        c1_targets = {
            "nginx": nginx_port,
            **{n: p for n, p in ports.items() if n == "reference" or n.startswith("proxy")},
        }
        c1_samples: list[Sample] = []
        for round_ in range(1, args.rounds + 1):
            for name, port in c1_targets.items():
                procs.check_alive()
                wrk(port, 1, 1)
                s = wrk(port, c1_duration, 1, name, round_)
                c1_samples.append(s)
                log(f"c=1 round {round_} {name:10s} p50 {s.p50_ms:.3f} ms  p99 {s.p99_ms:.3f} ms  errors {s.errors}")
        p50 = {n: statistics.median(s.p50_ms for s in c1_samples if s.candidate == n) for n in c1_targets}
        c1 = {
            "nginx_p50_ms": p50["nginx"],
            "reference_p50_ms": p50["reference"],
            "proxy_p50_ms": p50["proxy"],
            "proxy_added_ms": p50["proxy"] - p50["nginx"],
            "reference_added_ms": p50["reference"] - p50["nginx"],
            "added_ms": {n: p50[n] - p50["nginx"] for n in c1_targets if n != "nginx"},
            "errors": sum(s.errors for s in c1_samples),
        }

        time.sleep(0.5)  # let the event log's 100 ms flush catch up
        counts = proxy_counts(ports["proxy"])
        extra = {
            "events_path": f"{events_path.name} in the workdir (stdout of `abproxy serve`)",
            "events_written": sum(1 for _ in events_path.open("rb")),
            "proxy_requests": sum(counts.values()),
            "proxy_by_variant": counts,
        }
        table = summarise(samples, names)
        checks = report(args, table, samples, c1, extra)

        results_dir = BENCH / "results"
        results_dir.mkdir(exist_ok=True)
        out = results_dir / f"forwarders-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}.json"
        out.write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "started": started,
                    "load_average_before_end": os.getloadavg(),
                    "versions": versions(),
                    "table": table,
                    "ratio_to_reference_per_round": {n: paired_ratios(samples, n) for n in table},
                    "c1": c1,
                    "targets": {
                        "rps_ratio": TARGET_RPS_RATIO,
                        "p99_ratio": TARGET_P99_RATIO,
                        "c1_added_ms": TARGET_C1_ADDED_MS,
                        "pass": checks,
                    },
                    "proxy": extra,
                    "samples": [asdict(s) for s in samples],
                    "c1_samples": [asdict(s) for s in c1_samples],
                },
                indent=2,
            )
        )
        print(f"\nJSON: {out.relative_to(REPO)}")
        return 0 if all(checks.values()) else 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except Exception:
        args.keep_logs = True  # a failure is explained by the processes' output
        raise
    finally:
        procs.stop_all()
        if args.keep_logs:
            log(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
