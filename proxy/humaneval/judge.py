"""An automatic judge: a model from the config votes on a study's blind pairs, with the study's rubric.

    run_judge(engine, settings, study, judge_model, now=) -> JudgeRun    ask, store in `judge_votes`
    judge_votes(engine, study, judge) -> [Vote]                          read back, evaluator "judge:<model>"
    consensus(votes) -> [Vote]                                           one verdict per comparison

Every comparison is asked in both orders ("ab": the pair sorted by name, first model as Response A; "ba":
swapped), so a judge that favours a side cannot move the result: the two answers cancel. The judge sees
what a human sees, the prompt and two answers, never a model name. Votes are stored as they arrive and a
rerun skips what is stored, so an interrupted run resumes where it stopped and pays nothing twice.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import Engine, select

from proxy.config import Settings
from proxy.humaneval.insert import insert_for
from proxy.humaneval.rubric import Rubric
from proxy.humaneval.summaries import get_study
from proxy.model_calls import ModelCallError, ask_chat, usage_tokens
from proxy.store.schema import comparisons, tasks
from proxy.store.schema import judge_votes as judge_table
from proxy.upstream import UpstreamPool

if TYPE_CHECKING:
    from proxy.humaneval.ratings import Vote

# The mock upstream recognises this phrase and answers as a judge preferring the longer answer.
JUDGE_MARKER = "You are judging two answers"

# The system message, then the user message (formatted with prompt, response_a, response_b, criteria).
# Sections are bracketed so neither an answer's own headings nor Markdown can blur where it ends.
JUDGE_PROMPT = (
    f"{JUDGE_MARKER} to the same prompt, shown as Response A and Response B. Judge which is better for "
    "the person who wrote the prompt: correct, helpful, clear. The order of the answers and their length "
    "say nothing about their quality; do not let them sway you.\n"
    "Answer with ONLY a JSON object, no other text:\n"
    '{"winner": "A" | "B" | "tie", "criteria": {<name>: "A" | "B" | "tie" for a preference criterion, '
    'or {"A": 1-5, "B": 1-5} for a score criterion}, "reason": "<one or two sentences>"}',
    "[Prompt]\n{prompt}\n[End of Prompt]\n\n"
    "[Response A]\n{response_a}\n[End of Response A]\n\n"
    "[Response B]\n{response_b}\n[End of Response B]\n\n"
    "[Criteria]\n{criteria}\n[End of Criteria]",
)
SIDES = ("ab", "ba")
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


@dataclass(frozen=True, slots=True)
class JudgeRun:
    asked: int  # (comparison, order) pairs asked in this run
    stored: int
    skipped_existing: int  # already stored by an earlier run: not asked
    failed: int  # no usable answer (upstream error after retries, or unparseable): not stored
    cost_usd: float  # of this run's answers, unparseable ones included
    first_error: str | None


@dataclass(frozen=True, slots=True)
class Verdict:
    choice: str  # A | tie | B
    rubric: dict[str, str | int]  # the shape of `ratings.Vote.rubric`
    reason: str


def render_messages(prompt: str | list[dict[str, str]], response_a: str, response_b: str,
                    rubric: Rubric) -> list[dict[str, str]]:  # fmt: skip
    """The judge's messages for one order of one comparison."""
    shown = prompt if isinstance(prompt, str) else "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)
    criteria = "\n".join(
        f"- {c.name} ({'preference' if c.kind == 'preference' else 'score 1-5 for each answer'})"
        + (f": {c.guidance}" if c.guidance else "")
        for c in rubric.criteria
    ) or "(none: leave \"criteria\" empty)"
    user = JUDGE_PROMPT[1].format(prompt=shown, response_a=response_a, response_b=response_b, criteria=criteria)
    return [{"role": "system", "content": JUDGE_PROMPT[0]}, {"role": "user", "content": user}]


