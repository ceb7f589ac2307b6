"""`abproxy eval run | report | compare | to-study | runs`, run as the commands a user types.

Real processes only: mock upstreams with a known accuracy on the shipped ICD-10 test set
(`proxy/mock_upstream.py`: `--answers FILE --skill P`), the CLI as a subprocess, and a real store.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from proxy.store.db import engine_for, migrate
from tests.harness import MockUpstream, Process, proxy_config, wait_until

ROOT = Path(__file__).parent.parent
TEST_SET = ROOT / "examples" / "eval" / "icd10.jsonl"
FORMAT = ROOT / "examples" / "eval" / "format.yaml"
EXAMPLES = 40
ANSWERS = 2 * EXAMPLES
LINK = re.compile(r"^\s+(\S+)\s+http://127\.0\.0\.1:8080/eval/s/(\S+)$", re.MULTILINE)
# The upstream keys the config names (api_key_env); the mocks demand none. No ABPROXY_* from the caller.
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("ABPROXY_")},
       "BASE_KEY": "k-base", "FT_KEY": "k-ft", "FT2_KEY": "k-ft2"}  # fmt: skip



def argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "proxy", "eval", *args]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv(*args), capture_output=True, text=True, timeout=120, env=ENV)


def cli_parallel(*commands: Sequence[str]) -> list[subprocess.CompletedProcess[str]]:
    """Independent commands at once (each CLI start costs ~1 s); the store must be migrated already."""
    procs = [subprocess.Popen(argv(*c), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for c in commands]  # fmt: skip
    done = []
    for command, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(argv(*command), proc.returncode, out, err))
    return done


def one_line(stderr: str) -> bool:
    return stderr.count("\n") == 1 and stderr.endswith("\n") and "Traceback" not in stderr


def query(store: str, sql: str, **params: Any) -> list[Any]:
    engine = engine_for(store)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql), params).all())
    finally:
        engine.dispose()


def answers_stored(store: str) -> int:
    return int(query(store, "SELECT count(*) FROM eval_results")[0][0])


def run_rows(store: str) -> int:
    try:
        return int(query(store, "SELECT count(*) FROM eval_runs")[0][0])
    except OperationalError:  # never migrated: no table, so no run either
        return 0


def migrated(store: str) -> str:
    engine = engine_for(store)
    migrate(engine)
    engine.dispose()
    return store


def requests(*mocks: MockUpstream) -> int:
    return sum(int(m.stats()["requests"]) for m in mocks)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_all(*mocks: MockUpstream) -> None:
    """Start the mocks together (each process takes a moment to import), then wait for each to listen."""
    for mock in mocks:
        Process.start(mock)
    for mock in mocks:
        wait_until(partial(port_open, mock.port), what=mock.name)


@contextmanager
def started(*mocks: MockUpstream) -> Iterator[tuple[MockUpstream, ...]]:
    try:
        start_all(*mocks)
        yield mocks
    finally:
        for mock in mocks:
            mock.stop()


def write_config(path: Path, base: MockUpstream, finetuned: MockUpstream,
                 finetuned2: MockUpstream | None = None) -> Path:  # fmt: skip
    config = proxy_config(base, finetuned)
    if finetuned2 is not None:
        config["upstreams"]["up-ft2"] = {"base_url": f"{finetuned2.url}/v1", "api_key_env": "FT2_KEY", "timeout_s": 5}
        config["models"]["finetuned2"] = {"upstream": "up-ft2", "model": "ft:gpt-4o-mini:acme:sales-v3:def456",
                                          "pricing": {"input_per_1m": 0.30, "output_per_1m": 1.20}}  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    return path


def run_args(config: Path, store: str, *extra: str, test_file: Path = TEST_SET,
             models: Sequence[str] = ("base", "finetuned")) -> list[str]:  # fmt: skip
    args = ["run", "--config", str(config), "--store", store, "--test-file", str(test_file)]
    for model in models:
        args += ["--model", model]
    return [*args, *extra]


def subset(tmp_path: Path, n: int) -> Path:
    """The first n examples of the shipped set (the mocks know every prompt of it)."""
    path = tmp_path / f"icd10-first{n}.jsonl"
    path.write_text("".join(TEST_SET.read_text().splitlines(keepends=True)[:n]))
    return path


@dataclass
class Skilled:
    """base (skill 0.35), finetuned (0.85) and finetuned2 (0.35) answering the shipped set, and their config."""

    config: Path
    base: MockUpstream
    finetuned: MockUpstream
    finetuned2: MockUpstream

    def requests(self) -> int:
        return requests(self.base, self.finetuned, self.finetuned2)


@pytest.fixture(scope="module")
def skilled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Skilled]:
    tmp = tmp_path_factory.mktemp("eval-mocks")
    mocks = (MockUpstream("base", tmp, answers=TEST_SET, skill=0.35),
             MockUpstream("finetuned", tmp, answers=TEST_SET, skill=0.85),
             MockUpstream("finetuned2", tmp, answers=TEST_SET, skill=0.35))  # fmt: skip
    with started(*mocks):
        yield Skilled(write_config(tmp / "config.yaml", *mocks), *mocks)


def sqlite_store(tmp_path: Path, name: str = "store") -> str:
    return f"sqlite:///{tmp_path / f'{name}.db'}"


@pytest.fixture(scope="module")
def run_a(skilled: Skilled, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store holding run "a" (base vs finetuned) and run "b" (base vs finetuned2) on the shipped set."""
    store = migrated(sqlite_store(tmp_path_factory.mktemp("eval-run-a")))
    for done in cli_parallel(
        run_args(skilled.config, store, "--run", "a"),
        run_args(skilled.config, store, "--run", "b", models=("base", "finetuned2")),
    ):
        assert done.returncode == 0, done.stderr
    return store


