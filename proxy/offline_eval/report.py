"""An evaluation run's figures: per-model aggregates, and each candidate against the baseline, paired.

    run_report(run) -> EvalReport                                   the baseline is the run's first model
    compare_runs(run_a, model_a, run_b, model_b) -> EvalReport      one model of each run, on their shared examples

A comparison uses only the examples both sides answered (an unfinished run compares what it has and
says so). Its verdict is "worse" when any paired test finds the candidate significantly worse, "better"
when one finds it better and none worse, "mixed" for both, else "no_difference": a staged rollout's
gate reads "worse" and "mixed" as a regression. The changed examples come with it, regressions first
(lost exact matches, then lost formats, then the largest drops in similarity), then improvements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from proxy.jsonable import dataclass_json
from proxy.offline_eval.paired import PairedRates, PairedScores, paired_rates, paired_scores
from proxy.offline_eval.runs import Result, Run
from proxy.offline_eval.testset import Example, last_user_text

Verdict = Literal["better", "worse", "mixed", "no_difference"]
Change = Literal["regressed", "improved"]
ALPHA = 0.05


@dataclass(frozen=True, slots=True)
class ModelSummary:
    label: str  # the config's model name (run:model in a comparison of two runs)
    model: str  # the upstream's model id
    answered: int
    examples: int
    exact_rate: float
    format_rate: float | None  # None without a format check
    similarity_mean: float
    similarity_min: float
    latency_p50_ms: float
    latency_p95_ms: float
    tokens_per_answer: float | None  # mean completion tokens; None when the upstream reported no usage
    cost_per_example: float | None
    cost_usd: float | None
    truncated: int  # answers cut by max_tokens (finish_reason "length")


@dataclass(frozen=True, slots=True)
class ExampleChange:
    example_id: str
    position: int
    line: int  # in the test file
    prompt: str  # the last user message
    expected: str
    change: Change
    baseline: Result
    candidate: Result


@dataclass(frozen=True, slots=True)
class Comparison:
    baseline: str
    candidate: str
    paired: int  # examples both answered
    exact: PairedRates
    format: PairedRates | None
    similarity: PairedScores
    verdict: Verdict
    changes: list[ExampleChange]  # regressions first

    @property
    def regressions(self) -> list[ExampleChange]:
        return [c for c in self.changes if c.change == "regressed"]


@dataclass(frozen=True, slots=True)
class RunInfo:
    id: str
    created_at: float
    test_file: str
    test_sha256: str
    examples: int
    system_prompt: str | None
    max_tokens: int
    scoring: dict[str, Any]
    answered: int
    expected_answers: int


@dataclass(frozen=True, slots=True)
class EvalReport:
    runs: list[RunInfo]  # one, or two for a comparison of runs
    models: list[ModelSummary]
    comparisons: list[Comparison]
    alpha: float = ALPHA
    notes: list[str] = field(default_factory=list)


def run_report(run: Run, *, alpha: float = ALPHA) -> EvalReport:
    """Every model's summary, and each later model compared with the first (the baseline)."""
    examples = {e.id: e for e in run.examples}
    summaries = [_summary(m.name, m.model, run.results.get(m.name, {}), len(run.examples)) for m in run.models]
    baseline = run.models[0].name
    comparisons = [
        _compare(baseline, m.name, run.results.get(baseline, {}), run.results.get(m.name, {}), examples, alpha)
        for m in run.models[1:]
    ]
    notes = []
    if run.answered < run.expected_answers:
        notes.append(f"incomplete: {run.answered} of {run.expected_answers} answers; run `abproxy eval run` with "
                     "the same arguments to finish it")  # fmt: skip
    return EvalReport([_info(run)], summaries, comparisons, alpha, notes)


def compare_runs(run_a: Run, model_a: str, run_b: Run, model_b: str, *, alpha: float = ALPHA) -> EvalReport:
    """`model_a` of run A (the baseline) against `model_b` of run B on the examples both runs hold.

    ValueError when a model is not in its run or the runs share no example.
    """
    for run, model in ((run_a, model_a), (run_b, model_b)):
        if model not in {m.name for m in run.models}:
            raise ValueError(f"run {run.id!r} has no model {model!r} (models: {', '.join(m.name for m in run.models)})")
    ids_b = {e.id for e in run_b.examples}
    examples = {e.id: e for e in run_a.examples if e.id in ids_b}
    if not examples:
        raise ValueError(f"runs {run_a.id!r} and {run_b.id!r} share no example (different test files?)")
    label_a, label_b = f"{run_a.id}:{model_a}", f"{run_b.id}:{model_b}"
    if label_a == label_b:
        raise ValueError("compare a model with another model or another run, not with itself")
    results_a = {k: v for k, v in run_a.results.get(model_a, {}).items() if k in examples}
    results_b = {k: v for k, v in run_b.results.get(model_b, {}).items() if k in examples}
    summaries = [
        _summary(label_a, _version(run_a, model_a), results_a, len(examples)),
        _summary(label_b, _version(run_b, model_b), results_b, len(examples)),
    ]
    notes = []
    if run_a.test_sha256 != run_b.test_sha256:
        notes.append(f"the runs used different test files: compared on the {len(examples)} examples they share "
                     f"({len(run_a.examples)} and {len(run_b.examples)} in each)")  # fmt: skip
    comparison = _compare(label_a, label_b, results_a, results_b, examples, alpha)
    return EvalReport([_info(run_a), _info(run_b)], summaries, [comparison], alpha, notes)


