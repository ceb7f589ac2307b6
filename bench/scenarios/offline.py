"""Scenario 7: off the hot path, how cost grows with work.

    collector     a Redis Stream pre-filled with N of the proxy's own entries (request events and
                  their feedback), drained by `abproxy collect --once` on core 0 into SQLite and into
                  PostgreSQL (core 1); the store must then hold every request and feedback value
    report        `abproxy report` on 100k, 1M and 10M stored requests (bulk-loaded once, cached in
                  bench/results/cache/offline/), on core 0, against both back-ends
    feedback      POST /v1/feedback on the proxy (core 0) by wrk (core 1) at three concurrencies, next
                  to the same proxy's chat completions; every 202 must be an entry on the stream
    redis         what one Redis (core 1) takes in XADDs of a real event, from redis-benchmark on core 0
    ratings       Bradley-Terry with its bootstrap (the CLI's default 1,000 resamples) on 1k-30k votes
    offline eval  `abproxy eval run`'s runner against a mock upstream answering after 50 ms

Where a target is missed, the scenario says what bounds the figure: a py-spy profile of the
collector (bench/results/profiles/), PostgreSQL's own per-statement durations for the report.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis
import yaml

from bench.core import BENCH, Context, Result, Table, Target, fmt_int
from bench.offline_store import (
    DAY_S,
    DAYS,
    EXPERIMENT,
    PG_SETTINGS,
    T0,
    Postgres,
    postgres_cache_root,
    report_stores,
    stream_entries,
)
from bench.procs import LOAD_CPU, SUT_CPU, CoreLoad, free_port, http, log, wait_port
from bench.servers import proxy_config, sanity_check, start_nginx, start_proxy, start_redis
from bench.wrk import _BENCH_JSON, wrk
from proxy.config import CollectorConfig
from proxy.event_stream import DEFAULT_KEY
from proxy.ids import RequestIds
from proxy.store.db import head_revision

NAME = "offline"
TITLE = "7. Off the hot path: collector, report, feedback, ratings, offline eval"
PY = sys.executable
COLLECTOR_TARGET = 20_000  # events/s on one core
REPORT_TARGET_S = 10.0  # on 10M requests
METRICS = {
    "task_completed": {"type": "boolean", "higher_is_better": True},
    "csat": {"type": "float", "min": 1, "max": 5},
    "escalated": {"type": "boolean", "higher_is_better": False},
    "returned": {"type": "boolean", "level": "user"},
}
PROFILES = BENCH / "results" / "profiles"


def run(ctx: Context) -> Result:
    result = Result(NAME, TITLE)
    redis_port = start_redis(ctx.procs, ctx.workdir)
    config = ctx.path("abproxy.yaml")
    analysis = {"primary_metric": "task_completed", "mde": 0.02}
    config.write_text(yaml.safe_dump(proxy_config("http://127.0.0.1:9/v1", {
        "metrics": METRICS, "events": {"redis_stream": {"enabled": True}},
        "experiments": {EXPERIMENT: {"analysis": analysis}},
    }), sort_keys=False))  # fmt: skip
    # Slow statements (the report's) are logged with their duration: the per-query breakdown.
    pg = Postgres(ctx.procs, postgres_cache_root(), settings={**PG_SETTINGS, "log_min_duration_statement": "200"})
    pg.start()
    try:
        collector(ctx, result, config, redis_port, pg)
        report(ctx, result, config, pg)
    finally:
        pg.stop()
    xadd = redis_capacity(ctx, result, redis_port)
    feedback(ctx, result, redis_port)
    ratings(ctx, result)
    offline_eval(ctx, result)
    scale_out(ctx, result, xadd)
    return result


def _wait(ctx: Context, proc: subprocess.Popen[bytes]) -> None:
    """Wait for a one-shot process, then forget it: its exit is its end, not a crash to report."""
    proc.wait()
    ctx.procs.procs = [(name, p) for name, p in ctx.procs.procs if p is not proc]


# -- 1. the collector ---------------------------------------------------------------------------
def _collect(
    ctx: Context, config: Path, redis_port: int, url: str, name: str, profile: Path | None = None
) -> dict[str, Any]:
    """`abproxy collect --once` pinned to the core under test: wall, CPU and in-process drain time."""
    argv = [PY, "-m", "proxy", "collect", "--config", str(config), "--once", "--store", url, "--log-level", "info"]
    if profile is not None:
        argv = [_py_spy() or "py-spy", "record", "-r", "200", "-f", "raw", "-o", str(profile), "--", *argv]
    load, before = CoreLoad(), resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.monotonic()
    proc = ctx.procs.start(name, argv, cpu=SUT_CPU, env={"REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"})
    _wait(ctx, proc)
    wall = time.monotonic() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} exited with {proc.returncode}:\n{ctx.procs.tail(name)}")
    logs = [json.loads(line) for line in ctx.procs.tail(name).splitlines() if line.startswith("{")]
    stamps = {e["event"]: dt.datetime.fromisoformat(e["timestamp"]).timestamp() for e in logs if "timestamp" in e}
    stopped: dict[str, Any] = next((e for e in logs if e.get("event") == "collector_stopped"), {})
    (ctx.workdir / f"{name}.stderr").unlink(missing_ok=True)  # the next run's logs start clean
    return {
        "wall_s": wall, "cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
        "sys_s": after.ru_stime - before.ru_stime,  # the kernel's part: the database file's I/O and syncs
        "drain_s": stamps.get("collector_stopped", 0.0) - stamps.get("collector_started", 0.0),
        "counters": stopped, "other_load": load.other(),
    }  # fmt: skip


def _fresh_store(ctx: Context, pg: Postgres, store: str, name: str) -> str:
    if store == "sqlite":
        path = ctx.path(f"{name}.db")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        url = f"sqlite:///{path}"
    else:
        url = pg.recreate(name)
    subprocess.run([PY, "-m", "proxy", "store", "migrate", "--store", url], check=True, capture_output=True)
    return url


def _stored(url: str, pg: Postgres) -> tuple[int, int]:
    """Rows in requests and in feedback."""
    from sqlalchemy import func, select

    from proxy.store.db import engine_for
    from proxy.store.schema import feedback, requests

    engine = engine_for(url)
    try:
        with engine.connect() as conn:
            return (int(conn.execute(select(func.count()).select_from(requests)).scalar_one()),
                    int(conn.execute(select(func.count()).select_from(feedback)).scalar_one()))  # fmt: skip
    finally:
        engine.dispose()


def collector(ctx: Context, result: Result, config: Path, redis_port: int, pg: Postgres) -> None:
    sizes = [2_000, 5_000] if ctx.quick else [20_000, 100_000, 300_000]
    client = redis.Redis(port=redis_port)
    # Start-up (imports, migrate check, connections) measured on an empty stream, then taken out
    # of the per-event CPU: what is left is what each event costs.
    startup: dict[str, dict[str, Any]] = {}
    rows: list[list[str]] = []
    figures: dict[str, Any] = {}
    for store in ("sqlite", "postgresql"):
        client.delete(DEFAULT_KEY)
        startup[store] = {"cpu_s": 0.0} if ctx.quick else _collect(
            ctx, config, redis_port, _fresh_store(ctx, pg, store, "collector_empty"), f"collect-{store}-empty")
    for n in sizes:
        entries, n_requests, n_feedback = stream_entries(n)
        for store in ("sqlite", "postgresql"):
            client.delete(DEFAULT_KEY)
            _fill(client, entries)
            url = _fresh_store(ctx, pg, store, f"collector_{n}")
            m = _collect(ctx, config, redis_port, url, f"collect-{store}-{n}")
            stored = _stored(url, pg)
            pending = int(client.xpending(DEFAULT_KEY, "abproxy-collector")["pending"])
            ok = stored == (n_requests, n_feedback) and pending == 0 and m["counters"].get("processed") == len(entries)
            if not ok:
                result.errors += 1
                log(f"  collector {store} {n}: stored {stored}, expected {(n_requests, n_feedback)}, pending {pending}")
            # Below 0.05 s the difference is noise (quick runs): then the whole process's CPU.
            net = m["cpu_s"] - startup[store]["cpu_s"]
            per_event_cpu = (net if net >= 0.05 else m["cpu_s"]) / len(entries)
            m.update(events=len(entries), requests=n_requests, feedback=n_feedback, stored_ok=ok,
                     events_per_s=len(entries) / max(m["drain_s"], 1e-9), events_per_cpu_s=1 / per_event_cpu,
                     startup_cpu_s=startup[store]["cpu_s"])  # fmt: skip
            figures[f"{store}_{n}"] = m
            log(f"  collector {store:10s} {len(entries):>8,} events: drain {m['drain_s']:.2f} s = "
                f"{m['events_per_s']:,.0f}/s, {m['events_per_cpu_s']:,.0f} per CPU-s, "
                f"other load {m['other_load']}")  # fmt: skip
            rows.append([
                store, fmt_int(len(entries)), f"{n_requests:,} + {n_feedback:,}", f"{m['drain_s']:.2f}",
                fmt_int(m["events_per_s"]), f"{m['cpu_s']:.2f}", f"{m['sys_s'] / m['cpu_s']:.0%}",
                fmt_int(m["events_per_cpu_s"]),
                f"{1e6 / m['events_per_cpu_s']:.0f}", f"{m['other_load'][SUT_CPU]:.2f}", "yes" if ok else "NO",
            ])  # fmt: skip
    client.delete(DEFAULT_KEY)
    result.tables.append(Table(
        "Collector: `abproxy collect --once` draining N stream entries (core 0; PostgreSQL on core 1)",
        ["store", "events", "requests + feedback", "drain s", "events/s (wall)", "process CPU s", "of it kernel",
         "events per CPU-s", "µs CPU/event", "other load core 0", "all stored"],
        rows,
        note="Events per CPU-s: the collector's CPU time with its start-up (measured on an empty stream: "
        f"SQLite {startup['sqlite']['cpu_s']:.2f} s, PostgreSQL {startup['postgresql']['cpu_s']:.2f} s) taken out; "
        "what one core sustains when the collector has it to itself. Wall events/s also wait on the database's "
        "commit and on other jobs sharing core 0 (other load: share of the core they used). Batches of "
        f"{CollectorConfig().batch_size:,} (collector.batch_size), one transaction each, commits synced (SQLite "
        "synchronous=FULL, PostgreSQL "
        "synchronous_commit on).",
    ))  # fmt: skip
    result.figures["collector"] = figures
    largest = sizes[-1]
    for store, label in (("postgresql", "PostgreSQL"), ("sqlite", "SQLite")):
        m = figures[f"{store}_{largest}"]
        rate = m["events_per_cpu_s"]
        limit = ""
        if not ctx.quick and rate < COLLECTOR_TARGET:
            limit = _profile_collector(ctx, config, redis_port, pg, store, min(largest, 100_000))
        result.targets.append(Target(
            f"Collector ≥ {COLLECTOR_TARGET:,} events/s into {label} on one core",
            f"{rate:,.0f} events per CPU-s ({m['events_per_s']:,.0f}/s wall, {largest:,} events; "
            f"{m['sys_s'] / m['cpu_s']:.0%} of the CPU in the kernel)",
            None if ctx.quick else rate >= COLLECTOR_TARGET, limit,
        ))  # fmt: skip


def _fill(client: redis.Redis, entries: list[dict[Any, Any]]) -> None:
    pipe = client.pipeline(transaction=False)
    for i, fields in enumerate(entries, 1):
        pipe.xadd(DEFAULT_KEY, fields)
        if i % 1000 == 0:
            pipe.execute()
    pipe.execute()


def _py_spy() -> str | None:
    beside = Path(PY).parent / "py-spy"  # the venv's, installed by the `bench` extra
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _profile_collector(ctx: Context, config: Path, redis_port: int, pg: Postgres, store: str, n: int) -> str:
    """py-spy over a drain of `n` entries: where the collector's CPU goes, as the limit to report."""
    if _py_spy() is None:
        return "not profiled: py-spy missing (pip install -e '.[bench]')"
    entries, _, _ = stream_entries(n)
    client = redis.Redis(port=redis_port)
    client.delete(DEFAULT_KEY)
    _fill(client, entries)
    PROFILES.mkdir(parents=True, exist_ok=True)
    profile = PROFILES / f"offline-collector-{store}.txt"
    _collect(ctx, config, redis_port, _fresh_store(ctx, pg, store, "collector_profile"), f"profile-{store}", profile)
    client.delete(DEFAULT_KEY)
    return f"py-spy ({profile.relative_to(BENCH.parent)}): " + _profile_summary(profile)