# -- 1. end to end ---------------------------------------------------------------------------------------------


def test_run_finds_the_finetune_better(skilled: Skilled, store_url: str, tmp_path: Path) -> None:
    """The shipped set through a weak base and a strong fine-tune: a significant "better", regressions first,
    every answer stored, and --out writes the answers and the report in three formats."""
    out = tmp_path / "out"
    done = cli(*run_args(skilled.config, store_url, "--check", str(FORMAT), "--format", "json", "--out", str(out)))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # the report alone on stdout: status lines went to stderr
    run_id = report["runs"][0]["id"]
    assert re.fullmatch(r"icd10-[0-9a-f]{8}", run_id)
    assert f"run {run_id}: {ANSWERS} answered now, 0 stored before, 0 failed" in done.stderr
    comparison = report["comparisons"][0]
    assert (comparison["baseline"], comparison["candidate"], comparison["paired"]) == ("base", "finetuned", EXAMPLES)
    assert comparison["verdict"] == "better"
    assert comparison["exact"]["p_value"] < 0.01 and comparison["format"]["p_value"] < 0.01
    assert comparison["exact"]["diff"] > 0.3
    assert comparison["regressions"] >= 1
    assert comparison["changes"][0]["change"] == "regressed"
    assert [m["answered"] for m in report["models"]] == [EXAMPLES, EXAMPLES]

    assert answers_stored(store_url) == ANSWERS
    pairs = query(store_url, "SELECT model, count(DISTINCT example_id) FROM eval_results GROUP BY model")
    assert dict(pairs) == {"base": EXAMPLES, "finetuned": EXAMPLES}

    target = out / run_id
    lines = (target / "results.jsonl").read_text().splitlines()
    assert len(lines) == ANSWERS
    assert {(r["model"], r["example_id"]) for r in map(json.loads, lines)} == set(
        query(store_url, "SELECT model, example_id FROM eval_results"))  # fmt: skip
    assert json.loads((target / "report.json").read_text())["comparisons"][0]["verdict"] == "better"
    assert "finetuned" in (target / "report.md").read_text()
    assert "<html" in (target / "report.html").read_text().lower()


