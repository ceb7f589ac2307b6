"""An evaluation run as a blind human-comparison study: a seeded sample of its paired answers.

The run's prompts and the two models' answers become `comparisons` rows (built by the human-comparison
importer, source "eval:<run>"), and `create_study` hands them out: randomised sides, overlap between
evaluators, answers that name their model left out. Examples where both models answered the same text
are left out by default: there is nothing for a person to compare, and a tie they force costs a vote.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, select

from proxy.humaneval.importer import comparison_row
from proxy.humaneval.insert import insert_for
from proxy.humaneval.rubric import Rubric
from proxy.humaneval.studies import CreatedStudy, create_study
from proxy.offline_eval.runs import Run
from proxy.offline_eval.scoring import normalise
from proxy.store.schema import comparisons


@dataclass(frozen=True, slots=True)
class StudyFromRun:
    study: CreatedStudy
    models: tuple[str, str]
    eligible: int  # examples both models answered (differently, unless identical ones were included)
    identical: int  # left out: both answered the same text
    sampled: int


def study_from_run(
    engine: Engine, run: Run, name: str, *, evaluators: Sequence[str], sample: int, seed: int,
    models: tuple[str, str] | None = None, per_evaluator: int | None = None, overlap: float = 0.2,
    rubric: Rubric | None = None, include_identical: bool = False, now: float,
) -> StudyFromRun:  # fmt: skip
    """Sample `sample` examples of `run` (seeded) and build study `name` comparing two of its models
    (default: the baseline and the first candidate). Each evaluator gets `per_evaluator` tasks (default:
    the whole sample). ValueError, writing no study, when the arguments or the run do not allow one."""
    names = [m.name for m in run.models]
    pair = models or ((names[0], names[1]) if len(names) >= 2 else None)
    if pair is None:
        raise ValueError(f"run {run.id!r} has one model: a study compares two")
    for model in pair:
        if model not in names:
            raise ValueError(f"run {run.id!r} has no model {model!r} (models: {', '.join(names)})")
    if sample < 1:
        raise ValueError(f"sample must be >= 1, got {sample}")
    first, second = (run.results.get(m, {}) for m in pair)
    answered = [e for e in run.examples if e.id in first and e.id in second]
    same = [e for e in answered if normalise(first[e.id].prediction) == normalise(second[e.id].prediction)]
    eligible = answered if include_identical else [e for e in answered if e not in same]
    if not eligible:
        raise ValueError(f"run {run.id!r} has no example both {pair[0]!r} and {pair[1]!r} answered"
                         + ("" if include_identical else " differently"))  # fmt: skip
    chosen = random.Random(seed).sample(eligible, min(sample, len(eligible)))
    rows = [
        comparison_row(e.prompt, {pair[0]: first[e.id].prediction, pair[1]: second[e.id].prediction},
                       source=f"eval:{run.id}", now=now)
        for e in chosen
    ]  # fmt: skip
    with engine.begin() as conn:  # stored once by content: a second study from the same run reuses them
        conn.execute(insert_for(conn)(comparisons).on_conflict_do_nothing(index_elements=["content_hash"]), rows)
        hashes = [r["content_hash"] for r in rows]
        ids = list(conn.execute(select(comparisons.c.id).where(comparisons.c.content_hash.in_(hashes))).scalars())
    created = create_study(engine, name, evaluators=evaluators, per_evaluator=per_evaluator or len(ids),
                           overlap=overlap, models=pair, rubric=rubric, seed=seed, comparison_ids=ids,
                           now=now)  # fmt: skip
    return StudyFromRun(created, pair, len(eligible), len(same), len(chosen))
