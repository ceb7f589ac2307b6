"""Evaluation runs in the store: created or resumed, answers written as they arrive, read back whole.

A run's identity is what its models were asked: the test file's hash, the models (config name, upstream
and upstream model id, in order, the baseline first), the system prompt and max_tokens. Starting a run
with the same identity resumes it; the same name with a different identity is refused, naming what
differs, so answers to two different questions never mix. Scoring (format checks, case folding) is not
part of the identity: when it changes, the stored answers are scored again, which costs no model call.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, func, select, update

from proxy.humaneval.insert import insert_for
from proxy.offline_eval.checks import FormatChecks
from proxy.offline_eval.scoring import Score, score
from proxy.offline_eval.testset import Example, TestSet
from proxy.store.schema import eval_examples, eval_results, eval_runs

RUN_NAME = re.compile(r"[A-Za-z0-9_.@:-]{1,128}")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str  # the config's model name
    upstream: str
    model: str  # the upstream's model id: the version evaluated


@dataclass(frozen=True, slots=True)
class Scoring:
    casefold: bool
    checks: FormatChecks | None

    def as_data(self) -> dict[str, Any]:
        return {"casefold": self.casefold, "checks": self.checks.declared if self.checks else None,
                "checks_file": self.checks.source if self.checks else None}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Result:
    model: str
    example_id: str
    prediction: str
    finish_reason: str | None
    exact: bool
    format_ok: bool | None
    format_failures: list[str]
    similarity: float
    latency_ms: float
    prompt_tokens: int | None
    completion_tokens: int | None
    cost_usd: float | None
    attempts: int
    created_at: float


@dataclass(frozen=True, slots=True)
class Run:
    id: str
    created_at: float
    test_file: str
    test_sha256: str
    models: list[ModelSpec]
    system_prompt: str | None
    max_tokens: int
    scoring: dict[str, Any]
    examples: list[Example]  # in file order
    results: dict[str, dict[str, Result]]  # model -> example id -> result

    @property
    def answered(self) -> int:
        return sum(len(r) for r in self.results.values())

    @property
    def expected_answers(self) -> int:
        return len(self.examples) * len(self.models)


def default_run_id(test: TestSet, models: Sequence[ModelSpec], system_prompt: str | None, max_tokens: int) -> str:
    """`<test file stem>-<8 hex of the identity>`: the same command names the same run, so it resumes."""
    identity = orjson.dumps([test.sha256, [[m.name, m.upstream, m.model] for m in models], system_prompt, max_tokens])
    stem = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(test.path).stem)[:100] or "run"
    return f"{stem}-{hashlib.sha256(identity).hexdigest()[:8]}"


def open_run(
    engine: Engine, run_id: str, test: TestSet, models: Sequence[ModelSpec], *, system_prompt: str | None,
    max_tokens: int, scoring: Scoring, now: float,
) -> tuple[set[tuple[str, str]], int]:  # fmt: skip
    """Create run `run_id`, or resume it: the (model, example id) pairs already answered, and how many
    stored answers were scored again because the scoring changed. ValueError, writing nothing, when a run
    of that name asked something else."""
    if not RUN_NAME.fullmatch(run_id):
        raise ValueError(f"run name must be 1-128 characters of A-Z a-z 0-9 _ . @ : -, got {run_id!r}")
    models_json = orjson.dumps([{"name": m.name, "upstream": m.upstream, "model": m.model} for m in models]).decode()
    scoring_json = orjson.dumps(scoring.as_data()).decode()
    with engine.begin() as conn:
        row = conn.execute(select(eval_runs).where(eval_runs.c.id == run_id)).first()
        if row is None:
            conn.execute(eval_runs.insert(), [{
                "id": run_id, "created_at": now, "test_file": test.path, "test_sha256": test.sha256,
                "examples": len(test.examples), "models": models_json, "system_prompt": system_prompt,
                "max_tokens": max_tokens, "scoring": scoring_json,
            }])  # fmt: skip
            conn.execute(eval_examples.insert(), [
                {"run_id": run_id, "example_id": e.id, "position": e.position, "line": e.line,
                 "prompt": orjson.dumps(e.prompt).decode(), "expected": e.expected}
                for e in test.examples
            ])  # fmt: skip
            return set(), 0
        differs = [
            what for what, stored, given in (
                ("test file", row.test_sha256, test.sha256), ("models", row.models, models_json),
                ("system prompt", row.system_prompt, system_prompt), ("max_tokens", row.max_tokens, max_tokens),
            ) if stored != given
        ]  # fmt: skip
        if differs:
            raise ValueError(f"run {run_id!r} exists and asked with another {' and '.join(differs)}; "
                             "choose another --run name (or leave --run out for a name from the inputs)")  # fmt: skip
        rescored = _rescore(conn, run_id, scoring) if row.scoring != scoring_json else 0
        if rescored or row.scoring != scoring_json:
            conn.execute(update(eval_runs).where(eval_runs.c.id == run_id).values(scoring=scoring_json))
        done = conn.execute(select(eval_results.c.model, eval_results.c.example_id)
                            .where(eval_results.c.run_id == run_id))  # fmt: skip
        return {(m, e) for m, e in done}, rescored


def _rescore(conn: Connection, run_id: str, scoring: Scoring) -> int:
    expected = dict(conn.execute(select(eval_examples.c.example_id, eval_examples.c.expected)
                                 .where(eval_examples.c.run_id == run_id)).all())  # fmt: skip
    stored = conn.execute(select(eval_results.c.model, eval_results.c.example_id, eval_results.c.prediction)
                          .where(eval_results.c.run_id == run_id)).all()  # fmt: skip
    for model, example_id, prediction in stored:
        scored = score(prediction, expected[example_id], checks=scoring.checks, casefold=scoring.casefold)
        conn.execute(update(eval_results).where(
            eval_results.c.run_id == run_id, eval_results.c.model == model, eval_results.c.example_id == example_id,
        ).values(**_score_columns(scored)))  # fmt: skip
    return len(stored)


def _score_columns(scored: Score) -> dict[str, Any]:
    return {"exact": scored.exact, "format_ok": scored.format_ok, "similarity": scored.similarity,
            "format_failures": orjson.dumps(scored.format_failures).decode() if scored.format_failures else None}


def result_writer(engine: Engine, run_id: str, scoring: Scoring) -> Callable[..., None]:
    """`write(model, example, prediction, finish_reason, latency_ms, usage tokens, cost, attempts, now)`:
    score one answer and store it in its own transaction (an interrupted run keeps every stored answer)."""

    def write(
        model: str, example: Example, prediction: str, finish_reason: str | None, latency_ms: float,
        tokens: tuple[int | None, int | None], cost_usd: float | None, attempts: int, now: float,
    ) -> None:  # fmt: skip
        scored = score(prediction, example.expected, checks=scoring.checks, casefold=scoring.casefold)
        row = {"run_id": run_id, "model": model, "example_id": example.id, "prediction": prediction,
               "finish_reason": finish_reason, "latency_ms": latency_ms, "prompt_tokens": tokens[0],
               "completion_tokens": tokens[1], "cost_usd": cost_usd, "attempts": attempts, "created_at": now,
               **_score_columns(scored)}  # fmt: skip
        with engine.begin() as conn:
            conn.execute(insert_for(conn)(eval_results).on_conflict_do_nothing(), [row])

    return write


def load_run(engine: Engine, run_id: str) -> Run | None:
    with engine.connect() as conn:
        row = conn.execute(select(eval_runs).where(eval_runs.c.id == run_id)).first()
        if row is None:
            return None
        examples = [
            Example(r.example_id, r.position, r.line, orjson.loads(r.prompt), r.expected)
            for r in conn.execute(select(eval_examples).where(eval_examples.c.run_id == run_id)
                                  .order_by(eval_examples.c.position))
        ]  # fmt: skip
        models = [ModelSpec(**m) for m in orjson.loads(row.models)]
        results: dict[str, dict[str, Result]] = {m.name: {} for m in models}
        for r in conn.execute(select(eval_results).where(eval_results.c.run_id == run_id)):
            results.setdefault(r.model, {})[r.example_id] = Result(
                model=r.model, example_id=r.example_id, prediction=r.prediction, finish_reason=r.finish_reason,
                exact=bool(r.exact), format_ok=None if r.format_ok is None else bool(r.format_ok),
                format_failures=orjson.loads(r.format_failures) if r.format_failures else [],
                similarity=r.similarity, latency_ms=r.latency_ms, prompt_tokens=r.prompt_tokens,
                completion_tokens=r.completion_tokens, cost_usd=r.cost_usd, attempts=r.attempts,
                created_at=r.created_at,
            )  # fmt: skip
    return Run(id=row.id, created_at=row.created_at, test_file=row.test_file, test_sha256=row.test_sha256,
               models=models, system_prompt=row.system_prompt, max_tokens=row.max_tokens,
               scoring=orjson.loads(row.scoring), examples=examples, results=results)  # fmt: skip


@dataclass(frozen=True, slots=True)
class RunListing:
    id: str
    created_at: float
    test_file: str
    models: list[ModelSpec]
    examples: int
    answered: int


def list_runs(engine: Engine) -> list[RunListing]:
    """Every run, newest first, with how many answers it holds."""
    with engine.connect() as conn:
        counts: dict[str, int] = dict(conn.execute(select(eval_results.c.run_id, func.count())
                                   .group_by(eval_results.c.run_id)).all())  # fmt: skip
        rows = conn.execute(select(eval_runs).order_by(eval_runs.c.created_at.desc(), eval_runs.c.id)).all()
    return [RunListing(r.id, r.created_at, r.test_file, [ModelSpec(**m) for m in orjson.loads(r.models)],
                       r.examples, counts.get(r.id, 0)) for r in rows]  # fmt: skip
