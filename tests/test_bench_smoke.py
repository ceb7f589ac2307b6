"""The benchmark suite's smoke run: scenarios 4-6 in their quick form, as CI runs them.

`python -m bench --quick --only soak,propagation,feature_cost` in a subprocess: it must exit 0,
write its Markdown and JSON reports, count no error in any scenario, and leave the figures the
full runs are read from (the soak's RSS and fd samples, the propagation delays, the feature
table). No timing is asserted: the other pytest worker shares both cores, and a quick run is a
check that everything starts, routes, changes rollout, and stops, not a measurement.

Needs nginx and wrk (scripts/test installs them), redis-server and two cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("soak", "propagation", "feature_cost")

pytestmark = pytest.mark.slow


def _missing_tools() -> list[str]:
    missing = [tool for tool in ("wrk", "redis-server", "taskset") if shutil.which(tool) is None]
    if shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
        missing.append("nginx")
    return missing


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if (os.cpu_count() or 1) < 2:
        pytest.skip("the benchmark suite needs 2 cores")
    missing = _missing_tools()
    assert not missing, f"missing {', '.join(missing)}: scripts/test installs them (apt-get install -y nginx-light wrk)"
    out = tmp_path_factory.mktemp("bench-smoke")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", ",".join(SCENARIOS), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    for stem in ("latest.md", "latest.json"):
        assert (out / stem).is_file(), stem
    assert len(list(out.glob("2*.md"))) == 1 and len(list(out.glob("2*.json"))) == 1
    data: dict[str, Any] = json.loads((out / "latest.json").read_text())
    data["markdown"] = (out / "latest.md").read_text()
    return data


def _scenario(report: dict[str, Any], name: str) -> dict[str, Any]:
    found = [s for s in report["scenarios"] if s["name"] == name]
    assert len(found) == 1, [s["name"] for s in report["scenarios"]]
    scenario: dict[str, Any] = found[0]
    return scenario


def test_every_scenario_ran_without_errors(report: dict[str, Any]) -> None:
    """Each scenario is in the report, with its section, tables and zero errors; the run is marked quick."""
    assert report["machine"]["quick"] is True
    for name in SCENARIOS:
        scenario = _scenario(report, name)
        assert scenario["errors"] == 0, (name, scenario["notes"], scenario["figures"].get("errors"))
        assert scenario["tables"] and all(t["rows"] for t in scenario["tables"]), name
        assert f"## {scenario['title']}" in report["markdown"]
        assert all(t["ok"] is None for t in scenario["targets"]), "a quick run decides no target"


def test_soak_figures(report: dict[str, Any]) -> None:
    """RSS, fd and task samples over the run; every due request answered; the rollout changed several times."""
    figures = _scenario(report, "soak")["figures"]
    samples = figures["samples"]
    assert len(samples) >= 5
    assert all(s["rss_kb"] > 0 and s["fds"] > 0 and s["tasks"] > 0 for s in samples)
    assert [t for t, _ in figures["rss_kb"]] == sorted(t for t, _ in figures["rss_kb"])
    assert len(figures["fds"]) == len(samples)
    load = figures["load"]
    assert load["ok"] == load["due"] > 0 and load["streams_ok"] > 0
    assert len(figures["changes"]) >= 4 and all(c["status"] == 200 for c in figures["changes"])
    assert figures["events_written"] >= load["ok"]


def test_propagation_figures(report: dict[str, Any]) -> None:
    """Every change reached all three processes; a delay per process and change, and the watchers' resolution."""
    figures = _scenario(report, "propagation")["figures"]
    assert figures["changes"] > 0 and figures["changes_seen_by_all"] == figures["changes"]
    delays = figures["delays_ms"]
    assert sorted(delays) == ["process0", "process1", "process2"]
    assert all(len(values) == figures["changes"] for values in delays.values())
    assert all(d >= 0 for values in delays.values() for d in values)
    assert len(figures["slowest_ms"]) == figures["changes"]
    assert len(figures["put_to_published_ms"]) == figures["changes"]
    assert figures["watch_gap_p50_ms"] is not None


def test_feature_cost_figures(report: dict[str, Any]) -> None:
    """The forwarder and the proxy variants each measured, with the features each was meant to have."""
    figures = _scenario(report, "feature_cost")["figures"]
    medians = figures["medians"]
    assert {"forwarder", "all off", "all on"} <= set(medians)
    assert all(m["rps"] > 0 and m["errors"] == 0 for m in medians.values())
    assert not any(figures["features_seen"]["all off"].values())
    assert all(figures["features_seen"]["all on"].values())