# -- 2. resume after a kill ------------------------------------------------------------------------------------


def test_killed_run_resumes_asking_only_the_missing(tmp_path: Path) -> None:
    """SIGKILL mid-run loses nothing stored; the same command asks exactly the missing answers."""
    store = sqlite_store(tmp_path)
    mocks = (MockUpstream("base", tmp_path, answers=TEST_SET, skill=1, latency_ms=300),
             MockUpstream("finetuned", tmp_path, answers=TEST_SET, skill=1, latency_ms=300))  # fmt: skip
    with started(*mocks):
        args = run_args(write_config(tmp_path / "config.yaml", *mocks), store, "--concurrency", "2",
                        "--format", "json")  # fmt: skip
        with (tmp_path / "first.out").open("wb") as out, (tmp_path / "first.err").open("wb") as err:
            first = subprocess.Popen(argv(*args), stdout=out, stderr=err, env=ENV)
            try:

                def four_stored() -> bool:
                    if first.poll() is not None:
                        raise AssertionError(f"the run ended before the kill: {(tmp_path / 'first.err').read_text()}")
                    try:
                        return answers_stored(store) >= 4
                    except OperationalError:  # not migrated yet
                        return False

                wait_until(four_stored, timeout=30, what="4 stored answers")
            finally:
                first.kill()
                first.wait()
        time.sleep(0.2)  # let the mocks count a request sent just before the kill
        stored = answers_stored(store)
        first_asked = requests(*mocks)
        assert 4 <= stored < ANSWERS
        assert 0 <= first_asked - stored <= 2  # at most --concurrency answers were in flight, unstored

        for mock in mocks:  # the same ports, without the latency: the second run need not take 12 s
            mock.stop()
            mock.argv = [a for a in mock.argv if a not in ("--latency-ms", "300")]
        start_all(*mocks)
        before = requests(*mocks)
        again = cli(*args)
        assert again.returncode == 0, again.stderr
        asked = requests(*mocks) - before
    assert asked == ANSWERS - stored
    assert f"{ANSWERS - stored} answered now, {stored} stored before, 0 failed" in again.stderr
    assert answers_stored(store) == ANSWERS
    assert query(store, "SELECT model, example_id FROM eval_results GROUP BY model, example_id "
                        "HAVING count(*) > 1") == []  # fmt: skip
    assert len(query(store, "SELECT DISTINCT model, example_id FROM eval_results")) == ANSWERS
    report = json.loads(again.stdout)
    assert [m["exact_rate"] for m in report["models"]] == [1.0, 1.0]
    assert report["notes"] == []  # complete: no "incomplete" note


# -- 3. a run's identity ---------------------------------------------------------------------------------------


def test_same_run_name_other_max_tokens_is_refused(skilled: Skilled, run_a: str) -> None:
    """A run's name is tied to what it asked: another max_tokens under the same --run is refused, asking nothing."""
    asked, stored = skilled.requests(), answers_stored(run_a)
    other = cli(*run_args(skilled.config, run_a, "--run", "a", "--max-tokens", "100"))
    assert other.returncode == 2
    assert one_line(other.stderr) and "max_tokens" in other.stderr and "'a'" in other.stderr
    assert skilled.requests() == asked
    assert answers_stored(run_a) == stored
    assert query(run_a, "SELECT max_tokens FROM eval_runs WHERE id = 'a'") == [(512,)]


# -- 4. scoring changes rescore ----------------------------------------------------------------------------------


