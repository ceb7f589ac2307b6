"""Scenario 3: open streams. 5,000 concurrent slow streams through one proxy worker: no errors, and
the memory each open stream costs.

The same slow streams (a chunk a second, from bench/stream_upstream.py) run first straight at the
upstream (the baseline: that 5,000 streams open cleanly on this machine at all, and what a raw
asyncio server holds per stream), then through the bare streaming relay (bench/forwarders_ref.py
stream_relay: uvicorn + aiohttp with nothing else, the floor of a Python hop on the proxy's stack)
and then through the proxy (each one worker on core 0). Memory is read warm and idle, with every
stream open and past its first chunk, and after they ended; memory per open stream = (open - idle)
/ streams.

server.max_in_flight (the proxy's cap on requests in flight, 4096 by default) is raised to 10,000
for this scenario, and the open-file limit to its hard limit (a hop holds two sockets per stream).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.core import SUT_CPU, Context, Result, Table, Target, fmt_int, fmt_ms
from bench.procs import CoreLoad, cpu_seconds, log, raise_fd_limit
from bench.scenarios.streaming import CONTENDED, Shape, pct, run_client, upstream_stats
from bench.servers import gc_note, start_proxy, start_redis, start_ref, start_stream_upstream

NAME = "open_streams"
TITLE = "3. Open streams: 5,000 concurrent slow streams on one worker"
OPTIONS = {"streams": "concurrent streams [5000; quick 500]"}

# Streams start over 20 s (250 a second: the proxy spends ~2 ms of CPU opening one, so about half
# its core) and live 60 s (tokens x interval): all are open well before the first ends, with room
# for a proxy slowed by a shared core and for the seconds memory is read in.
FULL = Shape(5000, 30, 2000, 1, 20.0)
QUICK = Shape(500, 10, 600, 1, 1.0)
MAX_IN_FLIGHT = 10_000
TARGET_KIB = 20.0


def memory(pid: int) -> dict[str, int]:
    """KiB: VmRSS and RssAnon (/proc/<pid>/status), Pss (smaps_rollup, when the kernel has it), and
    the open file descriptors (sockets, mostly)."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            found[key] = int(value.split()[0])
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                found["Pss"] = int(line.split()[1])
    except OSError:
        pass
    found["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return found


def sample_memory(pids: dict[str, int], count: int = 5, every_s: float = 0.3) -> dict[str, dict[str, int]]:
    """The median of a few readings per process (a reading lands between two chunk ticks or on one)."""
    readings: dict[str, list[dict[str, int]]] = {name: [] for name in pids}
    for i in range(count):
        for name, pid in pids.items():
            readings[name].append(memory(pid))
        if i < count - 1:
            time.sleep(every_s)
    return {name: {key: int(statistics.median(r[key] for r in rs)) for key in rs[0]} for name, rs in readings.items()}


@dataclass
class Phase:
    target: str  # direct | relay | proxy
    streams: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    idle: dict[str, dict[str, int]] = field(default_factory=dict)  # process -> memory()
    open: dict[str, dict[str, int]] = field(default_factory=dict)
    after: dict[str, dict[str, int]] = field(default_factory=dict)
    read_ok: bool = False  # memory was read with every stream open (none had ended yet)
    ttft_ms: dict[str, float] = field(default_factory=dict)
    delay_ms: dict[str, float] = field(default_factory=dict)
    open_s: float = float("nan")  # from the first request to all streams open
    cpu_ms_per_stream: dict[str, float] = field(default_factory=dict)  # process -> its CPU over the run / streams
    client: dict[str, Any] = field(default_factory=dict)
    other_load: dict[str, float] = field(default_factory=dict)

    def per_stream_kib(self, process: str, key: str = "VmRSS") -> float:
        if process not in self.open or process not in self.idle or not self.streams:
            return float("nan")
        return (self.open[process][key] - self.idle[process][key]) / self.streams


def run_phase(ctx: Context, target: str, port: int, shape: Shape, pids: dict[str, int]) -> Phase:
    phase = Phase(target)
    time.sleep(0.5 if ctx.quick else 1.0)  # let the warm-up's or the previous phase's connections settle
    phase.idle = sample_memory(pids)
    read_at: list[int] = []

    def on_event(event: dict[str, Any]) -> None:
        if event.get("event") == "all_open":
            time.sleep(0.5)
            phase.open = sample_memory(pids)
            read_at.append(time.monotonic_ns())

    gauge = CoreLoad()
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    lifetime = shape.tokens * shape.interval_ms / 1000
    run = run_client(ctx, f"client-{target}", port, shape, timeout_s=shape.stagger_s + 3 * lifetime + 30,
                     on_event=on_event)  # fmt: skip
    phase.other_load = gauge.other()
    phase.cpu_ms_per_stream = {name: (cpu_seconds(pid) - cpu0[name]) / shape.users * 1e3 for name, pid in pids.items()}
    time.sleep(1.0 if ctx.quick else 2.0)
    phase.after = sample_memory(pids)
    phase.streams = len(run.start_ns)
    phase.errors, phase.error_kinds = run.errors, run.error_counts()
    if phase.streams != shape.users:
        phase.errors += shape.users - phase.streams
        phase.error_kinds["missing"] = shape.users - phase.streams
    ended = run.end_ns[run.end_ns > 0]
    phase.read_ok = bool(read_at) and ended.size > 0 and read_at[0] < int(ended.min())
    ttft = run.ttft_ns[run.ttft_ns >= 0] / 1e6
    delays = run.chunk_delay_ns / 1e6
    phase.ttft_ms = {"p50": pct(ttft, 50), "p99": pct(ttft, 99)}
    phase.delay_ms = {"p50": pct(delays, 50), "p99": pct(delays, 99), "p99.9": pct(delays, 99.9),
                      "max": float(delays.max()) if delays.size else float("nan")}  # fmt: skip
    if run.meta.get("all_open_ns") and run.start_ns.size:
        phase.open_s = (int(run.meta["all_open_ns"]) - int(np.min(run.start_ns[run.start_ns > 0]))) / 1e9
    phase.client = {k: run.meta[k] for k in ("cpu_s", "wall_s", "maxrss_kib")}
    memory_text = "; ".join(
        f"{name} RSS idle {phase.idle[name]['VmRSS'] / 1024:.1f} open "
        f"{phase.open.get(name, {}).get('VmRSS', 0) / 1024:.1f} after {phase.after[name]['VmRSS'] / 1024:.1f} MiB "
        f"({phase.per_stream_kib(name):.1f} KiB/stream)"
        for name in pids
    )
    log(f"  {target:6s}: {phase.streams} streams, errors {phase.errors} {phase.error_kinds or ''}; {memory_text}; "
        f"read while all open: {phase.read_ok}; other load {phase.other_load}")  # fmt: skip
    return phase


def run(ctx: Context) -> Result:
    shape = QUICK if ctx.quick else FULL
    if "streams" in ctx.options:
        shape = replace(shape, users=int(ctx.options["streams"]))
    fd_limit = raise_fd_limit()
    if fd_limit < 2 * shape.users + 500:
        raise RuntimeError(f"the open-file limit is {fd_limit}: the proxy needs two sockets per stream")
    up_port, up_stats = start_stream_upstream(ctx.procs, ctx.workdir)
    redis = start_redis(ctx.procs, ctx.workdir)
    proxy_port, _events = start_proxy(
        ctx.procs, ctx.workdir, f"http://127.0.0.1:{up_port}/v1", redis,
        overrides={"server": {"max_in_flight": MAX_IN_FLIGHT}},
    )  # fmt: skip
    relay_port = start_ref(ctx.procs, "relay", "stream_relay", f"http://127.0.0.1:{up_port}/v1")
    pids = {name: ctx.procs.pid(name) for name in ("proxy", "relay")} | {"upstream": ctx.procs.pid("stream-upstream")}

    # Warm every path (imports, pools, the first allocations) before reading idle memory.
    for target, port in (("direct", up_port), ("relay", relay_port), ("proxy", proxy_port)):
        warm = run_client(ctx, f"client-warmup-{target}", port, Shape(200, 5, 20, 2, 0.2), timeout_s=60)
        if warm.errors:
            raise RuntimeError(f"warm-up {target}: errors {warm.error_counts()}")

    phases = [
        run_phase(ctx, "direct", up_port, shape, {"upstream": pids["upstream"]}),
        run_phase(ctx, "relay", relay_port, shape, {"relay": pids["relay"], "upstream": pids["upstream"]}),
        run_phase(ctx, "proxy", proxy_port, shape, {"proxy": pids["proxy"], "upstream": pids["upstream"]}),
    ]
    result = Result(NAME, TITLE, errors=sum(p.errors for p in phases))
    result.notes.append(gc_note(proxy_port))
    stats = upstream_stats(pids["upstream"], up_stats)
    unread = [p.target for p in phases if not p.read_ok]
    if unread:
        if not ctx.quick:  # a smoke run on a busy machine may open them too slowly: not a failure there
            result.errors += len(unread)
        result.notes.append(f"memory was not read while every stream was open in: {', '.join(unread)}")

    direct, relay, proxy = phases

    def mib(m: dict[str, dict[str, int]], name: str, key: str = "VmRSS") -> str:
        return f"{m[name][key] / 1024:.1f}" if name in m else "-"

    rows = []
    for p in phases:
        hop = "" if p.target == "direct" else p.target  # the process between client and upstream
        rows.append([
            p.target, fmt_int(p.streams), str(p.errors), f"{p.open_s:.1f}",
            mib(p.idle, hop), mib(p.open, hop), mib(p.after, hop),
            f"{p.per_stream_kib(hop):.1f}" if hop else "-",
            f"{p.per_stream_kib(hop, 'Pss'):.1f}" if hop else "-",
            fmt_int(p.open[hop]["fds"]) if hop in p.open else "-",
            f"{p.per_stream_kib('upstream'):.1f}",
            f"{p.cpu_ms_per_stream[hop]:.2f}" if hop else "-", f"{p.cpu_ms_per_stream['upstream']:.2f}",
            fmt_ms(p.ttft_ms["p50"]), fmt_ms(p.ttft_ms["p99"]), fmt_ms(p.delay_ms["p99"]), fmt_ms(p.delay_ms["max"]),
            f"{p.other_load.get('0', 0):.0%} / {p.other_load.get('1', 0):.0%}",
        ])  # fmt: skip
    result.tables.append(Table(
        f"{shape.users:,} streams of {shape.tokens} chunks, one every {shape.interval_ms / 1000:g} s, started over "
        f"{shape.stagger_s:g} s",
        ["path", "streams", "errors", "s to all open", "hop RSS idle MiB", "all open MiB", "after MiB",
         "hop KiB/stream (RSS)", "(PSS)", "hop fds open", "upstream KiB/stream (RSS)", "hop CPU ms/stream",
         "upstream CPU ms/stream", "TTFT p50 ms", "TTFT p99 ms", "chunk delay p99 ms", "chunk delay max ms",
         "other jobs core 0 / 1"],
        rows,
        note=(
            "The hop is the process between client and upstream: the bare relay or the proxy. "
            "Memory per stream = (all open - warm idle) / streams, each the median of 5 readings 0.3 s apart; "
            "RSS counts what the process holds in user space: the kernel's socket buffers are not in it. "
            "'After': a few seconds after the last stream ended. CPU per stream: the process's CPU over the "
            "phase (request, connections, every chunk) / streams. 'Other jobs': share of each core used by "
            "processes this benchmark did not start."
        ),
    ))  # fmt: skip
    per_stream = proxy.per_stream_kib("proxy")
    relay_per_stream = relay.per_stream_kib("relay")
    upstream_per_stream = proxy.per_stream_kib("upstream")
    result.figures = {
        "shape": vars(shape),
        "max_in_flight": MAX_IN_FLIGHT,
        "fd_limit": fd_limit,
        "phases": [vars(p) for p in phases],
        "proxy_kib_per_stream": per_stream,
        "proxy_kib_per_stream_pss": proxy.per_stream_kib("proxy", "Pss"),
        "relay_kib_per_stream": relay_per_stream,
        "upstream_kib_per_stream": {p.target: p.per_stream_kib("upstream") for p in phases},
        "upstream": stats,
    }
    decide = not ctx.quick
    result.targets = [
        Target(f"{shape.users:,} open streams on one worker with zero errors",
               f"{proxy.errors} errors through the proxy ({direct.errors} direct)",
               proxy.errors == 0 and proxy.read_ok if decide else None),
        Target(f"< {TARGET_KIB:g} KiB of memory per open stream",
               f"{per_stream:.1f} KiB (RSS; PSS {proxy.per_stream_kib('proxy', 'Pss'):.1f}); the bare relay "
               f"{relay_per_stream:.1f} KiB, the raw upstream {upstream_per_stream:.1f} KiB per stream",
               per_stream < TARGET_KIB if decide else None),
    ]  # fmt: skip
    if result.targets[1].ok is False:
        result.targets[1].limit = (
            f"the bare relay, uvicorn + aiohttp and one task per stream with nothing else, holds "
            f"{relay_per_stream:.1f} KiB per stream in the same run: the Python objects of the two connections "
            "(uvicorn's protocol, parser and request cycle with their asyncio Events; aiohttp's connection, parser, "
            f"response and its buffers). The proxy's {per_stream - relay_per_stream:+.1f} KiB over it: the "
            "disconnect watcher's task (a client that leaves must cancel its upstream stream), the exchange record "
            "and the usage tap (tracemalloc)"
        )
    if not proxy.read_ok:
        result.targets[
            0
        ].limit = "the streams were never all open at once: the proxy opened them slower than they ended"
    busy = proxy.other_load.get(SUT_CPU, 0.0)
    if busy > CONTENDED:
        result.notes.append(
            f"Other jobs used {busy:.0%} of core {SUT_CPU} during the proxy's phase: the times to first token and "
            "to all open are the machine's as much as the proxy's; memory is not affected."
        )
    result.notes += [
        f"server.max_in_flight raised from its default 4,096 to {MAX_IN_FLIGHT:,} for this scenario (the proxy "
        "refuses requests beyond it with a 503); the open-file limit is the hard limit, "
        f"{fd_limit:,}, for every process.",
        "'After' still holds the upstream connections: the proxy's aiohttp pool keeps released "
        "connections 30 s (keepalive_timeout), and freed Python objects return to the allocator, not the OS.",
    ]
    return result
