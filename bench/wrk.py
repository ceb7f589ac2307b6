"""wrk runs: load from core 1 against a server on core 0, parsed from chat.lua's BENCH_JSON line."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import LOAD_CPU, CoreLoad, _stop_group, cpu_seconds

LUA = Path(__file__).resolve().parent / "chat.lua"


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

    @property
    def p999_ms(self) -> float:
        return float(self.raw["p999_us"]) / 1000


def summary(samples: Sequence[Sample]) -> dict[str, float]:
    """One candidate's rounds: medians of req/s, latencies and CPU per request, the least CPU a round
    took (contention only ever adds to it) and the errors summed."""
    return {
        "rps": statistics.median(s.rps for s in samples),
        "p50_ms": statistics.median(s.p50_ms for s in samples),
        "p99_ms": statistics.median(s.p99_ms for s in samples),
        "p999_ms": statistics.median(s.p999_ms for s in samples),
        "cpu_us_per_req": statistics.median(s.cpu_us_per_req for s in samples),
        "cpu_us_per_req_best": min(s.cpu_us_per_req for s in samples),
        "errors": sum(s.errors for s in samples),
        # By wrk's kind (non2xx, connect, read, write, timeout): what an error count means.
        **{f"errors_{kind}": sum(s.raw[kind] for s in samples) for kind in ERROR_KINDS},
    }


def error_text(figures: dict[str, float]) -> str:
    """`summary`'s errors for a table cell: "0", or "73 (read 70, timeout 3)"."""
    kinds = ", ".join(f"{kind} {int(figures[f'errors_{kind}'])}" for kind in ERROR_KINDS
                      if figures.get(f"errors_{kind}"))  # fmt: skip
    return f"{int(figures['errors'])} ({kinds})" if kinds else str(int(figures["errors"]))


ERROR_KINDS = ("non2xx", "connect", "read", "write", "timeout")
_BENCH_JSON = re.compile(r"^BENCH_JSON (\{.*\})$", re.M)


def wrk(
    port: int, duration: int, connections: int, candidate: str = "", round_: int = 0, pid: int | None = None
) -> Sample:
    # --timeout: wrk's default of 2 s counts a slow answer as an error and leaves it out of the latency
    # figures; at c=256 both the bare forwarder's and the proxy's p99.9 come near 2 s, so the default
    # turned their queueing into "errors". Past 10 s it is still counted as one.
    argv = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s"]
    argv += ["--latency"]
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
    errors = sum(raw[kind] for kind in ERROR_KINDS)
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