def parse_verdict(text: str, rubric: Rubric) -> Verdict:
    """The judge's answer as a Verdict; ValueError with a short reason when it is not one."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ValueError(f"answer is not JSON: {text[:80]!r}") from None
    if not isinstance(data, dict) or data.get("winner") not in ("A", "B", "tie"):
        raise ValueError(f"answer has no winner A, B or tie: {text[:80]!r}")
    answers = data.get("criteria") or {}
    if not isinstance(answers, dict):
        raise ValueError("answer's criteria is not an object")
    scored: dict[str, str | int] = {}
    for criterion in rubric.criteria:  # unknown names are ignored, a missing one is a skipped criterion
        value = answers.get(criterion.name)
        if value is None:
            continue
        if criterion.kind == "preference":
            if value not in ("A", "B", "tie"):
                raise ValueError(f"criterion {criterion.name}: expected A, B or tie, got {value!r:.40}")
            scored[criterion.name] = value
        else:
            for side in ("A", "B"):
                score = value.get(side) if isinstance(value, dict) else None
                if not (isinstance(score, int) and not isinstance(score, bool) and 1 <= score <= 5):
                    raise ValueError(f"criterion {criterion.name}: expected {{\"A\": 1-5, \"B\": 1-5}}, "
                                     f"got {value!r:.40}")  # fmt: skip
                scored[f"{criterion.name}.{side}"] = score
    reason = data.get("reason")
    return Verdict(choice=data["winner"], rubric=scored, reason=reason if isinstance(reason, str) else "")


@dataclass(frozen=True, slots=True)
class _Job:
    comparison_id: str
    sides: str
    model_a: str  # shown as Response A
    model_b: str
    messages: list[dict[str, str]]


async def run_judge(
    engine: Engine,
    settings: Settings,
    study: str,
    judge_model: str,
    *,
    concurrency: int = 4,
    max_tokens: int = 400,
    now: Callable[[], float],
    progress: Callable[[int, int], None] | None = None,
    sleep: Callable[[float], Any] = asyncio.sleep,
) -> JudgeRun:
    """Ask `judge_model` about every comparison of `study` in both orders, storing each vote as it comes.

    ValueError for a model not in the config or an unknown study. `progress(done, total)` after each answer.
    """
    model = settings.models.get(judge_model)
    if model is None:
        raise ValueError(f"no model named {judge_model!r} in the config (models: {', '.join(sorted(settings.models))})")
    summary = get_study(engine, study)
    if summary is None:
        raise ValueError(f"no study named {study!r}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    jobs, skipped = _jobs(engine, study, judge_model, summary.rubric)
    pool = UpstreamPool(settings.upstreams)
    semaphore = asyncio.Semaphore(concurrency)
    stored = failed = done = 0
    cost = 0.0
    first_error: str | None = None

    async def one(job: _Job) -> None:
        nonlocal stored, failed, done, cost, first_error
        body = orjson.dumps({"model": model.model, "messages": job.messages, "temperature": 0,
                             "max_tokens": max_tokens, "response_format": {"type": "json_object"}})  # fmt: skip
        async with semaphore:
            try:
                answer = await ask_chat(pool, model.upstream, body, sleep=sleep)
                spent = model.pricing.cost_usd(*usage_tokens(answer.usage))
                cost += spent
                verdict = parse_verdict(answer.text, summary.rubric)
            except (ValueError, ModelCallError) as exc:
                failed += 1
                first_error = first_error or f"{job.comparison_id} ({job.sides}): {exc}"
            else:
                _store(engine, study, judge_model, job, verdict, answer.text, spent, now())
                stored += 1
            done += 1
            if progress is not None:
                progress(done, len(jobs))

    await pool.start()
    try:
        await asyncio.gather(*(one(job) for job in jobs))
    finally:
        await pool.stop()
    return JudgeRun(asked=len(jobs), stored=stored, skipped_existing=skipped, failed=failed, cost_usd=cost,
                    first_error=first_error)  # fmt: skip


def _jobs(engine: Engine, study: str, judge: str, rubric: Rubric) -> tuple[list[_Job], int]:
    """The (comparison, order) pairs still to ask, in comparison id order, and how many are stored already."""
    with engine.connect() as conn:
        pairs: dict[str, tuple[str, str]] = {}
        for cid, a, b in conn.execute(select(tasks.c.comparison_id, tasks.c.model_a, tasks.c.model_b)
                                      .where(tasks.c.study == study)):  # fmt: skip
            pairs.setdefault(cid, (min(a, b), max(a, b)))
        stored = select(judge_table.c.comparison_id, judge_table.c.sides).where(
            judge_table.c.study == study, judge_table.c.judge == judge
        )
        done = {(r.comparison_id, r.sides) for r in conn.execute(stored)}
        texts = select(comparisons.c.id, comparisons.c.prompt, comparisons.c.responses)
        content = {
            r.id: (orjson.loads(r.prompt), orjson.loads(r.responses))
            for r in conn.execute(texts.where(comparisons.c.id.in_(list(pairs))))
        }
    jobs: list[_Job] = []
    skipped = 0
    for cid in sorted(pairs):
        first, second = pairs[cid]
        prompt, responses = content[cid]
        for sides in SIDES:
            if (cid, sides) in done:
                skipped += 1
                continue
            left, right = (first, second) if sides == "ab" else (second, first)
            messages = render_messages(prompt, responses[left], responses[right], rubric)
            jobs.append(_Job(cid, sides, left, right, messages))
    return jobs, skipped


def _store(engine: Engine, study: str, judge: str, job: _Job, verdict: Verdict, raw: str, cost: float,
           ts: float) -> None:  # fmt: skip
    with engine.begin() as conn:
        conn.execute(insert_for(conn)(judge_table).on_conflict_do_nothing(), [{
            "study": study, "comparison_id": job.comparison_id, "judge": judge, "sides": job.sides,
            "model_a": job.model_a, "model_b": job.model_b, "choice": verdict.choice,
            "rubric": orjson.dumps(verdict.rubric).decode() if verdict.rubric else None, "raw": raw,
            "cost_usd": cost, "created_at": ts,
        }])  # fmt: skip


def judges(engine: Engine, study: str) -> list[str]:
    """The judges with votes in the study, by name."""
    with engine.connect() as conn:
        found = conn.execute(select(judge_table.c.judge).distinct().where(judge_table.c.study == study)).scalars()
        return sorted(found)


def judge_cost(engine: Engine, study: str, judge: str) -> float:
    with engine.connect() as conn:
        costs = conn.execute(select(judge_table.c.cost_usd)
                             .where(judge_table.c.study == study, judge_table.c.judge == judge)).scalars()  # fmt: skip
        return float(sum(c or 0.0 for c in costs))


def judge_votes(engine: Engine, study: str, judge: str | None = None) -> list[Vote]:
    """The stored judge votes (of `judge` only, if given) as Votes by "judge:<model>", in created_at order."""
    from proxy.humaneval.ratings import Vote  # scipy and scikit-learn: only when votes are read

    query = select(judge_table).where(judge_table.c.study == study)
    if judge is not None:
        query = query.where(judge_table.c.judge == judge)
    query = query.order_by(judge_table.c.created_at, judge_table.c.judge, judge_table.c.comparison_id,
                           judge_table.c.sides)  # fmt: skip
    with engine.connect() as conn:
        return [
            Vote(comparison_id=r.comparison_id, evaluator=f"judge:{r.judge}", model_a=r.model_a, model_b=r.model_b,
                 choice=r.choice, ts=r.created_at, rubric=orjson.loads(r.rubric) if r.rubric else {})
            for r in conn.execute(query)
        ]  # fmt: skip


def consensus(votes: Sequence[Vote]) -> list[Vote]:
    """One vote per (judge, comparison): the model both orders preferred, else a tie.

    A verdict that flips with the order is position, not preference (as MT-Bench scores an inconsistent
    pair, Zheng et al. 2023): it counts as a tie. A comparison asked in one order only keeps that vote.
    """
    from proxy.humaneval.ratings import Vote

    grouped: dict[tuple[str, str], list[Vote]] = {}
    for vote in votes:
        grouped.setdefault((vote.evaluator, vote.comparison_id), []).append(vote)
    merged = []
    for (evaluator, cid), group in grouped.items():
        winners = {v.winner for v in group}
        first, second = sorted((group[0].model_a, group[0].model_b))
        winner = winners.pop() if len(winners) == 1 else None
        choice = "tie" if winner is None else "A" if winner == first else "B"
        merged.append(Vote(cid, evaluator, first, second, choice, max(v.ts for v in group)))  # type: ignore[arg-type]
    return sorted(merged, key=lambda v: v.ts)
