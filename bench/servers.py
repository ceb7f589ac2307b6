"""The servers the benchmarks start: nginx as the fixed upstream, redis-server, the reference
forwarders and `python -m proxy serve` from a checkout, each pinned to its core."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.procs import LOAD_CPU, REPO, SUT_CPU, Processes, free_port, http, wait_http, wait_port

BENCH = REPO / "bench"
ADMIN_TOKEN = "bench-admin-token"
EXPERIMENT = "sales-companion"

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


def start_stream_upstream(
    procs: Processes, workdir: Path, *, name: str = "stream-upstream", cpu: str = LOAD_CPU
) -> tuple[int, Path]:
    """bench/stream_upstream.py (the SSE upstream of the streaming scenarios) pinned to `cpu`; returns
    its port and the file its counters go to on SIGUSR1."""
    port = free_port()
    stats = workdir / f"{name}-stats.json"
    argv = [sys.executable, str(BENCH / "stream_upstream.py"), "--port", str(port), "--stats", str(stats)]
    procs.start(name, argv, cpu=cpu)
    wait_port(port, procs=procs)
    return port, stats


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


def start_aiohttp(procs: Processes, upstream: str, name: str = "aiohttp") -> int:
    """The bare aiohttp forwarder (aiohttp server + client, uvloop), one process on the SUT core."""
    port = free_port()
    argv = [sys.executable, str(BENCH / "forwarders_ref.py"), "aiohttp", str(port)]
    procs.start(name, argv, cpu=SUT_CPU, env={"BENCH_UPSTREAM": upstream})
    wait_port(port, procs=procs)
    return port


def proxy_config(upstream: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The benchmark's experiment at 50 %; `overrides` are merged in, key by key (nested dicts too)."""
    pricing = {
        "base": {"input_per_1m": 0.15, "output_per_1m": 0.60},
        "ft": {"input_per_1m": 0.30, "output_per_1m": 1.20},
    }
    config: dict[str, Any] = {
        # Two upstream entries on the same server, so each arm has its own upstream as in production.
        "upstreams": {
            "base-upstream": {"base_url": upstream, "api_key_env": "BENCH_BASE_KEY", "timeout_s": 30},
            "finetuned-upstream": {"base_url": upstream, "api_key_env": "BENCH_FT_KEY", "timeout_s": 30},
        },
        "models": {
            "base": {"upstream": "base-upstream", "model": "gpt-4o-mini", "pricing": pricing["base"]},
            "finetuned": {
                "upstream": "finetuned-upstream",
                "model": "ft:gpt-4o-mini:acme:sales-v2:abc123",
                "pricing": pricing["ft"],
            },
        },
        "experiments": {
            EXPERIMENT: {
                "aliases": ["sales-companion", "gpt-4o-mini"],
                "control": "base",
                "treatment": "finetuned",
                "salt": "sales-v2",
                "rollout_percent": 50,
            },
        },
    }
    return _merged(config, overrides or {})


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def start_proxy(
    procs: Processes,
    workdir: Path,
    upstream: str,
    redis_port: int,
    *,
    name: str = "proxy",
    src: Path = REPO,
    overrides: dict[str, Any] | None = None,
    cpu: str = SUT_CPU,
) -> tuple[int, Path]:
    """`python -m proxy serve` from `src`, one worker pinned to `cpu`, routing at 50 % set through the
    admin API; returns its port and the file its stdout (the event stream) goes to."""
    port = free_port()
    config = workdir / f"{name}.yaml"
    config.write_text(yaml.safe_dump(proxy_config(upstream, overrides), sort_keys=False))
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
    procs.start(name, argv, cpu=cpu, env=env, stdout=events, cwd=src)
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


def gc_pauses(port: int) -> dict[str, dict[str, float]]:
    """The proxy's own record of its garbage-collector pauses (abproxy_gc_pause_seconds), per
    generation: count, total seconds, and the smallest bucket bound that holds every pause."""
    _, _, body = http("GET", f"http://127.0.0.1:{port}/metrics")
    samples = [
        sample
        for family in text_string_to_metric_families(body.decode())
        if family.name == "abproxy_gc_pause_seconds"
        for sample in family.samples
    ]
    found = {
        s.labels["generation"]: {"count": s.value, "sum_s": 0.0, "max_le_s": 0.0}
        for s in samples if s.name.endswith("_count")
    }  # fmt: skip
    for sample in samples:
        mine = found[sample.labels["generation"]]
        if sample.name.endswith("_sum"):
            mine["sum_s"] = sample.value
        elif sample.name.endswith("_bucket") and sample.value >= mine["count"]:
            bound = float(sample.labels["le"])
            mine["max_le_s"] = bound if not mine["max_le_s"] else min(mine["max_le_s"], bound)
    return found


def gc_note(port: int) -> str:
    """One line for a report: the proxy's full and young collections so far, and their pauses."""
    pauses = gc_pauses(port)
    none = {"count": 0.0, "sum_s": 0.0, "max_le_s": 0.0}
    full, young = pauses.get("2", none), pauses.get("0", none)
    tail = f"{young['count']:.0f} young ones, {young['sum_s'] * 1000:.0f} ms in all (abproxy_gc_pause_seconds)"
    if not full["count"]:
        return f"the proxy ran no full garbage collection after start-up; {tail}"
    return (
        f"the proxy ran {full['count']:.0f} full garbage collections after start-up, {full['sum_s'] * 1000:.0f} ms "
        f"in all, none longer than {full['max_le_s'] * 1000:g} ms; {tail}"
    )


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
