"""The automatic judge against the mock upstream (a judge preferring the longer answer) and a real SQLite store."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
import yaml
from sqlalchemy import Engine, select

from proxy.config import Settings, load_settings
from proxy.humaneval import judge, studies
from proxy.humaneval.render import to_csv, to_markdown
from proxy.humaneval.report import study_report
from proxy.humaneval.rubric import Criterion, Rubric
from proxy.store import schema
from proxy.store.db import engine_for, migrate
from tests.harness import MockUpstream, proxy_config

RUBRIC = Rubric((Criterion("tone", "preference", "Which tone fits?"), Criterion("overall", "score", "Ready to send?")))
PRICING = {"input_per_1m": 1.0, "output_per_1m": 2.0}
ENV = {"BASE_KEY": "k", "FT_KEY": "k"}
# finetuned writes the longer answer in 6 comparisons, base in 2: the human labels vary, so kappa is defined.
LONGER_FT = 6


def _pairs() -> list[dict[str, object]]:
    rows = []
    for i in range(8):
        short, long = f"Short answer {i}.", f"A longer and more detailed answer number {i}, with a next step."
        ft_longer = i < LONGER_FT
        rows.append({"prompt": f"Question {i}?", "responses": {"base": long if not ft_longer else short,
                                                               "finetuned": long if ft_longer else short}})
    return rows


@dataclass
class Judged:
    engine: Engine
    store: str
    config: Path
    settings: Settings
    mock: MockUpstream
    longer: dict[str, str]  # comparison id -> the model with the longer answer
    first: judge.JudgeRun
    requests_after_first: int
    second: judge.JudgeRun
    requests_after_second: int


@pytest.fixture(scope="module")
def judged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Judged]:
    """One study of 8 comparisons, voted on by two humans (the longer answer), then judged twice."""
    tmp = tmp_path_factory.mktemp("judge")
    mock = MockUpstream("judge", tmp)
    mock.start()
    config = proxy_config(mock, mock)
    config["models"]["judge"] = {"upstream": "up-base", "model": "judge-model", "pricing": PRICING}
    config["models"]["terse"] = {"upstream": "up-ft", "model": "terse-model", "pricing": PRICING}
    config_path = tmp / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    store = f"sqlite:///{tmp / 'store.db'}"
    engine = engine_for(store)
    migrate(engine)
    pairs = tmp / "pairs.jsonl"
    pairs.write_bytes(b"\n".join(orjson.dumps(row) for row in _pairs()) + b"\n")
    clock = itertools.count(1000.0)
    studies.import_jsonl(engine, pairs, now=next(clock))
    created = studies.create_study(engine, "s", evaluators=["ann", "bob"], per_evaluator=8, overlap=1.0,
                                   rubric=RUBRIC, seed=1, now=next(clock))  # fmt: skip
    for token in created.links.values():
        evaluator = studies.evaluator_for(engine, token)
        assert evaluator is not None
        while (task := studies.current_task(engine, evaluator)) is not None:
            choice = "A" if len(task.response_a) > len(task.response_b) else "B"
            studies.cast_vote(engine, evaluator, task.id, choice, why=None, rubric={}, time_taken_ms=9000.0,
                              now=next(clock))  # fmt: skip
    with engine.connect() as conn:
        longer = {
            cid: max(orjson.loads(responses).items(), key=lambda item: len(item[1]))[0]
            for cid, responses in conn.execute(select(schema.comparisons.c.id, schema.comparisons.c.responses))
        }
    settings = load_settings(config_path, ENV)
    mock.reset()

    def run() -> judge.JudgeRun:
        return asyncio.run(judge.run_judge(engine, settings, "s", "judge", concurrency=3, now=lambda: next(clock)))

    first = run()
    after_first = mock.stats()["requests"]
    second = run()
    try:
        yield Judged(engine, store, config_path, settings, mock, longer, first, after_first, second,
                     mock.stats()["requests"])  # fmt: skip
    finally:
        engine.dispose()
        mock.stop()


class TestRunJudge:
    def test_both_orders_stored_for_every_comparison(self, judged: Judged) -> None:
        """Each comparison is asked as "ab" and "ba", the sides swapped, and both votes are stored."""
        assert judged.first == judge.JudgeRun(asked=16, stored=16, skipped_existing=0, failed=0,
                                              cost_usd=judged.first.cost_usd, first_error=None)  # fmt: skip
        votes = judge.judge_votes(judged.engine, "s", "judge")
        assert len(votes) == 16 and {v.evaluator for v in votes} == {"judge:judge"}
        by_comparison: dict[str, list[tuple[str, str]]] = {}
        for vote in votes:
            by_comparison.setdefault(vote.comparison_id, []).append((vote.model_a, vote.model_b))
        assert set(by_comparison) == set(judged.longer)
        for shown in by_comparison.values():
            assert sorted(shown) == [("base", "finetuned"), ("finetuned", "base")]

    def test_choices_follow_the_longer_answer_in_both_orders(self, judged: Judged) -> None:
        """The judge's winner is the longer answer's model whichever side it was shown on; the rubric follows."""
        votes = judge.judge_votes(judged.engine, "s", "judge")
        assert {v.choice for v in votes} == {"A", "B"}  # both positions win: no side preference left
        for vote in votes:
            assert vote.winner == judged.longer[vote.comparison_id]
            assert vote.rubric["tone"] == vote.choice
            assert vote.rubric[f"overall.{vote.choice}"] == 5

    def test_blind_and_as_documented(self, judged: Judged) -> None:
        """The judge is called with the documented body and never sees a model name."""
        sent = judged.mock.requests()
        assert len(sent) == 16
        for request in sent:
            body = request["body"]
            assert body["model"] == "judge-model" and body["temperature"] == 0 and body["max_tokens"] == 400
            assert body["response_format"] == {"type": "json_object"}
            text = " ".join(m["content"] for m in body["messages"])
            assert judge.JUDGE_MARKER in text and "[Response A]" in text and "Which tone fits?" in text
            assert "base" not in text and "finetuned" not in text

    def test_rerun_makes_no_calls(self, judged: Judged) -> None:
        """A second run finds every vote stored: it asks nothing and stores nothing."""
        assert judged.second == judge.JudgeRun(asked=0, stored=0, skipped_existing=16, failed=0, cost_usd=0.0,
                                               first_error=None)  # fmt: skip
        assert judged.requests_after_first == 16 and judged.requests_after_second == 16
        assert len(judge.judge_votes(judged.engine, "s")) == 16

    def test_cost_is_pricing_times_usage(self, judged: Judged) -> None:
        """Cost is the judge model's pricing times the mock's usage (a word a token, +3 per message)."""
        messages = [m for r in judged.mock.requests() for m in r["body"]["messages"]]
        prompt_tokens = sum(len(m["content"].split()) + 3 for m in messages)
        with judged.engine.connect() as conn:
            raws = list(conn.execute(select(schema.judge_votes.c.raw)).scalars())
            stored_cost = sum(conn.execute(select(schema.judge_votes.c.cost_usd)).scalars())
        completion_tokens = sum(len(raw.split(" ")) for raw in raws)
        expected = (prompt_tokens * PRICING["input_per_1m"] + completion_tokens * PRICING["output_per_1m"]) / 1e6
        assert judged.first.cost_usd == pytest.approx(expected, rel=1e-12)
        assert stored_cost == pytest.approx(expected, rel=1e-12)

    def test_unparseable_answers_fail_and_are_not_stored(self, judged: Judged) -> None:
        """An answer cut by max_tokens is not JSON: counted as failed, reported, nothing stored."""
        done = asyncio.run(judge.run_judge(judged.engine, judged.settings, "s", "terse", max_tokens=3, now=lambda: 0.0))
        assert (done.asked, done.stored, done.failed) == (16, 0, 16)
        assert done.first_error is not None and "not JSON" in done.first_error and done.cost_usd > 0
        assert judge.judge_votes(judged.engine, "s", "terse") == []

    def test_unknown_model_or_study(self, judged: Judged) -> None:
        """A model missing from the config or an unknown study is a ValueError naming it."""
        with pytest.raises(ValueError, match="no model named 'nope'"):
            asyncio.run(judge.run_judge(judged.engine, judged.settings, "s", "nope", now=lambda: 0.0))
        with pytest.raises(ValueError, match="no study named 'missing'"):
            asyncio.run(judge.run_judge(judged.engine, judged.settings, "missing", "judge", now=lambda: 0.0))


class TestReport:
    def test_judge_beside_the_humans(self, judged: Judged) -> None:
        """The judge agrees with humans who preferred the longer answer (kappa 1) and ranks that model first."""
        report = study_report(judged.engine, "s", bootstrap=50, judge="judge")
        assert report.votes == 16 and report.evaluators == 2  # humans only
        assert report.judge is not None and report.judge.votes == 16
        assert report.judge.agreement.kappa == pytest.approx(1.0) and report.judge.agreement.shared == 8
        assert [r.model for r in report.judge.ratings] == ["finetuned", "base"]
        with judged.engine.connect() as conn:
            cost = sum(conn.execute(select(schema.judge_votes.c.cost_usd)).scalars())
        assert report.judge.cost_usd == pytest.approx(cost)
        assert "automatic judge" in to_markdown(report)
        assert sum(row.startswith("judge_bradley_terry,") for row in to_csv(report).splitlines()) == 2

    def test_the_only_judge_is_shown_by_default(self, judged: Judged) -> None:
        """Without --judge, the one judge with votes is reported; an absent judge is a warning."""
        assert study_report(judged.engine, "s", bootstrap=0).judge is not None
        absent = study_report(judged.engine, "s", bootstrap=0, judge="nobody")
        assert absent.judge is None and any("nobody" in w for w in absent.warnings)


class TestParse:
    def test_fenced_json_is_read(self) -> None:
        """A ```json fence around the object is tolerated; scores map to the Vote rubric shape."""
        text = '```json\n{"winner": "B", "criteria": {"tone": "B", "overall": {"A": 2, "B": 4}}, "reason": "x"}\n```'
        verdict = judge.parse_verdict(text, RUBRIC)
        assert verdict == judge.Verdict("B", {"tone": "B", "overall.A": 2, "overall.B": 4}, "x")

    @pytest.mark.parametrize("text", ["I prefer B.", '{"winner": "C"}', '{"winner": "A", "criteria": {"tone": "X"}}',
                                      '{"winner": "A", "criteria": {"overall": {"A": 9, "B": 1}}}'])  # fmt: skip
    def test_bad_answers_are_errors(self, text: str) -> None:
        """Prose, an unknown winner, a bad preference or an out-of-range score is a ValueError."""
        with pytest.raises(ValueError):
            judge.parse_verdict(text, RUBRIC)


class TestCli:
    def _abproxy(self, judged: Judged, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy", "humaneval", *args, "--config", str(judged.config),
             "--store", judged.store],
            capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", **ENV},
        )  # fmt: skip

    def test_judge_command(self, judged: Judged) -> None:
        """The command resumes (nothing left to ask here), and exits 2 with one line for a bad model or study."""
        done = self._abproxy(judged, "judge", "s", "--model", "judge")
        assert done.returncode == 0, done.stderr
        assert "0 asked, 0 stored, 16 already stored, 0 failed; cost $0.0000" in done.stdout
        model = self._abproxy(judged, "judge", "s", "--model", "nope")
        assert model.returncode == 2 and model.stderr.count("\n") == 1 and "no model named 'nope'" in model.stderr
        study = self._abproxy(judged, "judge", "missing", "--model", "judge")
        assert study.returncode == 2 and study.stderr.count("\n") == 1 and "no study named 'missing'" in study.stderr
        report = self._abproxy(judged, "report", "s", "--judge", "judge", "--bootstrap", "0", "--format", "csv")
        assert report.returncode == 0 and "judge_bradley_terry,finetuned,judge" in report.stdout


def test_rate_limits_are_retried_as_told(tmp_path: Path) -> None:
    """A judge upstream that answers 429 (Retry-After: 0) to its first three calls: every vote still lands."""
    flaky = MockUpstream("flaky", tmp_path, fail_first=3)
    flaky.start()
    try:
        config = proxy_config(flaky, flaky)
        config["models"]["judge"] = {"upstream": "up-base", "model": "judge-model", "pricing": PRICING}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        engine = engine_for(f"sqlite:///{tmp_path / 'store.db'}")
        migrate(engine)
        pairs = tmp_path / "pairs.jsonl"
        pairs.write_bytes(b"\n".join(orjson.dumps(row) for row in _pairs()) + b"\n")
        clock = itertools.count(1000.0)
        studies.import_jsonl(engine, pairs, now=next(clock))
        studies.create_study(engine, "s", evaluators=["ann"], per_evaluator=4, overlap=0.0, seed=1, now=next(clock))
        waits: list[float] = []

        async def record(seconds: float) -> None:
            waits.append(seconds)

        run = asyncio.run(judge.run_judge(engine, load_settings(path, ENV), "s", "judge", concurrency=1,
                                          now=lambda: next(clock), sleep=record))
        engine.dispose()
        assert (run.stored, run.failed) == (8, 0)  # 4 comparisons, both orders
        assert flaky.stats()["requests"] == 8 + 3 and waits == [0.0, 0.0, 0.0]  # told to retry at once
    finally:
        flaky.stop()