def test_new_checks_rescore_without_calls(skilled: Skilled, tmp_path: Path) -> None:
    store = sqlite_store(tmp_path)
    test_file = subset(tmp_path, 10)
    plain = cli(*run_args(skilled.config, store, "--format", "json", test_file=test_file))
    assert plain.returncode == 0, plain.stderr
    assert [m["format_rate"] for m in json.loads(plain.stdout)["models"]] == [None, None]
    asked = skilled.requests()

    checked = cli(*run_args(skilled.config, store, "--check", str(FORMAT), "--format", "json", test_file=test_file))
    assert checked.returncode == 0, checked.stderr
    assert skilled.requests() == asked
    assert "0 answered now, 20 stored before" in checked.stderr and "20 stored answers rescored" in checked.stderr
    report = json.loads(checked.stdout)
    assert all(m["format_rate"] is not None for m in report["models"])
    assert report["comparisons"][0]["format"] is not None
    assert query(store, "SELECT count(*) FROM eval_results WHERE format_ok IS NULL") == [(0,)]


# -- 5. retries --------------------------------------------------------------------------------------------------


def test_rate_limits_and_server_errors_are_retried(tmp_path: Path) -> None:
    store = sqlite_store(tmp_path)
    mocks = (
        MockUpstream("base", tmp_path, answers=TEST_SET, fail_first=3, fail_status=429, retry_after=0),
        MockUpstream("finetuned", tmp_path, answers=TEST_SET, fail_first=2, fail_status=503, retry_after=0),
    )
    with started(*mocks):
        done = cli(*run_args(write_config(tmp_path / "config.yaml", *mocks), store))
        assert done.returncode == 0, done.stderr
        assert requests(*mocks) == ANSWERS + 5
    assert "0 failed; 5 retries" in done.stderr
    assert answers_stored(store) == ANSWERS
    assert query(store, "SELECT sum(attempts) FROM eval_results") == [(ANSWERS + 5,)]


def test_calls_failing_after_retries_exit_2_and_resume(skilled: Skilled, tmp_path: Path) -> None:
    """Calls still failing after --retries: exit 2 saying so, the other model's answers kept; the same command
    later asks only what is missing."""
    store = sqlite_store(tmp_path)
    healthy = skilled.base
    broken = MockUpstream("finetuned", tmp_path, answers=TEST_SET, fail_first=1000, fail_status=503, retry_after=0)
    with started(broken):
        args = run_args(write_config(tmp_path / "config.yaml", healthy, broken), store, "--retries", "1")
        asked = healthy.stats()["requests"]
        failed = cli(*args)
        assert failed.returncode == 2
        last = failed.stderr.strip().splitlines()[-1]
        assert f"{EXAMPLES} call(s) failed" in last and "run the same command again" in last
        assert broken.stats()["requests"] == 2 * EXAMPLES  # one retry each
        assert query(store, "SELECT model, count(*) FROM eval_results GROUP BY model") == [("base", EXAMPLES)]

        broken.stop()  # the same port, healthy now
        broken.argv = [a for a in broken.argv if a not in ("--fail-first", "1000")]
        start_all(broken)
        resumed = cli(*args)
        assert resumed.returncode == 0, resumed.stderr
        assert broken.stats()["requests"] == EXAMPLES
    assert healthy.stats()["requests"] - asked == EXAMPLES  # its stored answers were not asked again
    assert f"{EXAMPLES} answered now, {EXAMPLES} stored before, 0 failed" in resumed.stderr
    assert dict(query(store, "SELECT model, count(*) FROM eval_results GROUP BY model")) == {
        "base": EXAMPLES, "finetuned": EXAMPLES}  # fmt: skip


# -- 6. bad input --------------------------------------------------------------------------------------------------


