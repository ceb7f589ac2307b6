"""`abproxy report` and `abproxy stats sample-size`, run as the commands a user types."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from proxy.store.db import Store, engine_for, migrate
from tests.synthetic import DAY, EXPERIMENT, Scenario, generate


def _abproxy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", **(env or {})})


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cli")
    store = directory / "store.db"
    engine = engine_for(f"sqlite:///{store}")
    migrate(engine)
    Store(engine).write(generate(Scenario(users=800), time.time() - 11 * DAY))
    engine.dispose()
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump({
        "upstreams": {"u": {"base_url": "http://127.0.0.1:9/v1", "api_key_env": "NOT_NEEDED_HERE"}},
        "models": {"base": {"upstream": "u", "model": "m"}, "finetuned": {"upstream": "u", "model": "ft:m"}},
        "experiments": {EXPERIMENT: {"aliases": [EXPERIMENT], "control": "base", "treatment": "finetuned",
                                     "salt": "sales-v2",
                                     "analysis": {"primary_metric": "task_completed", "mde": 0.05}}},
        "metrics": {"task_completed": {"type": "boolean"}, "csat": {"type": "float", "min": 1, "max": 5},
                    "returned": {"type": "boolean", "level": "user"}},
        "events": {"redis_stream": {"enabled": True}},
        "store": {"url": f"sqlite:///{store}"},
    }))
    return path


class TestReport:
    def test_json(self, config: Path) -> None:
        done = _abproxy("report", EXPERIMENT, "--config", str(config), "--format", "json")
        assert done.returncode == 0, done.stderr
        body = json.loads(done.stdout)
        assert body["experiment"] == EXPERIMENT and body["verdict"]["decision"]
        assert any(m["name"] == "task_completed" and m["role"] == "primary" for m in body["metrics"])

    def test_table_markdown_csv(self, config: Path) -> None:
        table = _abproxy("report", EXPERIMENT, "--config", str(config))
        assert table.returncode == 0, table.stderr
        assert "task completed" in table.stdout and "verdict:" in table.stdout and "sample ratio" in table.stdout
        markdown = _abproxy("report", EXPERIMENT, "--config", str(config), "--format", "markdown").stdout
        assert markdown.startswith(f"## {EXPERIMENT}") and "| metric | control | treatment |" in markdown
        rows = list(csv.DictReader(io.StringIO(_abproxy("report", EXPERIMENT, "--config", str(config),
                                                        "--format", "csv").stdout)))
        assert {r["section"] for r in rows} == {"metric", "guardrail"}
        assert next(r for r in rows if r["name"] == "task_completed")["role"] == "primary"

    def test_since(self, config: Path) -> None:
        full = json.loads(_abproxy("report", EXPERIMENT, "--config", str(config), "--format", "json").stdout)
        late = json.loads(_abproxy("report", EXPERIMENT, "--config", str(config), "--format", "json",
                                   "--since", "4d").stdout)
        assert late["arms"]["control"]["requests"] < full["arms"]["control"]["requests"]

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["nope"], "no experiment named 'nope'"),
            ([EXPERIMENT, "--since", "yesterday-ish"], "--since:"),
            ([EXPERIMENT, "--store", "sqlite:////nonexistent-dir/x.db"], "the store cannot be read"),
        ],
    )
    def test_errors(self, config: Path, args: list[str], message: str) -> None:
        done = _abproxy("report", *args, "--config", str(config))
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr

    def test_unmigrated_store(self, config: Path, tmp_path: Path) -> None:
        done = _abproxy("report", EXPERIMENT, "--config", str(config), "--store", f"sqlite:///{tmp_path / 'e.db'}")
        assert done.returncode == 2 and "abproxy collect" in done.stderr


class TestSampleSize:
    def test_rate(self) -> None:
        """REFERENCE.md: 75 % baseline, 5 points, alpha 0.05, power 0.8: about 1,090-1,180 per variant."""
        done = _abproxy("stats", "sample-size", "--baseline", "0.75", "--mde", "0.05", "--users-per-day", "300")
        assert done.returncode == 0, done.stderr
        assert "control      1,092 users" in done.stdout and "treatment    1,092 users" in done.stdout
        assert "about 8 day(s)" in done.stdout

    def test_unequal_split_and_mean(self) -> None:
        done = _abproxy("stats", "sample-size", "--sd", "1", "--mde", "0.1", "--treatment-share", "0.1")
        assert done.returncode == 0, done.stderr
        lines = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in done.stdout.splitlines()[1:]}
        assert lines["treatment"] < lines["control"] and lines["treatment"] == pytest.approx(lines["control"] / 9, 1)

    @pytest.mark.parametrize(
        "args",
        [["--baseline", "0.98", "--mde", "0.05"], ["--mde", "0.05"], ["--baseline", "0.5", "--sd", "1", "--mde", "1"],
         ["--baseline", "0.5", "--mde", "0.05", "--treatment-share", "1"]],
    )
    def test_bad_input(self, args: list[str]) -> None:
        done = _abproxy("stats", "sample-size", *args)
        assert done.returncode == 2 and done.stderr.strip() and "Traceback" not in done.stderr
