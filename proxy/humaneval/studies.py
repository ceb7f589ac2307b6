"""Studies: the public API of blind human comparison, and each evaluator's blind task list and votes.

A study hands stored comparisons to evaluators as tasks (`allocation` decides who sees what and
which model is A). What an evaluator may see is a `TaskView`, built here and nowhere else: it holds
the task's random id, the prompt and the two answers, never a model name or a comparison id. The
model behind each side stays in the `tasks` and `votes` rows.

Every write is one transaction; a double-submitted vote, or one racing another tab, is stored once
(the `votes` primary key is the task id) and the first vote stays.

The rest of the API lives beside this module and is re-exported here, so callers import one place:
`importer` (comparisons from JSONL, flags), `rubric`, `links` (evaluators' tokens) and `summaries`
(a study's votes and progress).
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import orjson
from sqlalchemy import Connection, Engine, delete, func, select
from sqlalchemy.exc import IntegrityError

from proxy.humaneval.allocation import Candidate, plan
from proxy.humaneval.importer import ImportResult, flag_reason, import_jsonl
from proxy.humaneval.insert import insert_for
from proxy.humaneval.links import Evaluator, evaluator_for, hash_token, new_link, new_token, revoke
from proxy.humaneval.rubric import SCORES, Criterion, Rubric, load_rubric
from proxy.humaneval.summaries import EvaluatorProgress, StudySummary, get_study, list_studies, study_votes
from proxy.store.schema import comparisons, studies, tasks, votes
from proxy.store.schema import evaluators as evaluator_table  # `evaluators` is create_study's argument

__all__ = [
    "CreatedStudy",
    "Criterion",
    "Evaluator",
    "EvaluatorProgress",
    "ImportResult",
    "Rubric",
    "StudySummary",
    "TaskView",
    "VoteView",
    "cast_vote",
    "create_study",
    "current_task",
    "evaluator_for",
    "flag_reason",
    "get_study",
    "get_task",
    "import_jsonl",
    "list_studies",
    "load_rubric",
    "new_link",
    "progress",
    "revoke",
    "study_votes",
    "undo_last",
]

Choice = Literal["A", "tie", "B"]
CHOICES: tuple[Choice, ...] = ("A", "tie", "B")
# Study and evaluator names appear in URLs of the admin pages and in CLI arguments.
_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,128}")
WHY_MAX = 2000


# -- creating a study --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreatedStudy:
    name: str
    links: dict[str, str]  # evaluator -> token (shown ONCE; only sha256(token) is stored)
    comparisons: int  # distinct comparisons used
    tasks: int
    overlap_share: float  # share of used comparisons assigned to >= 2 evaluators
    excluded_flagged: int  # eligible but for a flag: left out so no answer gives its model away


def create_study(
    engine: Engine,
    name: str,
    *,
    evaluators: Sequence[str],
    per_evaluator: int,
    overlap: float,
    models: tuple[str, str] | None = None,
    rubric: Rubric | None = None,
    seed: int = 0,
    source: str | None = None,
    comparison_ids: Collection[str] | None = None,
    now: float,
) -> CreatedStudy:
    """Draw a study from the stored comparisons (of `source` only, and of `comparison_ids` only, if given)
    in one transaction.

    With `models`, only comparisons holding both are used and every task compares those two. Without,
    every comparison is used and a task compares its two models, or for 3+ models a pair drawn once
    per comparison (see `allocation`), so a study can rank several models. Raises ValueError, writing
    nothing, for a bad argument, an existing study, or fewer eligible comparisons than `per_evaluator`.
    """
    names = list(evaluators)
    _check_study_args(name, names, per_evaluator, overlap, models)
    with engine.begin() as conn:
        if conn.execute(select(studies.c.name).where(studies.c.name == name)).first() is not None:
            raise ValueError(f"a study named {name!r} already exists")
        pool, excluded = _eligible(conn, models, source, comparison_ids)
        where = f" from source {source!r}" if source is not None else ""
        if not pool:
            wanted = f" with both {models[0]!r} and {models[1]!r}" if models else ""
            flagged = f" that is not flagged ({excluded} are)" if excluded else ""
            raise ValueError(f"no comparison{wanted}{where} is stored{flagged}")
        try:
            planned = plan(pool, names, per_evaluator, overlap, models=models, seed=seed)
        except ValueError as exc:
            raise ValueError(f"{exc}{where}" + (f" ({excluded} more are flagged)" if excluded else "")) from None
        used_models = sorted({m for t in planned.tasks for m in (t.model_a, t.model_b)})
        settings = {"models": used_models, "per_evaluator": per_evaluator, "overlap": overlap, "seed": seed,
                    "source": source, "fixed_models": models is not None}  # fmt: skip
        links = {e: new_token() for e in names}
        try:
            conn.execute(studies.insert(), [{
                "name": name, "rubric": (rubric or Rubric()).to_json(),
                "settings": orjson.dumps(settings).decode(), "created_at": now,
            }])  # fmt: skip
        except IntegrityError:  # created by someone else since the check above
            raise ValueError(f"a study named {name!r} already exists") from None
        conn.execute(evaluator_table.insert(), [
            {"study": name, "name": e, "token_hash": hash_token(token), "created_at": now, "revoked_at": None}
            for e, token in links.items()
        ])  # fmt: skip
        conn.execute(tasks.insert(), [
            {"id": _task_id(), "study": name, "evaluator": t.evaluator, "position": t.position,
             "comparison_id": t.comparison_id, "model_a": t.model_a, "model_b": t.model_b}
            for t in planned.tasks
        ])  # fmt: skip
    return CreatedStudy(name=name, links=links, comparisons=planned.comparisons, tasks=len(planned.tasks),
                        overlap_share=planned.overlap_share, excluded_flagged=excluded)  # fmt: skip


def _check_study_args(
    name: str, names: Sequence[str], per_evaluator: int, overlap: float, models: tuple[str, str] | None
) -> None:
    _check_name("study name", name)
    if not names:
        raise ValueError("a study needs at least one evaluator")
    for evaluator in names:
        _check_name("evaluator name", evaluator)
    duplicated = sorted({e for e in names if names.count(e) > 1})
    if duplicated:
        raise ValueError(f"duplicate evaluator name(s): {', '.join(duplicated)}")
    if isinstance(per_evaluator, bool) or not isinstance(per_evaluator, int) or per_evaluator < 1:
        raise ValueError(f"per_evaluator must be an integer >= 1, got {per_evaluator!r}")
    if not isinstance(overlap, int | float) or not 0 <= overlap <= 1:
        raise ValueError(f"overlap must be between 0 and 1, got {overlap!r}")
    if overlap > 0 and len(names) < 2:
        raise ValueError("overlap needs at least two evaluators (give --overlap 0 for one)")
    if models is not None and (len(models) != 2 or models[0] == models[1] or not all(models)):
        raise ValueError(f"models must be two different model names, got {models!r}")


def _check_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{what} must be 1-128 characters of A-Z a-z 0-9 _ . @ -, got {name!r}")


def _eligible(
    conn: Connection, models: tuple[str, str] | None, source: str | None, only: Collection[str] | None
) -> tuple[list[Candidate], int]:
    """The comparisons a study may draw from, and how many the flags cost.

    In content order, not id order: ids are random, so the same file in another store gives the same plan for a seed.
    """
    query = select(comparisons.c.id, comparisons.c.responses, comparisons.c.flagged)
    query = query.order_by(comparisons.c.content_hash)
    if source is not None:
        query = query.where(comparisons.c.source == source)
    pool: list[Candidate] = []
    excluded = 0
    wanted = None if only is None else set(only)
    for cid, responses, flagged in conn.execute(query):
        if wanted is not None and cid not in wanted:
            continue
        names = tuple(orjson.loads(responses))
        if models is not None and not set(models) <= set(names):
            continue
        if flagged:
            excluded += 1
            continue
        pool.append(Candidate(cid, names))
    return pool, excluded


def _task_id() -> str:
    return "t_" + secrets.token_hex(16)


# -- an evaluator's tasks and votes ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VoteView:
    choice: Choice
    why: str | None
    rubric: dict[str, str | int]


@dataclass(frozen=True, slots=True)
class TaskView:
    """Everything an evaluator's page may show: no model name, no comparison id."""

    id: str  # the task id ("t_..."), random
    position: int  # 0-based
    total: int
    prompt: str | list[dict[str, str]]
    response_a: str
    response_b: str
    vote: VoteView | None