def _profile_summary(path: Path) -> str:
    """Share of the drain's samples by where they land: the database driver's call (for SQLite, its
    own insert and synced commit, in-process; for PostgreSQL, the wait for the server), Redis, our
    code (decoding, checking and converting events), the rest."""
    buckets: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not any(f.startswith(("Collector.drain ", "_WorkItem.run ")) for f in frames):
            continue
        n = int(count)
        total += n
        leaf = frames[-1]
        names = [f.split(" (", 1)[0] for f in frames]
        if leaf.startswith(("DefaultDialect.do_execute", "DefaultDialect.do_commit")):
            buckets["the database driver's execute and commit"] += n
        elif any("psycopg" in f for f in frames[-3:]):
            buckets["psycopg (send, wait for PostgreSQL)"] += n
        elif leaf.startswith("_worker ") or "EpollSelector.select" in leaf:
            buckets["idle (waiting for the other thread or Redis)"] += n
        elif any("redis" in f for f in frames[-4:]):
            buckets["Redis reads and acks"] += n
        elif any(name in ("request_row", "feedback_row", "prepare") for name in names):
            buckets["checking and converting events (db.prepare)"] += n
        elif "decode_entry" in names:
            buckets["JSON decode (decode_entry)"] += n
        else:
            buckets["other (event loop, thread hand-off, SQLAlchemy)"] += n
    if not total:
        return "no samples"
    return "; ".join(f"{name} {100 * n / total:.0f} %" for name, n in buckets.most_common())


