"""The study report assembles ratings, agreement and warnings from votes; its views agree with it."""

from __future__ import annotations

import csv
import io
import random

import pytest
from rich.console import Console

from proxy.humaneval import agreement, ratings
from proxy.humaneval.ratings import Vote
from proxy.humaneval.render import to_csv, to_markdown, to_table
from proxy.humaneval.report import build_study_report, to_json

STRENGTH = {"base": 0.0, "finetuned": 1.5}  # log-odds: the fine-tune is the better answer 82 % of the time


def _votes(*, seed: int = 1, fast: str | None = None, lefty: str | None = None) -> list[Vote]:
    """Four evaluators on 60 comparisons; the first 20 seen by everyone, the rest by one each."""
    rng = random.Random(seed)
    votes: list[Vote] = []
    ts = 0.0
    evaluators = ["ana", "ben", "cho", "dev"]
    for c in range(60):
        who = evaluators if c < 20 else [evaluators[c % 4]]
        # The comparison's true winner is shared by everyone who sees it (so raters agree).
        p_ft = 1 / (1 + pow(2.718281828, STRENGTH["base"] - STRENGTH["finetuned"]))
        truth = "finetuned" if rng.random() < p_ft else "base"
        for evaluator in who:
            left, right = ("base", "finetuned") if rng.random() < 0.5 else ("finetuned", "base")
            winner = truth if rng.random() < 0.97 else ("base" if truth == "finetuned" else "finetuned")
            if evaluator == lefty:
                choice = "A"
            else:
                choice = "A" if winner == left else "B"
            if rng.random() < 0.03:
                choice = "tie"
            ts += 1
            score_left, score_right = (4, 3) if choice == "A" else (3, 4)
            votes.append(Vote(f"c{c}", evaluator, left, right, choice, ts,  # type: ignore[arg-type]
                              time_taken_ms=800.0 if evaluator == fast else 9000.0 + rng.random() * 5000,
                              rubric={"tone": choice, "overall.A": score_left, "overall.B": score_right}))
    return votes


CRITERIA = {"tone": "preference", "overall": "score"}


class TestAssembly:
    def test_figures_are_the_libraries(self) -> None:
        votes = _votes()
        report = build_study_report("s", votes, criteria=CRITERIA, bootstrap=200)
        assert report.models == ["base", "finetuned"] and report.votes == len(votes)
        assert report.comparisons == 60 and report.multi_rated == 20 and report.evaluators == 4
        assert report.elo == ratings.elo(votes, report.models)
        assert [r.model for r in report.bradley_terry] == ["finetuned", "base"]  # best first
        assert report.pairs == ratings.pairwise(votes)
        assert report.kappa_pairs == agreement.cohen_pairs(votes)
        assert report.fleiss == agreement.fleiss(votes)
        assert {c.criterion for c in report.criteria} == {"tone", "overall"}
        assert report.warnings == []

    def test_judge_votes_are_kept_apart(self) -> None:
        votes = _votes()
        judged = [*votes, Vote("c1", "judge:gpt", "base", "finetuned", "B", 999.0)]
        report = build_study_report("s", judged, criteria=CRITERIA, bootstrap=50)
        assert report.votes == len(votes) and report.evaluators == 4

    def test_warnings(self) -> None:
        report = build_study_report("s", _votes(fast="ben", lefty="cho"), criteria=CRITERIA, bootstrap=50)
        text = " | ".join(report.warnings)
        assert "ben takes 0.8 s per vote" in text
        assert "agree little" in text and "cho" in text  # always-left disagrees with the others

    def test_small_overlap_is_warned(self) -> None:
        votes = [v for v in _votes() if v.comparison_id not in {f"c{i}" for i in range(18)}]
        report = build_study_report("s", votes, criteria=CRITERIA, bootstrap=50)
        assert any("aim for 20 %" in w for w in report.warnings)


class TestViews:
    def test_json_table_markdown_csv(self) -> None:
        report = build_study_report("s", _votes(), criteria=CRITERIA, bootstrap=100)
        body = to_json(report)
        assert body["study"] == "s" and body["bradley_terry"][0]["model"] == "finetuned"
        assert "NaN" not in str(body)
        console = Console(record=True, width=200)
        to_table(report, console)
        text = console.export_text()
        assert "Bradley-Terry" in text and ("finetuned vs base" in text or "base vs finetuned" in text)
        markdown = to_markdown(report)
        assert markdown.startswith("## Study s") and "| model | BT rating |" in markdown
        rows = list(csv.reader(io.StringIO(to_csv(report))))
        bt = [r for r in rows if r[0] == "bradley_terry"]
        assert len(bt) == 2 and float(bt[0][3]) == pytest.approx(report.bradley_terry[0].rating)

    def test_empty_study(self) -> None:
        report = build_study_report("empty", [], criteria={}, bootstrap=10)
        assert report.votes == 0 and report.bradley_terry == [] and to_markdown(report)