def _version(run: Run, model: str) -> str:
    return next(m.model for m in run.models if m.name == model)


def _info(run: Run) -> RunInfo:
    return RunInfo(id=run.id, created_at=run.created_at, test_file=run.test_file, test_sha256=run.test_sha256,
                   examples=len(run.examples), system_prompt=run.system_prompt, max_tokens=run.max_tokens,
                   scoring=run.scoring, answered=run.answered, expected_answers=run.expected_answers)  # fmt: skip


def _summary(label: str, model: str, results: dict[str, Result], examples: int) -> ModelSummary:
    rows = list(results.values())
    n = len(rows)
    nan = math.nan
    formats = [r.format_ok for r in rows if r.format_ok is not None]
    similarity = [r.similarity for r in rows]
    latency = np.array([r.latency_ms for r in rows]) if rows else None
    tokens = [r.completion_tokens for r in rows if r.completion_tokens is not None]
    costs = [r.cost_usd for r in rows if r.cost_usd is not None]
    return ModelSummary(
        label=label, model=model, answered=n, examples=examples,
        exact_rate=sum(r.exact for r in rows) / n if n else nan,
        format_rate=sum(formats) / len(formats) if formats else None,
        similarity_mean=sum(similarity) / n if n else nan, similarity_min=min(similarity, default=nan),
        latency_p50_ms=float(np.percentile(latency, 50)) if latency is not None else nan,
        latency_p95_ms=float(np.percentile(latency, 95)) if latency is not None else nan,
        tokens_per_answer=sum(tokens) / len(tokens) if tokens else None,
        cost_per_example=sum(costs) / len(costs) if costs else None, cost_usd=sum(costs) if costs else None,
        truncated=sum(r.finish_reason == "length" for r in rows),
    )  # fmt: skip


def _compare(
    baseline: str, candidate: str, base: dict[str, Result], cand: dict[str, Result], examples: dict[str, Example],
    alpha: float,
) -> Comparison:
    shared = [k for k in examples if k in base and k in cand]  # in file order
    pairs = [(base[k], cand[k]) for k in shared]
    exact = paired_rates([b.exact for b, _ in pairs], [c.exact for _, c in pairs], alpha=alpha)
    with_format = [(b, c) for b, c in pairs if b.format_ok is not None and c.format_ok is not None]
    fmt = paired_rates([bool(b.format_ok) for b, _ in with_format], [bool(c.format_ok) for _, c in with_format],
                       alpha=alpha) if with_format else None  # fmt: skip
    similarity = paired_scores([b.similarity for b, _ in pairs], [c.similarity for _, c in pairs], alpha=alpha)
    changes = []
    for key, (b, c) in zip(shared, pairs, strict=True):
        change = _change(b, c)
        if change is not None:
            e = examples[key]
            changes.append(ExampleChange(key, e.position, e.line, last_user_text(e.prompt), e.expected, change, b, c))
    changes.sort(key=_severity)
    return Comparison(baseline, candidate, len(pairs), exact, fmt, similarity,
                      _verdict([exact, fmt, similarity], alpha), changes)  # fmt: skip


def _change(b: Result, c: Result) -> Change | None:
    """A loss of any kind makes a regression, even beside a gain: losses are what a reader must see."""
    lost = (b.exact and not c.exact) or (b.format_ok is True and c.format_ok is False) or \
        (not b.exact and not c.exact and c.similarity < b.similarity)  # fmt: skip
    if lost:
        return "regressed"
    gained = (c.exact and not b.exact) or (c.format_ok is True and b.format_ok is False) or \
        (not b.exact and not c.exact and c.similarity > b.similarity)  # fmt: skip
    return "improved" if gained else None


def _severity(change: ExampleChange) -> tuple[Any, ...]:
    b, c = change.baseline, change.candidate
    if change.change == "regressed":
        return (0, not (b.exact and not c.exact), not (b.format_ok and c.format_ok is False),
                c.similarity - b.similarity, change.position)  # fmt: skip
    return (1, not (c.exact and not b.exact), b.similarity - c.similarity, change.position)


def _verdict(tests: list[PairedRates | PairedScores | None], alpha: float) -> Verdict:
    significant = [t for t in tests if t is not None and t.n and t.p_value < alpha and not math.isnan(t.diff)]
    better = any(t.diff > 0 for t in significant)
    worse = any(t.diff < 0 for t in significant)
    return "mixed" if better and worse else "worse" if worse else "better" if better else "no_difference"


def to_json(report: EvalReport) -> dict[str, Any]:
    body = dataclass_json(report)
    for comparison, data in zip(report.comparisons, body["comparisons"], strict=True):
        data["regressions"] = len(comparison.regressions)
    return body
