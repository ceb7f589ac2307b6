"""The suite's report: the machine and versions, then each scenario's tables, targets and notes."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

from bench.core import Result
from bench.servers import versions


def machine(started: float, *, quick: bool) -> dict[str, Any]:
    """What the figures were measured on: they mean nothing without it."""
    cpu = "-"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = next(
        (
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        0,
    )
    return {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "quick": quick,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "versions": versions(),
    }


def _verdict(ok: bool | None) -> str:
    return {True: "PASS", False: "MISS", None: "n/a"}[ok]


def markdown(results: list[Result], info: dict[str, Any]) -> str:
    versions_line = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v != "-")
    lines = [
        "# llm-ab-proxy benchmark report",
        "",
        f"{info['started']}{' (quick run: a smoke test, not a measurement)' if info['quick'] else ''}. "
        f"{info['cores']} cores ({info['cpu']}), {info['memory_gib']} GiB, Linux {info['kernel']}; "
        f"load average at the end {info['load_average_at_end']}.",
        "",
        f"Versions: {versions_line}.",
        "",
        "Layout: the server under test is one worker pinned to core 0; upstreams, Redis and the load "
        "generator share core 1. Every figure has a baseline measured in the same run; quote the ratios, "
        "not the absolute numbers, which move with whatever else the machine runs.",
        "",
        "## Targets",
        "",
        "| scenario | target | measured | verdict | what limits it |",
        "|---|---|---|---|---|",
    ]
    for result in results:
        for target in result.targets:
            cells = [result.title, target.text, target.measured, _verdict(target.ok), target.limit or ""]
            lines.append("| " + " | ".join(cells) + " |")
    for result in results:
        lines += ["", f"## {result.title}", "", f"{result.seconds:.0f} s; errors: {result.errors}."]
        for table in result.tables:
            lines += ["", table.markdown()]
        if result.notes:
            lines += [""] + [f"- {note}" for note in result.notes]
    return "\n".join(lines) + "\n"
