"""Scenario 1: non-streaming throughput and added latency at concurrency 1, 32 and 256.

Three servers answer the same wrk load (chat.lua: a chat completion with a new `user` each time):
nginx directly (the floor: what one hop costs at all), the bare aiohttp forwarder (aiohttp server
+ client, uvloop: the least a Python gateway can do) and the proxy as deployed (routing at 50 %
held in Redis, Prometheus metrics, the event log to a file). The three take turns round by round,
so drift on a noisy machine hits them alike; the table gives medians and the ratios per round.
"""

from __future__ import annotations

from bench.core import Context, Result, Table, Target, fmt_int, fmt_ms, fmt_ratio
from bench.procs import log
from bench.servers import sanity_check, start_aiohttp, start_nginx, start_proxy, start_redis
from bench.wrk import Sample, error_text, summary, wrk

NAME = "throughput"
TITLE = "1. Non-streaming throughput and added latency"
# Measured on this project's machine for the issue (LiteLLM's proxy, one worker, same nginx): not
# rerun here, as LiteLLM's install is larger than this whole project. The ratio is to that figure.
LITELLM_RPS = 70.0
CANDIDATES = ("direct", "aiohttp", "proxy")
OPTIONS = {"rounds": "alternating rounds [3]", "duration": "seconds per measured run [10]"}


def run(ctx: Context) -> Result:
    duration, rounds, warmup = (2, 1, 1) if ctx.quick else (10, 3, 2)
    rounds = int(ctx.options.get("rounds", rounds))
    duration = int(ctx.options.get("duration", duration))
    nginx = start_nginx(ctx.procs, ctx.workdir)
    upstream = f"http://127.0.0.1:{nginx}/v1"
    redis = start_redis(ctx.procs, ctx.workdir)
    ports = {"direct": nginx, "aiohttp": start_aiohttp(ctx.procs, upstream)}
    ports["proxy"], events = start_proxy(ctx.procs, ctx.workdir, upstream, redis)
    sanity_check("aiohttp", ports["aiohttp"], proxy=False)
    sanity_check("proxy", ports["proxy"], proxy=True)
    pids = {"direct": None, "aiohttp": ctx.procs.pid("aiohttp"), "proxy": ctx.procs.pid("proxy")}

    samples: list[Sample] = []
    for connections in (1, 32, 256):
        for round_ in range(1, rounds + 1):
            for name in CANDIDATES:
                ctx.procs.check_alive()
                wrk(ports[name], warmup, connections)
                sample = wrk(ports[name], duration, connections, name, round_, pids[name])
                samples.append(sample)
                log(f"c={connections:<3} round {round_} {name:8s} {sample.rps:9,.0f} req/s  p50 {sample.p50_ms:.3f} "
                    f"p99 {sample.p99_ms:.3f} p99.9 {sample.p999_ms:.3f} ms  errors {sample.errors}")  # fmt: skip

    result = Result(NAME, TITLE, errors=sum(s.errors for s in samples))
    medians: dict[tuple[int, str], dict[str, float]] = {}
    for connections in (1, 32, 256):
        rows = []
        for name in CANDIDATES:
            mine = [s for s in samples if s.connections == connections and s.candidate == name]
            medians[connections, name] = summary(mine)
        base, direct = medians[connections, "aiohttp"], medians[connections, "direct"]
        for name in CANDIDATES:
            m = medians[connections, name]
            per_round = [
                p.rps / b.rps
                for p in samples if p.connections == connections and p.candidate == name
                for b in samples if b.connections == connections and b.candidate == "aiohttp" and b.round == p.round
            ]  # fmt: skip
            rows.append([
                name, fmt_int(m["rps"]), fmt_ratio(m["rps"] / base["rps"]), fmt_ms(m["p50_ms"]),
                fmt_ms(m["p99_ms"]), fmt_ms(m["p999_ms"]), fmt_ratio(m["p99_ms"] / base["p99_ms"]),
                "-" if name == "direct" else f"+{m['p50_ms'] - direct['p50_ms']:.3f}",
                "-" if name == "direct" else fmt_int(m["cpu_us_per_req"]),
                ", ".join(f"{r:.2f}" for r in per_round), error_text(m),
            ])  # fmt: skip
        result.tables.append(Table(
            f"Concurrency {connections} (median of {rounds} rounds of {duration} s)",
            ["server", "req/s", "vs aiohttp", "p50 ms", "p99 ms", "p99.9 ms", "p99 vs aiohttp", "added p50 ms",
             "server CPU µs/req", "req/s vs aiohttp per round", "errors"],
            rows,
        ))  # fmt: skip
    result.figures = {f"c{c}_{n}": m for (c, n), m in medians.items()}
    result.figures["events_written"] = sum(1 for _ in events.open("rb"))

    proxy32, base32 = medians[32, "proxy"], medians[32, "aiohttp"]
    added_c1 = medians[1, "proxy"]["p50_ms"] - medians[1, "direct"]["p50_ms"]
    added_c1_base = medians[1, "aiohttp"]["p50_ms"] - medians[1, "direct"]["p50_ms"]
    decide = not ctx.quick
    result.targets = [
        Target("req/s at c=32 ≥ 0.9× the bare aiohttp forwarder's", f"{proxy32['rps'] / base32['rps']:.2f}×",
               proxy32["rps"] / base32["rps"] >= 0.9 if decide else None),
        Target("p99 at c=32 ≤ 1.2× the forwarder's", f"{proxy32['p99_ms'] / base32['p99_ms']:.2f}×",
               proxy32["p99_ms"] / base32["p99_ms"] <= 1.2 if decide else None),
        Target("added p50 at c=1 < 0.25 ms (over nginx direct)",
               f"{added_c1:.3f} ms (aiohttp forwarder: {added_c1_base:.3f} ms)", added_c1 < 0.25 if decide else None),
        Target("> 50× LiteLLM's req/s (70 req/s, measured for the issue)", f"{proxy32['rps'] / LITELLM_RPS:.0f}×",
               proxy32["rps"] / LITELLM_RPS > 50 if decide else None),
    ]  # fmt: skip
    extra_us = proxy32["cpu_us_per_req"] - base32["cpu_us_per_req"]
    limits = {
        0: (
            f"CPU per request: the proxy's {proxy32['cpu_us_per_req']:.0f} µs against the forwarder's "
            f"{base32['cpu_us_per_req']:.0f} µs (+{extra_us:.0f}); what the features add is scenario 6 (the event "
            "log and the Redis stream sink most: the event dict and its JSON line, and the sink's share of a "
            "batch), and with all of them off the proxy's routing, request id, header handling and the ASGI hop "
            "still cost ~25 µs: at ~200 µs a request, 0.9× leaves ~20 µs for everything the proxy does"
        ),
        2: (
            f"the bare aiohttp forwarder adds {added_c1_base:.3f} ms on the same loopback: one Python hop's two "
            "event-loop wake-ups and four socket calls cost more than 0.25 ms on this virtual machine, before any "
            "work of the proxy's"
        ),
    }
    for index, text in limits.items():
        if result.targets[index].ok is False:
            result.targets[index].limit = text
    result.notes.append(
        "One worker on one core: req/s is req/s per core. The server CPU column is the process's own "
        "CPU time per request (steadier than req/s when other jobs steal the core)."
    )
    return result
