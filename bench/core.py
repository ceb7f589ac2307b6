"""What every scenario of the benchmark suite shares: the result types, the context, the core layout.

A scenario is a module in `bench/scenarios/` with

    NAME = "throughput"                       # `python -m bench --only throughput`
    TITLE = "1. Non-streaming throughput and added latency"
    OPTIONS = {"rounds": "alternating rounds [3]"}   # optional: `--set throughput.rounds=5`
    def run(ctx: Context) -> Result: ...      # reads ctx.options.get("rounds", 3)

It starts what it needs through `ctx.procs` (every process in its own group, pinned to a core,
stopped when the suite ends, even on Ctrl-C), measures the thing and a baseline *in the same
run*, and returns tables (for the Markdown report), figures (for the JSON report) and targets
(checked, with the measured value and, when missed, the limit that explains it). `ctx.quick`
asks for the short version: seconds instead of minutes, small sizes, for CI's smoke run, where
no timing is asserted, only that it ran and made no errors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import Processes

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# One worker under test on one core; everything that makes load or answers it on the other.
SUT_CPU, LOAD_CPU = "0", "1"


@dataclass
class Table:
    """A Markdown table: `headers` and `rows` of already-formatted cells."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.headers) + " |"]
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.headers))) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines)


@dataclass
class Target:
    """One of the issue's targets: what it asks, what was measured, whether it held.

    `ok` is None where the run could not decide (a quick run, a missing tool); `limit` says what
    bounds the figure when it missed, from a profile, not a guess."""

    text: str
    measured: str
    ok: bool | None
    limit: str = ""


@dataclass
class Result:
    name: str
    title: str
    tables: list[Table] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: int = 0  # failed requests, streams or operations: any is a failed scenario
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Context:
    workdir: Path
    procs: Processes
    quick: bool = False
    keep_logs: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # this scenario's --set KEY=VALUE (numbers as floats)

    def path(self, name: str) -> Path:
        return self.workdir / name


def fmt_int(value: float) -> str:
    return f"{value:,.0f}"


def fmt_ms(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}x"
