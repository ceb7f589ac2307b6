"""Reproduce the "Speed" comparison of issue 3 in one run: the proxy against minimal forwarders.

    python -m bench.forwarders [--duration 10] [--rounds 3] [--concurrency 32] [--all]
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
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.procs import LOAD_CPU, REPO, SUT_CPU, Processes, log
from bench.servers import BENCH, proxy_counts, sanity_check, start_nginx, start_proxy, start_redis, start_ref, versions
from bench.wrk import Sample, summary, wrk

# The spec's targets (issue 3, "Speed").
TARGET_RPS_RATIO = 0.75
TARGET_P99_RATIO = 1.6
TARGET_C1_ADDED_MS = 0.5


def summarise(samples: list[Sample], names: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        mine = [s for s in samples if s.candidate == name]
        out[name] = {
            **summary(mine),
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
