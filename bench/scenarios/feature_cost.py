"""Scenario 6: what each feature on the hot path costs, as a ratio to the bare forwarder.

The bare aiohttp forwarder (aiohttp server + client, uvloop) and six builds of the proxy's
config, each its own process on core 0, answer the same wrk load (c=32, chat.lua, nginx as the
upstream on core 1) in turns, round by round, so drift on a shared machine hits them alike:

* all off: `server.prometheus_enabled: false`, `events.enabled: false` (routing, the upstream
  call and usage parsing only: what the proxy cannot do without);
* + metrics, + event log (JSON lines on stdout into a file, as deployed), + Redis stream sink
  (`events.redis_stream`, its own key, `maxlen` 10,000 so the run does not fill Redis), + pair
  sampling (`share` 0.05: for that share of requests the proxy also asks the other variant, so
  upstream calls grow by 5 %, off the answered request's path but on the same core): each on top
  of all off, alone;
* all on: the four together.

The cost of a feature per request is its server CPU µs/req minus all off's, from the process's
own CPU time (steadier than req/s when other work shares the core).
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any

from bench.core import Context, Result, Table, fmt_int, fmt_ms, fmt_ratio
from bench.procs import http, log
from bench.servers import (
    EXPERIMENT,
    proxy_config,
    sanity_check,
    start_aiohttp,
    start_nginx,
    start_proxy,
    start_redis,
)
from bench.wrk import Sample, summary, wrk
from proxy.config import settings_from_dict

NAME = "feature_cost"
TITLE = "6. Cost of each hot-path feature"
CONNECTIONS = 32
PAIR_SHARE = 0.05

_OFF: dict[str, Any] = {"server": {"prometheus_enabled": False}, "events": {"enabled": False}}


def _stream(key: str) -> dict[str, Any]:
    return {"redis_stream": {"enabled": True, "key": key, "maxlen": 10_000}}


_PAIRS: dict[str, Any] = {"experiments": {EXPERIMENT: {"pair_sampling": {"share": PAIR_SHARE}}}}
# name -> config overrides (merged into bench.servers.proxy_config)
VARIANTS: dict[str, dict[str, Any]] = {
    "all off": _OFF,
    "+ metrics": {"events": {"enabled": False}},
    "+ event log": {"server": {"prometheus_enabled": False}},
    "+ Redis stream": {
        "server": {"prometheus_enabled": False}, "events": {"enabled": False, **_stream("bench:stream")},
    },
    "+ pair sampling": {**_OFF, **_PAIRS},
    "all on": {"events": _stream("bench:all"), **_PAIRS},
}
QUICK = ("all off", "all on")
FEATURES = {"+ metrics": "metrics", "+ event log": "events", "+ Redis stream": "stream", "+ pair sampling": "pairs"}


def _slug(name: str) -> str:
    return re.sub(r"[^a-z]+", "-", name.lower()).strip("-")


def run(ctx: Context) -> Result:
    duration, rounds, warmup = (1, 1, 0) if ctx.quick else (8, 3, 2)
    duration = int(ctx.options.get("duration", duration))
    rounds = int(ctx.options.get("rounds", rounds))
    nginx = start_nginx(ctx.procs, ctx.workdir)
    upstream = f"http://127.0.0.1:{nginx}/v1"
    redis = start_redis(ctx.procs, ctx.workdir)
    # Quick (CI's smoke run): the two ends only, as each proxy takes seconds to start; the other
    # variants' configs are still validated, so a mistake in one shows there too.
    variants = {n: VARIANTS[n] for n in QUICK} if ctx.quick else VARIANTS
    for overrides in VARIANTS.values():
        settings_from_dict(proxy_config(upstream, overrides), {}, upstream_keys=False)
    ports: dict[str, int] = {"forwarder": start_aiohttp(ctx.procs, upstream)}
    events: dict[str, Path] = {}
    for name, overrides in variants.items():
        ports[name], events[name] = start_proxy(ctx.procs, ctx.workdir, upstream, redis, name=_slug(name),
                                                overrides=overrides)  # fmt: skip
    sanity_check("aiohttp", ports["forwarder"], proxy=False)
    for name in variants:
        sanity_check(name, ports[name], proxy=True)
    evidence = _features_on(variants, ports, events, redis)  # before the load: the sanity requests made some
    pids = {name: ctx.procs.pid("aiohttp" if name == "forwarder" else _slug(name)) for name in ports}

    samples: list[Sample] = []
    for round_ in range(1, rounds + 1):
        for name in ports:
            ctx.procs.check_alive()
            if warmup:
                wrk(ports[name], warmup, CONNECTIONS)
            sample = wrk(ports[name], duration, CONNECTIONS, name, round_, pids[name])
            samples.append(sample)
            if name in events and events[name].exists():
                events[name].write_bytes(b"")  # O_APPEND: the proxy keeps writing at the new end
            log(f"round {round_} {name:16s} {sample.rps:9,.0f} req/s  p99 {sample.p99_ms:.3f} ms  "
                f"{sample.cpu_us_per_req:5.0f} µs/req  errors {sample.errors}")  # fmt: skip
    return _result(ctx, samples, list(ports), evidence, duration, rounds)


def _features_on(
    variants: dict[str, dict[str, Any]], ports: dict[str, int], events: dict[str, Path], redis_port: int
) -> dict[str, dict[str, bool]]:
    """Which features each variant shows signs of: /metrics answered, events in the file or the stream."""
    import redis

    client = redis.Redis(port=redis_port)
    found: dict[str, dict[str, bool]] = {}
    for name, overrides in variants.items():
        status, _, body = http("GET", f"http://127.0.0.1:{ports[name]}/metrics")
        stream_key = overrides.get("events", {}).get("redis_stream", {}).get("key")
        found[name] = {
            "metrics": status == 200 and b"abproxy_requests_total" in body,
            "events": events[name].exists() and events[name].stat().st_size > 0,
            "stream": bool(stream_key) and int(client.xlen(stream_key)) > 0,
            # Seen only where metrics are on (abproxy_pair_samples_total); elsewhere taken from the config.
            "pairs": "experiments" in overrides
            and (status != 200 or re.search(rb'^abproxy_pair_samples_total\{[^}]*\} [1-9]', body, re.M) is not None),
        }
    client.close()
    return found


def _result(
    ctx: Context, samples: list[Sample], names: list[str], evidence: dict[str, dict[str, bool]], duration: int,
    rounds: int,
) -> Result:  # fmt: skip
    med: dict[str, dict[str, float]] = {}
    for name in names:
        mine = [s for s in samples if s.candidate == name]
        med[name] = summary(mine)
    base, off = med["forwarder"], med["all off"]
    rows = []
    for name in names:
        m = med[name]
        per_round = [
            s.rps / b.rps for s in samples if s.candidate == name
            for b in samples if b.candidate == "forwarder" and b.round == s.round
        ]  # fmt: skip
        cost = "-" if name == "forwarder" else (f"{m['cpu_us_per_req'] - off['cpu_us_per_req']:+.1f} "
                                                f"({m['cpu_us_per_req_best'] - off['cpu_us_per_req_best']:+.1f})")
        rows.append([
            "bare aiohttp forwarder" if name == "forwarder" else name, fmt_int(m["rps"]),
            fmt_ratio(m["rps"] / base["rps"]), fmt_ms(m["p99_ms"]), f"{m['cpu_us_per_req']:.1f}", cost,
            ", ".join(f"{r:.2f}" for r in per_round), str(int(m["errors"])),
        ])  # fmt: skip
    result = Result(NAME, TITLE, errors=int(sum(s.errors for s in samples)))
    result.tables.append(Table(
        f"wrk c={CONNECTIONS}, median of {rounds} round{'s' if rounds > 1 else ''} of {duration} s",
        ["server", "req/s", "vs forwarder", "p99 ms", "server CPU µs/req", "µs/req over all off (best rounds)",
         "req/s vs forwarder per round", "errors"],
        rows,
        note=("Each `+` row is all off plus that one feature. Pair sampling also asks the other variant for "
              f"{PAIR_SHARE:.0%} of requests: {PAIR_SHARE:.0%} more upstream calls, made after the answer was sent. "
              "The cost column is the difference of the medians, and in brackets of the best (least CPU) rounds; "
              "CPU time is counted in 10 ms ticks, so a short run resolves about 10 ms / its request count."),
    ))  # fmt: skip
    missing = [
        f"{name}: {feature}" for name, flags in evidence.items() for feature, on in flags.items()
        if on != (name == "all on" or FEATURES.get(name) == feature)
    ]  # fmt: skip
    if missing:
        result.notes.append("Features not in the state their variant asks for: " + ", ".join(missing))
        result.errors += len(missing)
    result.figures = {
        "medians": med,
        "cost_us_per_req": {n: med[n]["cpu_us_per_req"] - off["cpu_us_per_req"] for n in names if n != "forwarder"},
        "cost_us_per_req_best": {
            n: med[n]["cpu_us_per_req_best"] - off["cpu_us_per_req_best"] for n in names if n != "forwarder"
        },
        "ratio_to_forwarder": {n: med[n]["rps"] / base["rps"] for n in names},
        "features_seen": evidence,
        "samples": [
            {"candidate": s.candidate, "round": s.round, "rps": s.rps, "p99_ms": s.p99_ms,
             "cpu_us_per_req": s.cpu_us_per_req, "errors": s.errors, "other_load": s.raw.get("other_load")}
            for s in samples
        ],
    }  # fmt: skip
    other = [float(s.raw["other_load"]["0"]) for s in samples if "other_load" in s.raw]
    if other:
        result.notes.append(
            f"Other jobs' share of core 0 during the runs: median {statistics.median(other):.0%}, max {max(other):.0%} "
            "(the CPU µs/req column is the steadier one when it is high)."
        )
    if ctx.quick:
        result.notes.append(f"Quick run: {' and '.join(QUICK)} only (the other variants' configs were validated).")
    result.notes.append(
        "The forwarder and the proxies are separate processes on core 0; only the one under load is busy. "
        "The event log's file is emptied after each run to keep the disk use bounded."
    )
    return result