def current_task(engine: Engine, evaluator: Evaluator) -> TaskView | None:
    """The first task (by position) without a vote; None when all are done."""
    with engine.connect() as conn:
        row = conn.execute(
            _task_query(evaluator).where(votes.c.task_id.is_(None)).order_by(tasks.c.position).limit(1)
        ).first()
        return None if row is None else _view(row, _total(conn, evaluator))


def get_task(engine: Engine, evaluator: Evaluator, task_id: str) -> TaskView | None:
    """One of this evaluator's tasks, with its vote if any; None for any other id."""
    with engine.connect() as conn:
        row = conn.execute(_task_query(evaluator).where(tasks.c.id == task_id)).first()
        return None if row is None else _view(row, _total(conn, evaluator))


def progress(engine: Engine, evaluator: Evaluator) -> tuple[int, int]:
    """(voted, total) for the evaluator's list."""
    with engine.connect() as conn:
        voted = conn.execute(
            select(func.count()).select_from(votes)
            .where(votes.c.study == evaluator.study, votes.c.evaluator == evaluator.name)
        ).scalar_one()  # fmt: skip
        return int(voted), _total(conn, evaluator)


def cast_vote(
    engine: Engine,
    evaluator: Evaluator,
    task_id: str,
    choice: str,
    *,
    why: str | None,
    rubric: Mapping[str, str | int],
    time_taken_ms: float | None,
    now: float,
) -> bool:
    """Store the vote; False when the task already has one (a double submit: the first vote stays).

    ValueError, writing nothing, for: a task not this evaluator's, a choice other than A / tie / B, a
    rubric key not in the study's rubric ("<name>" for a preference, "<name>.A" / "<name>.B" for a
    score), a preference answer other than A / tie / B, a score other than an integer 1..5 (digit
    strings, as a form sends them, are accepted), `why` over 2000 characters, or a negative or
    non-finite time. Rubric answers may be partial: evaluators can skip a criterion.
    """
    if choice not in CHOICES:
        raise ValueError(f"choice must be 'A', 'tie' or 'B', got {choice!r:.40}")
    why = (why or "").strip() or None
    if why is not None and (len(why) > WHY_MAX or "\x00" in why):
        raise ValueError(f"why must be at most {WHY_MAX} characters of text")
    if time_taken_ms is not None and (not math.isfinite(time_taken_ms) or time_taken_ms < 0):
        raise ValueError(f"time_taken_ms must be a finite number >= 0, got {time_taken_ms!r}")
    with engine.begin() as conn:
        task = conn.execute(
            select(tasks.c.comparison_id, tasks.c.model_a, tasks.c.model_b, studies.c.rubric)
            .join(studies, studies.c.name == tasks.c.study)
            .where(tasks.c.id == task_id, tasks.c.study == evaluator.study, tasks.c.evaluator == evaluator.name)
        ).first()
        if task is None:
            raise ValueError("unknown task")
        answers = _check_rubric(Rubric.from_json(task.rubric), rubric)
        statement = insert_for(conn)(votes).on_conflict_do_nothing(index_elements=["task_id"])
        result = conn.execute(statement.execution_options(preserve_rowcount=True), [{
            "task_id": task_id, "study": evaluator.study, "evaluator": evaluator.name,
            "comparison_id": task.comparison_id, "model_a": task.model_a, "model_b": task.model_b,
            "choice": choice, "why": why, "rubric": orjson.dumps(answers).decode() if answers else None,
            "time_taken_ms": time_taken_ms, "created_at": now,
        }])  # fmt: skip
        return result.rowcount > 0


