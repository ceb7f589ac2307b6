"""Scenario 5: a long steady load with rollout changes: does anything grow or fail?

One proxy (core 0) takes an open-loop load at a steady rate from `bench.loadgen` (core 1, a fixed
pool of 16 keep-alive connections): three requests in four are plain chat completions answered
by nginx, one in four a stream, routed by a second experiment to the mock upstream
(`python -m proxy mock-upstream`, SSE with usage, no pacing, core 1). Every `change_s` the
rollout of both experiments moves (50 → 90 → 50 → 10 → 50 ...) through the admin API, so routing
flips for many users mid-load. Every `sample_s` the scenario reads the proxy's VmRSS and open
file descriptors from /proc, its asyncio task count (abproxy_asyncio_tasks) and the load's
cumulative counts.

Growth is measured after a warm-up (the first 60 s; a quick run: its first third), when
allocator arenas, connection pools and caches have reached their working size: RSS growth is
the last sample under load against the first sample after warm-up; fd and task growth compare
the median of the last three samples under load with the median of the first three after
warm-up (one sample can catch an upstream connection being replaced). One more sample, taken
after the load ended, is in the time series but not in these comparisons. Errors are every
failed or malformed answer, every failed rollout change, and every answered request missing
from the event log.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.core import Context, Result, Table, Target, fmt_int
from bench.procs import LOAD_CPU, CoreLoad, free_port, http, log, tcp_peer_ports, wait_port
from bench.servers import ADMIN_TOKEN, EXPERIMENT, gc_note, sanity_check, start_nginx, start_proxy, start_redis

NAME = "soak"
TITLE = "5. Soak: steady load with rollout changes"
OPTIONS = {
    "duration": "seconds under load [600; quick 24]",
    "rate": "requests per second [400; quick 300]",
    "change_s": "seconds between rollout changes [30; quick 5]",
    "sample_s": "seconds between samples [5; quick 2]",
}
STREAM_EXPERIMENT = "soak-stream"
PERCENTS = (90.0, 50.0, 10.0, 50.0)  # from the 50 % start_proxy sets, in turn


def run(ctx: Context) -> Result:
    quick = ctx.quick
    duration = float(ctx.options.get("duration", 24 if quick else 600))
    rate = float(ctx.options.get("rate", 300 if quick else 400))
    change_s = float(ctx.options.get("change_s", 5 if quick else 30))
    sample_s = float(ctx.options.get("sample_s", 2 if quick else 5))
    warmup_s = duration / 3 if quick else 60.0
    stream_share = 0.25

    nginx = start_nginx(ctx.procs, ctx.workdir)
    redis = start_redis(ctx.procs, ctx.workdir)
    mock = free_port()
    ctx.procs.start(
        "mock-stream",
        [sys.executable, "-m", "proxy", "mock-upstream", "--port", str(mock), "--name", "stream",
         "--tokens-per-s", "0"],
        cpu=LOAD_CPU,
    )
    wait_port(mock, procs=ctx.procs)
    overrides: dict[str, Any] = {
        "upstreams": {"stream-upstream": {"base_url": f"http://127.0.0.1:{mock}/v1", "timeout_s": 30}},
        "models": {
            "stream-base": {"upstream": "stream-upstream", "model": "mock-base"},
            "stream-ft": {"upstream": "stream-upstream", "model": "mock-ft"},
        },
        "experiments": {
            STREAM_EXPERIMENT: {
                "aliases": [STREAM_EXPERIMENT], "control": "stream-base", "treatment": "stream-ft",
                "rollout_percent": 50,
            },
        },
    }  # fmt: skip
    port, events = start_proxy(ctx.procs, ctx.workdir, f"http://127.0.0.1:{nginx}/v1", redis, overrides=overrides)
    sanity_check("proxy", port, proxy=True)
    sanity_requests = 200
    pid = ctx.procs.pid("proxy")
    upstream_ports = {nginx, mock}

    progress = ctx.workdir / "loadgen.jsonl"
    argv = [sys.executable, "-m", "bench.loadgen", "--port", str(port), "--rate", str(rate), "--duration",
            str(duration), "--connections", "16", "--stream-share", str(stream_share),
            "--stream-model", STREAM_EXPERIMENT, "--progress-s", "1"]  # fmt: skip
    log(f"soak: {duration:g} s at {rate:g} req/s ({stream_share:.0%} streams), rollout change every {change_s:g} s")
    loadgen = ctx.procs.start("loadgen", argv, cpu=LOAD_CPU, stdout=progress)
    t0, load = time.monotonic(), CoreLoad()

    samples: list[dict[str, Any]] = []
    changes: list[dict[str, Any]] = []
    change_errors = 0
    next_sample, next_change, step = t0, t0 + change_s, 0
    while loadgen.poll() is None:
        now = time.monotonic()
        if now >= next_change and now - t0 < duration:
            step += 1
            percent = PERCENTS[(step - 1) % len(PERCENTS)]
            for experiment in (EXPERIMENT, STREAM_EXPERIMENT):
                status, _, body = http(
                    "PUT", f"http://127.0.0.1:{port}/admin/experiments/{experiment}/rollout",
                    {"percent": percent, "reason": "soak"}, {"Authorization": f"Bearer {ADMIN_TOKEN}"},
                )  # fmt: skip
                changes.append({"t": round(now - t0, 2), "experiment": experiment, "percent": percent,
                                "status": status})  # fmt: skip
                if status != 200:
                    change_errors += 1
                    log(f"  rollout change failed: {status} {body[:200]!r}")
            next_change += change_s
        if now >= next_sample:
            samples.append(_sample(pid, port, progress, now - t0, upstream_ports))
            s = samples[-1]
            log(f"  t={s['t']:6.1f} s  rss {s['rss_kb'] / 1024:6.1f} MiB  fds {s['fds']:3d} "
                f"(upstream {s['upstream_conns']:2d})  tasks {s['tasks']:3.0f}  "
                f"ok {s['ok']:7d}  errors {s['errors']}")  # fmt: skip
            next_sample += sample_s
        for name, proc in ctx.procs.procs:
            if name != "loadgen" and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} during the soak:\n{ctx.procs.tail(name)}")
        time.sleep(0.05)
    final = _last_progress(progress, final=True)
    other = load.other()
    samples.append({**_sample(pid, port, progress, time.monotonic() - t0, upstream_ports), "after_load": True})
    answered = final["ok"] + sanity_requests
    deadline = time.monotonic() + 10  # events are flushed every 0.1 s; a loaded box may take longer
    while (events_written := sum(1 for _ in events.open("rb"))) < answered and time.monotonic() < deadline:
        time.sleep(0.2)
    events_missing = max(0, answered - events_written)
    result = _result(ctx, samples, changes, final, change_errors, events_written, answered, events_missing,
                     duration=duration, rate=rate, change_s=change_s, sample_s=sample_s, warmup_s=warmup_s,
                     stream_share=stream_share)  # fmt: skip
    result.figures["other_load"] = other
    result.notes.append(gc_note(port))
    result.notes.append(f"Other jobs' share of each core during the soak: core 0 {other['0']:.0%}, "
                        f"core 1 {other['1']:.0%}.")  # fmt: skip
    return result


def _sample(pid: int, port: int, progress: Path, t: float, upstream_ports: set[int]) -> dict[str, Any]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]
    fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    pooled = sum(1 for peer in tcp_peer_ports(pid) if peer in upstream_ports)
    _, _, body = http("GET", f"http://127.0.0.1:{port}/metrics")
    tasks = re.search(r"^abproxy_asyncio_tasks (\S+)$", body.decode(), re.M)
    counts = _last_progress(progress)
    return {
        "t": round(t, 2), "rss_kb": rss, "fds": fds, "upstream_conns": pooled, "other_fds": fds - pooled,
        "tasks": float(tasks.group(1)) if tasks else -1.0,
        "sent": counts.get("sent", 0), "ok": counts.get("ok", 0), "errors": counts.get("errors", 0),
        "late": counts.get("late", 0),
    }  # fmt: skip


def _last_progress(path: Path, *, final: bool = False) -> dict[str, Any]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("{")] if path.exists() else []
    last: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    if final and not last.get("final"):
        raise RuntimeError(f"the load generator ended without its summary: {lines[-3:]}")
    return last


def _result(
    ctx: Context, samples: list[dict[str, Any]], changes: list[dict[str, Any]], final: dict[str, Any],
    change_errors: int, events_written: int, answered: int, events_missing: int, *, duration: float, rate: float,
    change_s: float, sample_s: float, warmup_s: float, stream_share: float,
) -> Result:  # fmt: skip
    # Growth is judged on samples under load: the one taken after the load ended has no client sockets.
    after = [s for s in samples if s["t"] >= warmup_s and not s.get("after_load")] or samples[-1:]
    first, last = after[0], after[-1]
    rss_growth = (last["rss_kb"] - first["rss_kb"]) / first["rss_kb"]
    head, tail = after[:3], after[-3:]
    fd_growth = statistics.median(s["other_fds"] for s in tail) - statistics.median(s["other_fds"] for s in head)
    pool = [s["upstream_conns"] for s in after]
    task_growth = statistics.median(s["tasks"] for s in tail) - statistics.median(s["tasks"] for s in head)
    load_errors = int(final["errors"])
    errors = load_errors + change_errors + events_missing
    achieved = final["ok"] / duration

    result = Result(NAME, TITLE, errors=errors)
    result.tables.append(Table(
        f"{duration:g} s at {rate:g} req/s ({stream_share:.0%} streams), rollout changes every {change_s:g} s",
        ["measure", "value"],
        [
            ["requests answered (of due)", f"{fmt_int(final['ok'])} of {fmt_int(final['due'])}"],
            ["streams answered", fmt_int(final["streams_ok"])],
            ["achieved rate", f"{achieved:,.0f} req/s"],
            ["latency from due time p50 / p99 / max", f"{final['p50_ms']:.2f} / {final['p99_ms']:.2f} / "
                                                      f"{final['max_ms']:.1f} ms"],
            ["started > 10 ms late (all 16 connections busy)", fmt_int(final["late"])],
            ["rollout changes (both experiments)", f"{len(changes)} ({change_errors} failed)"],
            [f"RSS after warm-up ({warmup_s:g} s) → end",
             f"{first['rss_kb'] / 1024:.1f} → {last['rss_kb'] / 1024:.1f} MiB ({rss_growth:+.2%})"],
            ["RSS at start → peak", f"{samples[0]['rss_kb'] / 1024:.1f} → "
                                    f"{max(s['rss_kb'] for s in samples) / 1024:.1f} MiB"],
            ["open fds after warm-up → end (medians of 3 samples)", f"{statistics.median(s['fds'] for s in head):g} → "
                                                                   f"{statistics.median(s['fds'] for s in tail):g}"],
            ["of which upstream connections (aiohttp's pool) after warm-up → end, peak",
             f"{pool[0]} → {pool[-1]}, {max(pool)}"],
            ["other fds (listening, client, Redis, files) after warm-up → end (medians)",
             f"{statistics.median(s['other_fds'] for s in head):g} → "
             f"{statistics.median(s['other_fds'] for s in tail):g}"],
            ["asyncio tasks after warm-up → end (medians)", f"{statistics.median(s['tasks'] for s in head):g} → "
                                                            f"{statistics.median(s['tasks'] for s in tail):g}"],
            ["errors (requests / rollout changes / events missing)",
             f"{load_errors} / {change_errors} / {events_missing}"],
            ["events written (answered incl. 200 sanity requests)", f"{fmt_int(events_written)} "
                                                                    f"({fmt_int(answered)})"],
        ],
        note=f"Sampled every {sample_s:g} s; the time series is in the JSON report (figures.samples).",
    ))  # fmt: skip
    result.figures = {
        "samples": samples,
        "rss_kb": [[s["t"], s["rss_kb"]] for s in samples],
        "fds": [[s["t"], s["fds"]] for s in samples],
        "upstream_conns": [[s["t"], s["upstream_conns"]] for s in samples],
        "asyncio_tasks": [[s["t"], s["tasks"]] for s in samples],
        "rss_growth_after_warmup": rss_growth,
        "fd_growth_after_warmup": fd_growth,
        "task_growth_after_warmup": task_growth,
        "warmup_s": warmup_s,
        "load": {k: v for k, v in final.items() if k != "error_samples"},
        "changes": changes,
        "events_written": events_written,
        "errors": {"requests": load_errors, "rollout_changes": change_errors, "events_missing": events_missing},
        "error_samples": final.get("error_samples", []),
    }
    decide = None if ctx.quick else True
    result.targets = [
        Target("RSS growth < 5 % after warm-up", f"{rss_growth:+.2%}", rss_growth < 0.05 if decide else None),
        Target("no fd growth after warm-up (other than the upstream pool)",
               f"{fd_growth:+g} fds (tasks {task_growth:+g}; upstream pool {pool[0]} → {pool[-1]}, peak {max(pool)})",
               fd_growth <= 0 if decide else None),
        Target("zero errors", str(errors), errors == 0 if decide else None),
    ]  # fmt: skip
    if final["late"] > 0.01 * final["ok"]:
        result.notes.append(f"{final['late']} requests started more than 10 ms after they were due: the proxy (or "
                            "the box) fell behind the rate for a while.")  # fmt: skip
    result.notes.append(
        "Streams come from the mock upstream (complete SSE answers with usage, unpaced); plain requests from "
        "nginx's fixed answer. The load generator keeps 16 connections open throughout, so client sockets are "
        "constant and any fd growth is the proxy's own.",
    )
    result.notes.append(
        "Upstream connections are counted apart: aiohttp's pool hands out its idle connections first in, first out, "
        "so at a steady rate every pooled connection is reused before its keep-alive expires and the pool keeps "
        "the largest number a burst ever needed (a stall of a few ms at this rate piles up ~10 requests). That "
        "high-water mark is bounded by the requests in flight (upstreams.X.max_in_flight, server.max_in_flight); "
        "a leak would grow past it, and every other fd is judged on its own."
    )
    return result