# -- 2. the report ------------------------------------------------------------------------------
def report(ctx: Context, result: Result, config: Path, pg: Postgres) -> None:
    sizes = [10_000, 100_000] if ctx.quick else [100_000, 1_000_000, 10_000_000]
    loading = time.monotonic()
    stores = report_stores(pg, sizes, head_revision())
    loaded_s = time.monotonic() - loading
    rows: list[list[str]] = []
    figures: dict[str, Any] = {}
    builds: dict[str, Any] = {}
    build_rows: list[list[str]] = []
    outputs: dict[tuple[int, str], dict[str, Any]] = {}
    for n in sizes:
        runs = 1 if ctx.quick else 3  # the median of three: the first run after a build may find caches cold
        for store in ("postgresql", "sqlite"):
            build = _rollup_once(ctx, config, pg, stores[n][store], f"rollup-{store}-{n}")
            builds[f"{store}_{n}"] = build
            log(f"  rollup {store:10s} {n:>10,} requests: {build['wall_s']:.1f} s (CPU {build['cpu_s']:.1f} s, "
                f"database core {build['db_cpu_s']:.1f} s)")  # fmt: skip
            build_rows.append([store, fmt_int(n), f"{build['wall_s']:.1f}", f"{build['cpu_s']:.1f}",
                               f"{build['db_cpu_s']:.1f}" if store == "postgresql" else "(in process)",
                               f"{1e6 * build['wall_s'] / n:.1f}"])  # fmt: skip
            samples = []
            for i in range(runs):
                log_mark = _pg_log_size(ctx, pg)
                sample, output = _report_once(ctx, config, pg, stores[n][store], f"report-{store}-{n}-{i}")
                if store == "postgresql":
                    sample["statements"] = _pg_statements(ctx, pg, log_mark)
                samples.append(sample)
                outputs[n, store] = output
                log(f"  report {store:10s} {n:>10,} requests: {sample['wall_s']:.2f} s (report CPU "
                    f"{sample['cpu_s']:.2f} s, database core CPU {sample['db_cpu_s']:.2f} s)")  # fmt: skip
            wall = statistics.median(s["wall_s"] for s in samples)
            cpu = statistics.median(s["cpu_s"] for s in samples)
            db = statistics.median(s["db_cpu_s"] for s in samples)
            figures[f"{store}_{n}"] = {"wall_s": wall, "cpu_s": cpu, "db_cpu_s": db, "runs": samples}
            rows.append([store, fmt_int(n), str(runs), f"{wall:.2f}", f"{cpu:.2f}",
                         f"{db:.2f}" if store == "postgresql" else "(in process)",
                         f"{1e6 * wall / n:.2f}", _arms(outputs[n, store])])  # fmt: skip
        if _summary(outputs[n, "postgresql"]) != _summary(outputs[n, "sqlite"]):
            result.errors += 1
            log(f"  report {n}: SQLite and PostgreSQL disagree: {_summary(outputs[n, 'sqlite'])} vs "
                f"{_summary(outputs[n, 'postgresql'])}")  # fmt: skip
    largest = sizes[-1]
    statements = figures[f"postgresql_{largest}"]["runs"][0].get("statements", [])
    breakdown = "; ".join(f"{s['what']} {s['ms'] / 1000:.1f} s" for s in statements) or "none over 200 ms"
    result.tables.append(Table(
        "`abproxy report` on N stored requests (report on core 0; PostgreSQL on core 1)",
        ["store", "requests", "runs", "median s", "report CPU s", "PostgreSQL CPU s", "µs per request",
         "users control / treatment (requests)"],
        rows,
        note=f"One experiment over {DAYS} days, {40} requests per user on average (heavy-tailed), a rollout raised "
        "from 10 % to 50 % on day 3, errors, streams, regenerations, episodes, request- and user-level feedback "
        "(`bench/offline_store.py`). Both back-ends must give the same arms, users and metrics (checked). "
        f"Stores loaded once and kept in bench/results/cache/offline/ (by size, data version and schema "
        f"revision; this run {'loaded for ' + format(loaded_s, '.0f') + ' s' if loaded_s > 5 else 'found them'}). "
        f"PostgreSQL's statements over 200 ms at {largest:,}: {breakdown}.",
    ))  # fmt: skip
    result.figures["report"] = figures
    result.figures["rollup_build"] = builds
    result.tables.append(Table(
        "The report's rollup: `abproxy store rollup --scan --all` rebuilding every day of N stored requests",
        ["store", "requests", "wall s", "process CPU s", "PostgreSQL CPU s", "µs per request"],
        build_rows,
        note=f"The {DAYS} days built one by one from the raw rows, as the collector builds each day once it is over "
        "(proxy/store/rollup.py); --scan first enters the days of the bulk-loaded rows (a full scan). What the "
        "report's time above no longer pays: it reads these aggregates, users x days, instead of the requests.",
    ))  # fmt: skip
    for store, label in (("postgresql", "PostgreSQL"), ("sqlite", "SQLite")):
        wall = figures[f"{store}_{largest}"]["wall_s"]
        limit = ""
        if not ctx.quick and wall >= REPORT_TARGET_S:
            limit = _report_limit(figures, store, largest, breakdown)
        result.targets.append(Target(
            f"`abproxy report` on 10M requests < {REPORT_TARGET_S:.0f} s ({label})",
            f"{wall:.1f} s on {largest:,}", None if ctx.quick else wall < REPORT_TARGET_S, limit,
        ))  # fmt: skip