def undo_last(engine: Engine, evaluator: Evaluator) -> str | None:
    """Delete the evaluator's most recent vote; its task id (now `current_task` again), or None."""
    with engine.begin() as conn:
        row = conn.execute(
            select(votes.c.task_id)
            .join(tasks, tasks.c.id == votes.c.task_id)
            .where(votes.c.study == evaluator.study, votes.c.evaluator == evaluator.name)
            .order_by(votes.c.created_at.desc(), tasks.c.position.desc())
            .limit(1)
        ).first()
        if row is None:
            return None
        conn.execute(delete(votes).where(votes.c.task_id == row.task_id))
        return cast(str, row.task_id)


def _task_query(evaluator: Evaluator) -> Any:
    return (
        select(tasks.c.id, tasks.c.position, tasks.c.model_a, tasks.c.model_b, comparisons.c.prompt,
               comparisons.c.responses, votes.c.choice, votes.c.why, votes.c.rubric)
        .join(comparisons, comparisons.c.id == tasks.c.comparison_id)
        .outerjoin(votes, votes.c.task_id == tasks.c.id)
        .where(tasks.c.study == evaluator.study, tasks.c.evaluator == evaluator.name)
    )  # fmt: skip


def _total(conn: Connection, evaluator: Evaluator) -> int:
    return int(conn.execute(
        select(func.count()).select_from(tasks).where(tasks.c.study == evaluator.study,
                                                       tasks.c.evaluator == evaluator.name)
    ).scalar_one())  # fmt: skip


