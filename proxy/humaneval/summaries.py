"""Reading a study back: its votes for the report, and its progress for the admin pages and the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import Engine, func, select, true

from proxy.humaneval.rubric import Rubric
from proxy.store.schema import evaluators, studies, tasks, votes

if TYPE_CHECKING:
    from proxy.humaneval.ratings import Vote


def study_votes(engine: Engine, study: str) -> list[Vote]:
    """The study's human votes, oldest first (ties by evaluator and position, so the order is fixed)."""
    # ratings imports scipy and scikit-learn (~1.5 s): paid by the report, not by every page or CLI command.
    from proxy.humaneval.ratings import Vote

    query = (
        select(votes.c.comparison_id, votes.c.evaluator, votes.c.model_a, votes.c.model_b, votes.c.choice,
               votes.c.created_at, votes.c.time_taken_ms, votes.c.rubric)
        .join(tasks, tasks.c.id == votes.c.task_id)
        .where(votes.c.study == study)
        .order_by(votes.c.created_at, votes.c.evaluator, tasks.c.position)
    )  # fmt: skip
    with engine.connect() as conn:
        return [
            Vote(comparison_id=r.comparison_id, evaluator=r.evaluator, model_a=r.model_a, model_b=r.model_b,
                 choice=r.choice, ts=r.created_at, time_taken_ms=r.time_taken_ms,
                 rubric=orjson.loads(r.rubric) if r.rubric else {})
            for r in conn.execute(query)
        ]  # fmt: skip


@dataclass(frozen=True, slots=True)
class EvaluatorProgress:
    name: str
    voted: int
    total: int
    revoked: bool
    last_vote_at: float | None


@dataclass(frozen=True, slots=True)
class StudySummary:
    name: str
    created_at: float
    models: list[str]
    rubric: Rubric
    comparisons: int
    evaluators: list[EvaluatorProgress]


def list_studies(engine: Engine) -> list[StudySummary]:
    """Every study, newest first."""
    return _summaries(engine, None)


def get_study(engine: Engine, name: str) -> StudySummary | None:
    found = _summaries(engine, name)
    return found[0] if found else None


def _summaries(engine: Engine, name: str | None) -> list[StudySummary]:
    def only(column: Any) -> Any:
        return true() if name is None else column == name

    with engine.connect() as conn:
        study_rows = conn.execute(
            select(studies).where(only(studies.c.name)).order_by(studies.c.created_at.desc(), studies.c.name)
        ).all()
        used: dict[str, int] = dict(conn.execute(
            select(tasks.c.study, func.count(tasks.c.comparison_id.distinct()))
            .where(only(tasks.c.study)).group_by(tasks.c.study)
        ).all())  # fmt: skip
        totals = conn.execute(
            select(tasks.c.study, tasks.c.evaluator, func.count())
            .where(only(tasks.c.study)).group_by(tasks.c.study, tasks.c.evaluator)
        ).all()  # fmt: skip
        voted = {
            (r.study, r.evaluator): (r.n, r.last)
            for r in conn.execute(
                select(votes.c.study, votes.c.evaluator, func.count().label("n"), func.max(votes.c.created_at)
                       .label("last"))
                .where(only(votes.c.study)).group_by(votes.c.study, votes.c.evaluator)
            )
        }  # fmt: skip
        people = conn.execute(
            select(evaluators.c.study, evaluators.c.name, evaluators.c.revoked_at)
            .where(only(evaluators.c.study)).order_by(evaluators.c.study, evaluators.c.name)
        ).all()  # fmt: skip
    total_of = {(s, e): int(n) for s, e, n in totals}
    progress_of: dict[str, list[EvaluatorProgress]] = {}
    for p in people:
        n, last = voted.get((p.study, p.name), (0, None))
        progress_of.setdefault(p.study, []).append(EvaluatorProgress(
            name=p.name, voted=int(n), total=total_of.get((p.study, p.name), 0), revoked=p.revoked_at is not None,
            last_vote_at=last,
        ))  # fmt: skip
    return [
        StudySummary(name=s.name, created_at=s.created_at, models=list(orjson.loads(s.settings).get("models", [])),
                     rubric=Rubric.from_json(s.rubric), comparisons=int(used.get(s.name, 0)),
                     evaluators=progress_of.get(s.name, []))
        for s in study_rows
    ]  # fmt: skip
