"""The benchmark suite: `make bench` (or `python -m bench`) runs every scenario and writes the report.

\b
    python -m bench                        # every scenario, full length (about an hour on 2 cores)
    python -m bench --only throughput,streaming
    python -m bench --quick                # seconds per scenario: CI's smoke run, no timing asserted
    python -m bench --list

Each scenario starts what it needs on loopback, pins the server under test to core 0 and the load
and upstreams to core 1, and measures a baseline in the same run; only ratios to it are quoted.
The report goes to bench/results/<timestamp>.{md,json} and bench/results/latest.{md,json}; a full
run (no --only, --quick or --set) also writes bench/REPORT.{md,json}, the copy kept in the repository.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType

import click
from rich.console import Console

from bench.core import BENCH, Context, Result
from bench.procs import Processes, raise_fd_limit
from bench.report import machine, markdown

# In the order the issue lists them; each module has NAME, TITLE and run(ctx).
SCENARIOS = ("throughput", "streaming", "open_streams", "propagation", "soak", "feature_cost", "offline")

console = Console(stderr=True)


def _load(name: str) -> ModuleType:
    return importlib.import_module(f"bench.scenarios.{name}")


@click.command(help=__doc__)
@click.option("--only", default="", help="Comma-separated scenario names (see --list).")
@click.option("--quick", is_flag=True, help="Short runs and small sizes: a smoke test, not a measurement.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=BENCH / "results",
              show_default=True, help="Where the reports go.")  # fmt: skip
@click.option("--keep-logs", is_flag=True, help="Keep every process's output (kept anyway on a failure).")
@click.option("--list", "list_only", is_flag=True, help="List the scenarios and exit.")
@click.option("--set", "settings", multiple=True, metavar="SCENARIO.KEY=VALUE",
              help="A scenario's own option, e.g. --set soak.minutes=3 (see each scenario's OPTIONS).")  # fmt: skip
def main(only: str, quick: bool, out: Path, keep_logs: bool, list_only: bool, settings: tuple[str, ...]) -> None:
    names = [n.strip() for n in only.split(",") if n.strip()] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise click.BadParameter(
            f"unknown scenario {', '.join(unknown)}; known: {', '.join(SCENARIOS)}", param_hint="--only"
        )
    if list_only:
        for name in SCENARIOS:
            module = _load(name)
            click.echo(f"{name:14s} {module.TITLE}")
            for key, text in getattr(module, "OPTIONS", {}).items():
                click.echo(f"{'':16s}--set {name}.{key}=...  {text}")
        return
    options = _options(settings)
    if (os.cpu_count() or 1) < 2:
        raise click.ClickException("needs 2 cores: the server under test on core 0, load and upstreams on core 1")
    raise_fd_limit()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through the finally blocks

    started = time.time()
    results: list[Result] = []
    failed: list[str] = []
    for name in names:
        module = _load(name)
        workdir = Path(tempfile.mkdtemp(prefix=f"abproxy-bench-{name}-"))
        procs = Processes(workdir)
        ctx = Context(workdir=workdir, procs=procs, quick=quick, keep_logs=keep_logs, options=options.get(name, {}))
        console.rule(f"{module.TITLE}{' (quick)' if quick else ''}")
        t0 = time.monotonic()
        keep = keep_logs
        try:
            result: Result = module.run(ctx)
        except KeyboardInterrupt:
            console.print("interrupted")
            raise SystemExit(130) from None
        except Exception:
            keep = True
            failed.append(name)
            console.print(f"[red]{name} failed[/red]\n{traceback.format_exc()}", markup=True, highlight=False)
            result = Result(name, module.TITLE, notes=[f"failed: {traceback.format_exc(limit=3)}"], errors=1)
        finally:
            procs.stop_all()
            if keep:
                console.print(f"logs kept in {workdir}", highlight=False)
            else:
                shutil.rmtree(workdir, ignore_errors=True)
        result.seconds = time.monotonic() - t0
        results.append(result)
        if result.errors:
            failed.append(name)

    out.mkdir(parents=True, exist_ok=True)
    info = machine(started, quick=quick)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    text = markdown(results, info)
    payload = json.dumps({"machine": info, "scenarios": [r.as_json() for r in results]}, indent=2, default=str)
    for stem in (stamp, "latest"):
        (out / f"{stem}.md").write_text(text)
        (out / f"{stem}.json").write_text(payload)
    if not (quick or only or settings):
        # A full run is also kept in the repository (bench/results/ is not): what the README quotes.
        (BENCH / "REPORT.md").write_text(text)
        (BENCH / "REPORT.json").write_text(payload)
    click.echo(text)
    console.print(f"report: {out / f'{stamp}.md'} and .json", highlight=False)
    if failed:
        raise click.ClickException(f"scenarios with errors: {', '.join(sorted(set(failed)))}")


def _options(settings: tuple[str, ...]) -> dict[str, dict[str, float | str]]:
    """`soak.minutes=3` -> {"soak": {"minutes": 3.0}}: numbers as floats, anything else as text."""
    options: dict[str, dict[str, float | str]] = {}
    for item in settings:
        target, sep, raw = item.partition("=")
        scenario, dot, key = target.partition(".")
        if not sep or not dot or scenario not in SCENARIOS or not key:
            raise click.BadParameter(f"{item!r}: expected SCENARIO.KEY=VALUE with a known scenario", param_hint="--set")
        known = getattr(_load(scenario), "OPTIONS", {})
        if key not in known:
            raise click.BadParameter(
                f"{item!r}: {scenario} takes {', '.join(known) or 'no options'}", param_hint="--set"
            )
        try:
            value: float | str = float(raw)
        except ValueError:
            value = raw
        options.setdefault(scenario, {})[key] = value
    return options


if __name__ == "__main__":
    main()