def _view(row: Any, total: int) -> TaskView:
    # The models are read only to pick the answers; they do not leave this function.
    responses = orjson.loads(row.responses)
    vote = None
    if row.choice is not None:
        vote = VoteView(choice=row.choice, why=row.why, rubric=orjson.loads(row.rubric) if row.rubric else {})
    return TaskView(id=row.id, position=row.position, total=total, prompt=orjson.loads(row.prompt),
                    response_a=responses[row.model_a], response_b=responses[row.model_b], vote=vote)  # fmt: skip


def _check_rubric(rubric: Rubric, answers: Mapping[str, str | int]) -> dict[str, str | int]:
    checked: dict[str, str | int] = {}
    for key, value in answers.items():
        name, dot, side = key.partition(".")
        criterion = rubric.get(name)
        if criterion is None or (criterion.kind == "preference" and dot) or \
                (criterion.kind == "score" and side not in ("A", "B")):
            raise ValueError(f"rubric answer {key!r:.60} is not in this study's rubric")
        if criterion.kind == "preference":
            if value not in CHOICES:
                raise ValueError(f"rubric {name}: answer must be 'A', 'tie' or 'B', got {value!r:.40}")
            checked[key] = value
        else:
            score = int(value) if isinstance(value, str) and value.isascii() and value.isdigit() else value
            if isinstance(score, bool) or not isinstance(score, int) or score not in SCORES:
                raise ValueError(f"rubric {key}: score must be an integer 1..5, got {value!r:.40}")
            checked[key] = score
    for criterion in rubric.criteria:
        sides = [f"{criterion.name}.{side}" in checked for side in ("A", "B")] if criterion.kind == "score" else []
        if any(sides) and not all(sides):
            # per_criterion compares the two scores of one vote: half a pair cannot be compared.
            raise ValueError(f"rubric {criterion.name}: score both responses, or neither")
    return checked