def test_bad_input_exits_2_with_one_line_and_creates_no_run(skilled: Skilled, tmp_path: Path) -> None:
    store = migrated(sqlite_store(tmp_path))
    asked = skilled.requests()
    good = TEST_SET.read_text().splitlines()[0]
    bad_lines = tmp_path / "bad.jsonl"
    bad_lines.write_text(f'{good}\n{{"messages": [{{"role": "user", "content": "no answer"}}]}}\n{good[:-1]}\n')
    bad_regex = tmp_path / "checks.yaml"
    bad_regex.write_text("checks:\n  - line_regex: '^([A-Z'\n")
    unknown_model, bad_file, bad_check, report, compare, to_study = cli_parallel(
        run_args(skilled.config, store, models=("base", "nosuch")),
        run_args(skilled.config, store, test_file=bad_lines),
        run_args(skilled.config, store, "--check", str(bad_regex)),
        ["report", "nope", "--store", store],
        ["compare", "nope", "nope2", "--store", store],
        ["to-study", "nope", "--evaluators", "ann,bob", "--store", store],
    )
    for done in (unknown_model, bad_file, bad_check, report, compare, to_study):
        assert done.returncode == 2 and one_line(done.stderr), done.stderr
        assert done.stdout == ""
    assert "no model named 'nosuch'" in unknown_model.stderr
    assert "line 2:" in bad_file.stderr and "line 3: not valid JSON" in bad_file.stderr
    assert "checks.0.line_regex" in bad_check.stderr and "invalid regex" in bad_check.stderr
    for done in (report, compare, to_study):
        assert "no evaluation run named 'nope'" in done.stderr
    assert run_rows(store) == 0 and answers_stored(store) == 0
    assert skilled.requests() == asked and query(store, "SELECT count(*) FROM studies") == [(0,)]


# -- 7. report formats and escaping ----------------------------------------------------------------------------------


