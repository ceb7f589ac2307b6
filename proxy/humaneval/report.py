"""A study's results: ratings with intervals, head-to-head rates, rubric, agreement and warnings.

    build_study_report(votes, models=, criteria=) -> StudyReport      (pure: the votes in, figures out)
    study_report(engine, name, judge=) -> StudyReport                 (reads the study from the store)
    build_judge_summary(judge, judge_votes, human_votes) -> JudgeSummary   (an automatic judge beside them)

The figures come from `ratings` and `agreement`; this module only assembles them and says what
a reader should worry about: agreement under kappa 0.4, a side preferred more than chance
allows, evaluators who click through faster than anyone can read two answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from proxy.humaneval import agreement, ratings
from proxy.humaneval.ratings import Vote
from proxy.jsonable import dataclass_json

# Under this median time per vote nobody reads two answers: the evaluator is flagged.
CLICK_THROUGH_MS = 3000.0
LOW_KAPPA = 0.4
POSITION_BIAS_ALPHA = 0.01


@dataclass(frozen=True, slots=True)
class JudgeSummary:
    """An automatic judge (`proxy.humaneval.judge`), kept apart from the humans' figures."""

    judge: str  # the config's model name
    votes: int  # both orders of each comparison count
    agreement: agreement.PairKappa  # its per-comparison verdict (both orders combined) vs the human majority
    ratings: list[ratings.Rating]  # Bradley-Terry over all its votes; [] when they cannot give one
    cost_usd: float


@dataclass(slots=True)
class StudyReport:
    study: str
    models: list[str]
    votes: int
    evaluators: int
    comparisons: int
    multi_rated: int  # comparisons seen by two or more evaluators (the agreement sample)
    elo: dict[str, float]
    elo_orderings: dict[str, tuple[float, float, float, float]]  # mean, sd, 2.5 %, 97.5 % over random orders
    bradley_terry: list[ratings.Rating]
    pairs: list[ratings.PairResult]
    criteria: list[ratings.CriterionResult]
    kappa_pairs: list[agreement.PairKappa]
    fleiss: float | None
    majority: list[agreement.MajorityAgreement]
    position: ratings.PositionBias
    median_ms: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    judge: JudgeSummary | None = None


def build_study_report(
    study: str, votes: list[Vote], *, criteria: Mapping[str, str] | None = None, bootstrap: int = 1000, seed: int = 0
) -> StudyReport:
    """Everything but the judge, from human votes (in time order)."""
    humans = [v for v in votes if not v.evaluator.startswith("judge:")]
    models = sorted({m for v in humans for m in (v.model_a, v.model_b)})
    raters: dict[str, set[str]] = {}
    for vote in humans:
        raters.setdefault(vote.comparison_id, set()).add(vote.evaluator)
    report = StudyReport(
        study=study,
        models=models,
        votes=len(humans),
        evaluators=len({v.evaluator for v in humans}),
        comparisons=len(raters),
        multi_rated=sum(1 for who in raters.values() if len(who) >= 2),
        elo=ratings.elo(humans, models) if humans else {},
        elo_orderings=ratings.elo_orderings(humans, models, seed=seed) if humans else {},
        bradley_terry=[],
        pairs=ratings.pairwise(humans),
        criteria=ratings.per_criterion(humans, criteria or {}),
        kappa_pairs=agreement.cohen_pairs(humans),
        fleiss=agreement.fleiss(humans),
        majority=agreement.with_majority(humans),
        position=ratings.position_bias(humans),
        median_ms=ratings.median_time_per_vote(humans),
    )
    report.warnings = _warnings(report)
    if len(models) >= 2:
        try:
            report.bradley_terry = ratings.bradley_terry(humans, models, bootstrap=bootstrap, seed=seed)
        except ValueError as exc:  # models that never met, directly or through others: no common scale
            report.warnings.append(f"no Bradley-Terry ratings: {exc}")
    return report


def _warnings(report: StudyReport) -> list[str]:
    found = []
    if report.comparisons and report.multi_rated / report.comparisons < 0.2:
        found.append(f"only {report.multi_rated} of {report.comparisons} comparisons were rated by two or more "
                     "evaluators: agreement rests on a small sample (aim for 20 %)")
    for pair in report.kappa_pairs:
        if pair.flag:
            kappa = "undefined" if pair.kappa is None else f"{pair.kappa:.2f}"
            found.append(f"evaluators {pair.a} and {pair.b} agree little (Cohen's kappa {kappa} on {pair.shared} "
                         f"shared comparisons, under {LOW_KAPPA})")
    bias = report.position.p_value
    if bias is not None and bias < POSITION_BIAS_ALPHA:
        found.append(f"position bias: {report.position.left_share:.0%} of decisive votes went to the left answer "
                     f"(p = {bias:.2g})")
    for evaluator, median in sorted(report.median_ms.items()):
        if median < CLICK_THROUGH_MS:
            found.append(f"{evaluator} takes {median / 1000:.1f} s per vote (median): too fast to read both answers")
    return found


def build_judge_summary(
    judge: str, judge_votes: list[Vote], human_votes: list[Vote], *, cost_usd: float = 0.0, bootstrap: int = 1000,
    seed: int = 0,
) -> JudgeSummary:
    """The judge's agreement with the human majority and its own ratings, from its votes (evaluator "judge:...")."""
    from proxy.humaneval.judge import consensus

    humans = [v for v in human_votes if not v.evaluator.startswith(agreement.JUDGE_PREFIX)]
    models = sorted({m for v in judge_votes for m in (v.model_a, v.model_b)})
    try:
        judged = ratings.bradley_terry(judge_votes, models, bootstrap=bootstrap, seed=seed) if len(models) >= 2 else []
    except ValueError:  # models that never met: no common scale
        judged = []
    return JudgeSummary(judge=judge, votes=len(judge_votes),
                        agreement=agreement.judge_agreement(consensus(judge_votes), humans), ratings=judged,
                        cost_usd=cost_usd)  # fmt: skip


def study_report(engine: sa.Engine, name: str, *, bootstrap: int = 1000, judge: str | None = None) -> StudyReport:
    """The report of a stored study; KeyError if there is no such study.

    With judge votes (of `judge`, or of the only judge there is when `judge` is None) `report.judge` is filled.
    """
    from proxy.humaneval import judge as judging
    from proxy.humaneval import studies

    summary = studies.get_study(engine, name)
    if summary is None:
        raise KeyError(name)
    criteria = {c.name: c.kind for c in summary.rubric.criteria}
    humans = studies.study_votes(engine, name)
    report = build_study_report(name, humans, criteria=criteria, bootstrap=bootstrap)
    present = judging.judges(engine, name)
    if judge is None and len(present) > 1:
        report.warnings.append(f"several judges voted ({', '.join(present)}): choose one with --judge")
    chosen = judge if judge is not None else present[0] if len(present) == 1 else None
    if chosen is not None and chosen in present:
        report.judge = build_judge_summary(chosen, judging.judge_votes(engine, name, chosen), humans,
                                           cost_usd=judging.judge_cost(engine, name, chosen), bootstrap=bootstrap)
    elif judge is not None:
        report.warnings.append(f"no votes by judge {judge!r} in this study")
    return report


def to_json(report: StudyReport) -> dict[str, Any]:
    return dataclass_json(report)