def _report_once(
    ctx: Context, config: Path, pg: Postgres, url: str, name: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    argv = [PY, "-m", "proxy", "report", EXPERIMENT, "--config", str(config), "--format", "json", "--store", url,
            "--since", str(T0), "--until", str(T0 + DAYS * DAY_S)]  # fmt: skip
    out = ctx.path(f"{name}.json")
    sample = _timed(ctx, pg, argv, name, out)
    return sample, json.loads(out.read_text())


def _rollup_once(ctx: Context, config: Path, pg: Postgres, url: str, name: str) -> dict[str, Any]:
    """`abproxy store rollup` rebuilding every day: --scan enters the days of the bulk-loaded rows
    (loaded around the collector, which marks them in production), --all rebuilds the current ones."""
    argv = [PY, "-m", "proxy", "store", "rollup", "--config", str(config), "--store", url, "--scan", "--all",
            "--settle-s", "0"]  # fmt: skip
    return _timed(ctx, pg, argv, name, ctx.path(f"{name}.out"))


def _timed(ctx: Context, pg: Postgres, argv: list[str], name: str, out: Path) -> dict[str, Any]:
    """Run one command on the SUT core to its end: its wall and CPU time, and PostgreSQL's CPU meanwhile."""
    db_before, before = pg.cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.monotonic()
    proc = ctx.procs.start(name, argv, cpu=SUT_CPU, stdout=out)
    _wait(ctx, proc)
    wall = time.monotonic() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    db_cpu = pg.cpu_seconds() - db_before
    if proc.returncode != 0:
        raise RuntimeError(f"{name} exited with {proc.returncode}:\n{ctx.procs.tail(name)}")
    return {"wall_s": wall, "cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
            "db_cpu_s": db_cpu}  # fmt: skip


def _arms(output: dict[str, Any]) -> str:
    c, t = output["arms"]["control"], output["arms"]["treatment"]
    return f"{c['users']:,} / {t['users']:,} ({c['requests']:,} / {t['requests']:,})"


def _summary(output: dict[str, Any]) -> Any:
    """What both back-ends must agree on: arms, crossovers, SRM counts, each metric's values (rounded)."""
    metrics = {m["name"]: (round(m["control"]["value"], 9), round(m["treatment"]["value"], 9),
                           m["control"]["users"], m["treatment"]["users"]) for m in output["metrics"]}  # fmt: skip
    guardrails = {g["name"]: (round(g["control"], 6), round(g["treatment"], 6)) for g in output["guardrails"]}
    return (output["arms"], output["crossover_users"], output["srm"]["observed"], metrics, guardrails,
            output["verdict"]["decision"])  # fmt: skip


def _pg_log(ctx: Context, pg: Postgres) -> Path:
    return ctx.workdir / f"postgres-{pg.port}.stderr"


def _pg_log_size(ctx: Context, pg: Postgres) -> int:
    path = _pg_log(ctx, pg)
    return path.stat().st_size if path.exists() else 0


_DURATION = re.compile(r"duration: ([\d.]+) ms\s+(?:statement|execute [^:]*): (.*)", re.S)
_LOG_ENTRY = re.compile(r"^(?=\d{4}-\d\d-\d\d \d\d:)", re.M)


def _pg_statements(ctx: Context, pg: Postgres, offset: int) -> list[dict[str, Any]]:
    """PostgreSQL's own durations of the report's statements over 200 ms, named by what they load."""
    path = _pg_log(ctx, pg)
    if not path.exists():
        return []
    with path.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    found = []
    for entry in _LOG_ENTRY.split(text):
        match = _DURATION.search(entry)
        if match is not None:
            found.append({"ms": float(match.group(1)), "what": _statement_name(match.group(2))})
    return found


def _statement_name(sql: str) -> str:
    for table, what in (("rollup_episode_days", "episodes (per user-day, rollup)"),
                        ("rollup_episodes", "episodes continued from before the window (rollup)"),
                        ("rollup_requests", "per user-day requests (rollup)"),
                        ("rollup_feedback", "request feedback (rollup)"),
                        ("rollup_latency", "latency sample (rollup)")):  # fmt: skip
        if f"FROM {table}" in sql:
            return what
    if "min(requests.ts)" in sql and "rollout_percent" in sql:
        return "first exposures (GROUP BY user, variant, percent)"
    if "row_number()" in sql:
        return "first exposures (window over users)"
    if "FROM feedback" in sql and "JOIN" not in sql:
        return "user-level feedback"
    if "lead(" in sql:
        return "per user-day requests (window for regenerations)"
    if "episode_id" in sql and "GROUP BY" in sql:
        return "episodes"
    if "JOIN requests" in sql or "JOIN feedback" in sql:
        return "request feedback (join)"
    if "latency_ms, requests.ttft_ms" in sql:
        return "latencies of every answered request (to Python)"
    return sql[:60]


def _report_limit(figures: dict[str, Any], store: str, n: int, breakdown: str) -> str:
    m = figures[f"{store}_{n}"]
    if store == "postgresql":
        return (f"read from the rollup, the five reads at once on their own connections: PostgreSQL used "
                f"{m['db_cpu_s']:.1f} s of CPU against the report's {m['cpu_s']:.1f} s; per statement: {breakdown}. "
                "The report's one core is the limit: start-up and imports ~2 s, ~4M aggregated rows "
                "(users x days x metrics) to Arrow and to numpy, then the statistics (sequential tests over "
                "the daily looks, the latency guardrail's bootstrap)")
    return (f"SQLite is read by a child process through its ADBC driver, on the report's one core "
            f"({m['cpu_s']:.1f} s CPU with the child's): ~4M aggregated rows (users x days x metrics) read "
            "by SQLite in turn, then the statistics")


# -- 3. Redis: XADDs one server takes -----------------------------------------------------------
def redis_capacity(ctx: Context, result: Result, redis_port: int) -> dict[str, float]:
    """redis-benchmark (core 0) against the suite's redis-server (core 1): XADD of a real ~900-byte
    event with the proxy's MAXLEN ~, one at a time (as /v1/feedback does) and pipelined (as the
    proxy's event sink does, a batch per round trip)."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        result.notes.append("redis-benchmark not found: Redis XADD capacity not measured")
        return {}
    entries, _, _ = stream_entries(20)
    fields = max(entries, key=lambda e: len(e["event"]))  # a request event, the larger kind
    command = ["XADD", "bench:xadd", "MAXLEN", "~", "1000000", "*"]
    for key, value in fields.items():
        command += [str(key), value.decode() if isinstance(value, bytes) else str(value)]
    total = 20_000 if ctx.quick else 300_000
    rates: dict[str, float] = {}
    rows = []
    for label, pipeline, clients in (("one per round trip", 1, 32), ("pipelined, 100 per round trip", 100, 4)):
        argv = ["taskset", "-c", SUT_CPU, binary, "-p", str(redis_port), "-c", str(clients), "-P", str(pipeline),
                "-n", str(total), "--csv", *command]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        # The test's name is the command, quotes unescaped (the event is JSON): the figures are the last 7 fields.
        lines = done.stdout.strip().splitlines()
        figures = lines[-1].rsplit(",", 7)[1:] if len(lines) >= 2 and lines[0].startswith('"test","rps"') else []
        if done.returncode != 0 or len(figures) != 7:
            result.errors += 1
            log(f"  redis-benchmark failed: {done.stdout[-500:]} {done.stderr[-500:]}")
            continue
        rates[label] = float(figures[0].strip('"'))
        rows.append([label, str(clients), fmt_int(rates[label]), f"{len(fields['event']):,}"])
        log(f"  redis XADD {label}: {rates[label]:,.0f}/s")
    redis.Redis(port=redis_port).delete("bench:xadd")
    result.tables.append(Table("One Redis (core 1): XADD of a request event, from redis-benchmark on core 0",
                               ["mode", "clients", "XADD/s", "event bytes"], rows))  # fmt: skip
    result.figures["redis_xadd"] = rates
    return rates


# -- 4. the feedback endpoint -------------------------------------------------------------------
FEEDBACK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local ids = {%s}
local metrics = {'"metric":"task_completed","value":true', '"metric":"csat","value":4',
                 '"metric":"escalated","value":false'}
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, '{"request_id":"' .. ids[n %% #ids + 1] .. '",' .. metrics[n %% 3 + 1] .. '}')
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"p999_us":%%d,"mean_us":%%.1f,'
      .. '"max_us":%%d,"non2xx":%%d,"connect":%%d,"read":%%d,"write":%%d,"timeout":%%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.mean, latency.max, e.status, e.connect, e.read,
    e.write, e.timeout))
end
"""


def _wrk_feedback(port: int, script: Path, duration: int, connections: int) -> dict[str, Any]:
    argv = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s",
            str(script), f"http://127.0.0.1:{port}/v1/feedback"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    match = _BENCH_JSON.search(done.stdout)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed: {done.stdout[-1000:]} {done.stderr[-1000:]}")
    raw: dict[str, Any] = json.loads(match.group(1))
    raw["rps"] = raw["requests"] / (raw["duration_us"] / 1e6)
    raw["errors"] = raw["non2xx"] + raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    return raw


def feedback(ctx: Context, result: Result, redis_port: int) -> None:
    duration, concurrencies = (2, (32,)) if ctx.quick else (8, (8, 32, 128))
    upstream = f"http://127.0.0.1:{start_nginx(ctx.procs, ctx.workdir)}/v1"
    port, _events = start_proxy(ctx.procs, ctx.workdir, upstream, redis_port, name="proxy-feedback", overrides={
        "metrics": METRICS, "events": {"redis_stream": {"enabled": True}},
    })  # fmt: skip
    sanity_check("proxy", port, proxy=True)
    pid = ctx.procs.pid("proxy-feedback")
    # Ids as the proxy issues them (signed with the same key, from the same environment), fresh.
    ids = RequestIds(os.environ.get("ABPROXY_SIGNING_KEY", ""))
    issued = [ids.issue(time.time()) for _ in range(5000)]
    status, _, body = http("POST", f"http://127.0.0.1:{port}/v1/feedback",
                           {"request_id": issued[0], "metric": "csat", "value": 5})  # fmt: skip
    if status != 202:
        raise RuntimeError(f"feedback refused a signed id: {status} {body[:300]!r}")
    script = ctx.path("feedback.lua")
    script.write_text(FEEDBACK_LUA % ",".join(f'"{i}"' for i in issued))
    client = redis.Redis(port=redis_port)
    rows = []
    figures: dict[str, Any] = {}
    for connections in concurrencies:
        _wrk_feedback(port, script, 1, connections)  # warm-up
        time.sleep(0.3)  # the proxy's event sink flushes the chat events of the sanity check
        before_len, before_cpu = client.xlen(DEFAULT_KEY), _cpu(pid)
        refused_before = _refused(port)
        fb = _wrk_feedback(port, script, duration, connections)
        time.sleep(0.5)
        refused = {code: n - refused_before.get(code, 0) for code, n in _refused(port).items()
                   if n > refused_before.get(code, 0)}  # fmt: skip
        added = client.xlen(DEFAULT_KEY) - before_len
        fb_cpu = (_cpu(pid) - before_cpu) * 1e6 / max(fb["requests"], 1)
        chat = wrk(port, duration, connections, "chat", 0, pid)
        # Every 202 is one XADD; wrk may stop counting a few answers still in flight at its end.
        landed = fb["requests"] - fb["errors"] <= added <= fb["requests"] + connections
        if fb["errors"] or chat.errors or not landed:
            result.errors += fb["errors"] + chat.errors + (0 if landed else 1)
            log(f"  feedback c={connections}: errors {fb['errors']}, chat errors {chat.errors}, "
                f"stream +{added} for {fb['requests']} answers")  # fmt: skip
        figures[f"c{connections}"] = {"feedback": fb, "feedback_cpu_us": fb_cpu, "stream_added": added,
                                      "refused": refused,
                                      "chat_rps": chat.rps, "chat_p99_ms": chat.p99_ms,
                                      "chat_cpu_us": chat.cpu_us_per_req}  # fmt: skip
        log(f"  feedback c={connections}: {fb['rps']:,.0f} req/s p99 {fb['p99_us'] / 1000:.2f} ms; chat "
            f"{chat.rps:,.0f} req/s")  # fmt: skip
        rows.append([
            str(connections), fmt_int(fb["rps"]), f"{fb['p50_us'] / 1000:.2f}", f"{fb['p99_us'] / 1000:.2f}",
            fmt_int(fb_cpu), ", ".join(f"{n:,.0f}×{code}" for code, n in refused.items()) or "0",
            f"{added:,} / {fb['requests']:,}", fmt_int(chat.rps),
            f"{chat.p99_ms:.2f}", fmt_int(chat.cpu_us_per_req), f"{fb['rps'] / chat.rps:.2f}x",
        ])  # fmt: skip
    result.tables.append(Table(
        f"POST /v1/feedback vs chat completions on the same proxy (one worker, core 0; wrk {duration} s, core 1)",
        ["connections", "feedback req/s", "p50 ms", "p99 ms", "server CPU µs/req", "refused (status)",
         "stream entries / answers", "chat req/s", "chat p99 ms", "chat CPU µs/req", "feedback / chat"],
        rows,
        note="Feedback: a signed request id checked (no lookup), the value checked against its declaration, "
        "one awaited XADD; a 202 only once Redis holds it. Chat: the proxy's full path to nginx and back. "
        "Refused: the proxy's own count of error answers by status (abproxy_rejected_requests_total).",
    ))  # fmt: skip
    result.figures["feedback"] = figures
    errors = sum(f["feedback"]["errors"] for f in figures.values())
    limit = ""
    if errors:
        worst = max(figures, key=lambda c: figures[c]["feedback"]["errors"])
        limit = (f"at {worst[1:]} connections: {figures[worst]['refused']} refusals. A 503 is feedback_unavailable: "
                 "the XADD failed before Redis answered; with more than 100 posts in flight on one worker it is "
                 "redis-py's MaxConnectionsError (redis-py 8 caps a client's pool at 100 connections, and "
                 "each awaited XADD holds one), not Redis: see the report")
    result.targets.append(Target("Feedback endpoint: no errors, every 202 on the stream", f"{errors} errors",
                                 errors == 0, limit))  # fmt: skip


_REJECTED = re.compile(r'^abproxy_rejected_requests_total\{code="(\d+)"\} ([\d.e+]+)$', re.M)


def _refused(port: int) -> dict[str, float]:
    """The proxy's refusals so far, by status (its own counter)."""
    _, _, body = http("GET", f"http://127.0.0.1:{port}/metrics")
    return {code: float(n) for code, n in _REJECTED.findall(body.decode())}


def _cpu(pid: int) -> float:
    from bench.procs import cpu_seconds

    return cpu_seconds(pid)


# -- 5. Bradley-Terry ---------------------------------------------------------------------------
def _job(ctx: Context, name: str, args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    out = ctx.path(f"{name}.json")
    proc = ctx.procs.start(name, [PY, "-m", "bench.offline_jobs", *args], cpu=SUT_CPU, env=env, stdout=out)
    _wait(ctx, proc)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} exited with {proc.returncode}:\n{ctx.procs.tail(name)}")
    found: dict[str, Any] = json.loads(out.read_text().strip().splitlines()[-1])
    return found


def ratings(ctx: Context, result: Result) -> None:
    sizes = [1_000, 3_000] if ctx.quick else [1_000, 10_000, 30_000]
    rows = []
    figures = {}
    for n in sizes:
        m = _job(ctx, f"bt-{n}", ["bt", str(n), "1000"])
        figures[str(n)] = m
        if not m["ci_ok"] or m["order"][0] != "gpt-4o":
            result.errors += 1
        log(f"  Bradley-Terry {n:,} votes: {m['bt_s']:.3f} s; the whole study report {m['report_s']:.2f} s")
        rows.append([fmt_int(n), f"{m['bt_s']:.3f}", f"{m['bt_cpu_s']:.3f}", f"{m['report_s']:.2f}",
                     f"{m['report_cpu_s']:.2f}", " > ".join(m["order"])])  # fmt: skip
    result.tables.append(Table(
        "Human eval: Bradley-Terry with 1,000 bootstrap resamples (the CLI's default), five models (core 0)",
        ["votes", "Bradley-Terry s", "CPU s", "whole study report s", "CPU s", "ranking (true: gpt-4o > finetuned > "
         "claude-haiku > base > llama-70b)"],
        rows,
        note="The whole study report adds Elo over 1,000 vote orderings (a Python loop over the votes), pairwise "
        "win rates, agreement (Cohen, Fleiss) and position bias: `abproxy humaneval report` without the store read.",
    ))  # fmt: skip
    result.figures["bradley_terry"] = figures


# -- 6. offline eval ----------------------------------------------------------------------------
def offline_eval(ctx: Context, result: Result) -> None:
    sizes = [50, 100] if ctx.quick else [100, 400, 1000]
    latency_ms, concurrency = 50.0, 16
    port = free_port()
    ctx.procs.start("mock-upstream", [PY, "-m", "proxy", "mock-upstream", "--port", str(port), "--name", "mock",
                                      "--latency-ms", str(latency_ms)], cpu=LOAD_CPU)  # fmt: skip
    wait_port(port, procs=ctx.procs)
    config = ctx.path("eval.yaml")
    config.write_text(yaml.safe_dump(proxy_config(f"http://127.0.0.1:{port}/v1"), sort_keys=False))
    env = {"BENCH_BASE_KEY": "sk-bench-base-000000000000", "BENCH_FT_KEY": "sk-bench-ft-000000000000"}
    ideal = concurrency / (latency_ms / 1000)
    rows = []
    figures = {}
    for n in sizes:
        test = ctx.path(f"test-{n}.jsonl")
        with test.open("w") as f:
            for i in range(n):
                f.write(json.dumps({"messages": [
                    {"role": "system", "content": "You are Acme Cloud's sales assistant."},
                    {"role": "user", "content": f"Question {i}: which plan suits a team of {i % 50 + 2}?"},
                    {"role": "assistant", "content": f"The team plan, for {i % 50 + 2} seats."},
                ]}) + "\n")  # fmt: skip
        store = f"sqlite:///{ctx.path(f'eval-{n}.db')}"
        m = _job(ctx, f"eval-{n}", ["eval", str(config), str(test), store, str(concurrency)], env=env)
        figures[str(n)] = m
        if m["failed"] or m["answered"] != 2 * n:
            result.errors += max(m["failed"], 1)
        answers_s = m["answered"] / m["seconds"]
        log(f"  offline eval {n} items: {m['seconds']:.2f} s, {answers_s:,.0f} answers/s of {ideal:,.0f} ideal")
        rows.append([fmt_int(n), fmt_int(m["answered"]), f"{m['seconds']:.2f}", f"{n / m['seconds']:,.1f}",
                     f"{answers_s:,.0f}", f"{answers_s / ideal:.0%}",
                     f"{1e3 * m['cpu_s'] / max(m['answered'], 1):.2f}"])  # fmt: skip
    result.tables.append(Table(
        f"Offline eval: `abproxy eval run`'s runner, two models, concurrency {concurrency}, mock upstream answering "
        f"after {latency_ms:.0f} ms (core 1; runner on core 0)",
        ["items", "answers", "seconds", "items/s", "answers/s", "of ideal", "CPU ms/answer"],
        rows,
        note=f"Ideal: concurrency / latency = {ideal:,.0f} answers/s. Each answer is scored (exact match, "
        "similarity) and committed to the store on the writer thread before it counts as done.",
    ))  # fmt: skip
    result.figures["offline_eval"] = figures


# -- 7. scale-out -------------------------------------------------------------------------------
def scale_out(ctx: Context, result: Result, xadd: dict[str, float]) -> None:
    """The figures the README's scale-out paragraph quotes, computed from this run."""
    collector = result.figures.get("collector", {})
    report_figures = result.figures.get("report", {})
    if not collector or not xadd:
        return
    largest = max(int(k.rsplit("_", 1)[1]) for k in collector)
    pg_rate = collector[f"postgresql_{largest}"]["events_per_cpu_s"]
    piped = xadd.get("pipelined, 100 per round trip", 0.0)
    single = xadd.get("one per round trip", 0.0)
    per_day = 86_400 * min(piped, pg_rate)
    figures = {"redis_xadd_pipelined": piped, "redis_xadd_single": single, "collector_pg_events_per_cpu_s": pg_rate,
               "events_per_day_one_collector": 86_400 * pg_rate}  # fmt: skip
    result.figures["scale_out"] = figures
    report_line = ", ".join(f"{k.split('_')[0]} {int(k.rsplit('_', 1)[1]):,}: {v['wall_s']:.1f} s"
                            for k, v in report_figures.items())  # fmt: skip
    result.notes.append(
        f"Scale-out from these figures: one Redis took {piped:,.0f} XADD/s pipelined ({single:,.0f}/s one per "
        f"round trip); one collector process writes {pg_rate:,.0f} events per CPU-second into PostgreSQL, about "
        f"{86_400 * pg_rate / 1e9:.1f}B events a day per core; collectors scale by consumer-group members. "
        f"Sustained, the pipeline carries about {per_day / 1e9:.1f}B events a day before Redis or one collector "
        f"core saturates. Report times: {report_line}."
    )