def test_report_formats_and_html_escapes_answers(tmp_path: Path) -> None:
    """The HTML page shows model output and expected answers as text: a <script> answer is escaped."""
    store = sqlite_store(tmp_path)
    xss = "<script>alert(1)</script>"
    test_file = tmp_path / "xss.jsonl"
    rows = [
        ("Which code is hypertension?", "I10: Essential (primary) hypertension"),
        ("Say the script.", xss),
        ("Which code is a sore throat?", "J02.9: Acute pharyngitis, unspecified"),
    ]
    test_file.write_bytes(b"".join(orjson.dumps({"messages": [{"role": "user", "content": q},
                                                              {"role": "assistant", "content": a}]}) + b"\n"
                                   for q, a in rows))  # fmt: skip
    # base always right, finetuned always wrong: every example regresses, so every answer is in the page.
    mocks = (
        MockUpstream("base", tmp_path, answers=test_file, skill=1),
        MockUpstream("finetuned", tmp_path, answers=test_file, skill=0),
    )
    with started(*mocks):
        done = cli(*run_args(write_config(tmp_path / "config.yaml", *mocks), store, "--run", "xss",
                             test_file=test_file))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "exact match" in done.stdout and "finetuned" in done.stdout  # the default table
    assert query(store, "SELECT prediction FROM eval_results WHERE model = 'base' AND prediction = :p", p=xss) == [
        (xss,)]  # fmt: skip

    table, markdown, as_json, html = cli_parallel(
        *(["report", "xss", "--store", store, "--format", fmt] for fmt in ("table", "markdown", "json", "html"))
    )
    for shown in (table, markdown, as_json, html):
        assert shown.returncode == 0, shown.stderr
    assert "exact match" in table.stdout and "regressed" in table.stdout
    assert "|" in markdown.stdout and "finetuned" in markdown.stdout and "exact match" in markdown.stdout
    report = json.loads(as_json.stdout)
    assert report["runs"][0]["id"] == "xss" and report["comparisons"][0]["regressions"] == 3
    assert report["comparisons"][0]["verdict"] in ("worse", "no_difference")  # 3 examples: too few to be sure
    page = html.stdout
    assert "<html" in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert(" not in page


# -- 8. comparing two runs -----------------------------------------------------------------------------------------


def test_compare_two_runs(skilled: Skilled, run_a: str) -> None:
    """Run A's fine-tune (the baseline) against another run's weaker fine-tune, paired on the shared examples."""
    compared = cli("compare", "a", "b", "--store", run_a, "--format", "json")
    assert compared.returncode == 0, compared.stderr
    report = json.loads(compared.stdout)
    assert [r["id"] for r in report["runs"]] == ["a", "b"]
    comparison = report["comparisons"][0]
    assert (comparison["baseline"], comparison["candidate"]) == ("a:finetuned", "b:finetuned2")
    assert comparison["paired"] == EXAMPLES
    assert comparison["verdict"] == "worse"
    assert comparison["exact"]["diff"] < 0 and comparison["exact"]["p_value"] < 0.05
    assert report["notes"] == []  # same test file


# -- 9. to-study -------------------------------------------------------------------------------------------------------


def _study_comparisons(store: str, study: str) -> dict[str, dict[str, str]]:
    found = query(store, "SELECT DISTINCT c.id, c.responses FROM tasks t JOIN comparisons c ON c.id = t.comparison_id "
                         "WHERE t.study = :s", s=study)  # fmt: skip
    return {cid: json.loads(responses) for cid, responses in found}


def test_to_study_samples_differing_answers(run_a: str) -> None:
    store = run_a
    s1 = cli("to-study", "a", "--evaluators", "ann,bob", "--sample", "10", "--seed", "7", "--name", "s1",
             "--store", store)  # fmt: skip
    assert s1.returncode == 0, s1.stderr
    assert set(dict(LINK.findall(s1.stdout))) == {"ann", "bob"}
    assert "10 of" in s1.stdout and "base vs finetuned" in s1.stdout

    comparisons = _study_comparisons(store, "s1")
    assert len(comparisons) == 10
    predictions = query(store, "SELECT b.prediction, f.prediction FROM eval_results b JOIN eval_results f "
                               "ON f.example_id = b.example_id AND f.run_id = b.run_id "
                               "WHERE b.run_id = 'a' AND b.model = 'base' AND f.model = 'finetuned'")  # fmt: skip
    differing = {(b, f) for b, f in predictions if b.strip() != f.strip()}
    for responses in comparisons.values():
        assert set(responses) == {"base", "finetuned"}
        assert responses["base"].strip() != responses["finetuned"].strip()
        assert (responses["base"], responses["finetuned"]) in differing
    tasks = query(store, "SELECT evaluator, model_a, model_b FROM tasks WHERE study = 's1'")
    assert {e for e, _, _ in tasks} == {"ann", "bob"}
    assert all({a, b} == {"base", "finetuned"} for _, a, b in tasks)
    assert {a for _, a, _ in tasks} == {"base", "finetuned"}  # sides are randomised
    assert set(query(store, "SELECT DISTINCT source FROM comparisons")) == {("eval:a",)}

    s2, taken = cli_parallel(
        ["to-study", "a", "--evaluators", "ann,bob", "--sample", "10", "--seed", "7", "--name", "s2", "--store", store],
        ["to-study", "a", "--evaluators", "cy", "--sample", "3", "--seed", "1", "--name", "s1", "--store", store],
    )
    assert s2.returncode == 0, s2.stderr
    assert set(_study_comparisons(store, "s2")) == set(comparisons)  # the seeded sample again
    assert taken.returncode == 2 and one_line(taken.stderr) and "cannot create study 's1'" in taken.stderr
    assert set(_study_comparisons(store, "s1")) == set(comparisons)
    assert {e for (e,) in query(store, "SELECT DISTINCT evaluator FROM tasks WHERE study = 's1'")} == {"ann", "bob"}


# -- eval runs ------------------------------------------------------------------------------------------------------


def test_runs_lists_runs_with_their_answers(run_a: str, tmp_path: Path) -> None:
    empty = cli("runs", "--store", sqlite_store(tmp_path))
    assert empty.returncode == 0 and "no evaluation runs yet" in empty.stdout, empty.stderr
    listed = cli("runs", "--store", run_a)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if re.match(r"\W*a\W", line))
    assert "80/80" in row and "base (gpt-4o-mini)" in row and TEST_SET.name in listed.stdout
