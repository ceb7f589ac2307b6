"""Running a test set through models: concurrency-limited, retried, stored as answers arrive, resumable.

Each example's prompt goes to every model of the run, straight to the model's upstream with that
upstream's credentials (not through the proxy: this is not user traffic), at temperature 0. Jobs are
ordered example by example, every model in turn, so a run stopped half-way holds paired answers.

The event loop only waits on the network. Scoring and the store's write run on one writer thread, in
order: latencies are not inflated by a commit or a long difflib comparison, the store sees one writer,
and an answer counts as done only once it is committed, so a killed run loses nothing it reported.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import orjson
from sqlalchemy import Engine

from proxy.config import Settings
from proxy.model_calls import RETRIES, ModelCallError, Sleep, ask_chat, usage_tokens
from proxy.offline_eval.runs import ModelSpec, Scoring, open_run, result_writer
from proxy.offline_eval.testset import Example, TestSet
from proxy.upstream import UpstreamPool


@dataclass(frozen=True, slots=True)
class RunOutcome:
    run_id: str
    asked: int  # (model, example) pairs asked in this run
    answered: int  # of those, stored
    skipped_existing: int  # answered by an earlier start of the run: not asked again
    rescored: int  # stored answers scored again because the scoring changed
    failed: int  # no answer after the retries: asked again on the next start
    retries: int  # extra attempts the answered ones needed
    cost_usd: float  # of this run's answers
    first_error: str | None


def model_specs(settings: Settings, names: Sequence[str]) -> list[ModelSpec]:
    """The named models of the config, in order; ValueError for an unknown or repeated name."""
    if not names:
        raise ValueError("name at least one model (--model base --model finetuned)")
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise ValueError(f"model {repeated[0]!r} is named twice")
    for name in names:
        if name not in settings.models:
            raise ValueError(f"no model named {name!r} in the config (models: {', '.join(sorted(settings.models))})")
    return [ModelSpec(n, settings.models[n].upstream, settings.models[n].model) for n in names]


async def run_eval(
    engine: Engine,
    settings: Settings,
    test: TestSet,
    models: Sequence[ModelSpec],
    *,
    run_id: str,
    scoring: Scoring,
    system_prompt: str | None = None,
    max_tokens: int = 512,
    concurrency: int = 16,
    retries: int = RETRIES,
    now: Callable[[], float] = time.time,
    sleep: Sleep = asyncio.sleep,
    progress: Callable[[int, int], None] | None = None,
) -> RunOutcome:
    """Ask every model every example not answered yet; `progress(done, total)` after each answer or failure.

    ValueError, before any call, for bad arguments or a run name that asked something else.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    done, rescored = open_run(engine, run_id, test, models, system_prompt=system_prompt, max_tokens=max_tokens,
                              scoring=scoring, now=now())  # fmt: skip
    jobs = [(m, e) for e in test.examples for m in models if (m.name, e.id) not in done]
    write = result_writer(engine, run_id, scoring)
    semaphore = asyncio.Semaphore(concurrency)
    pool = UpstreamPool(settings.upstreams)
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-writer")
    loop = asyncio.get_running_loop()
    answered = failed = extra = finished = 0
    cost = 0.0
    first_error: str | None = None

    async def one(spec: ModelSpec, example: Example) -> None:
        nonlocal answered, failed, extra, finished, cost, first_error
        model = settings.models[spec.name]
        body = orjson.dumps({"model": spec.model, "messages": example.prompt, "temperature": 0,
                             "max_tokens": max_tokens})  # fmt: skip
        async with semaphore:
            try:
                answer = await ask_chat(pool, spec.upstream, body, sleep=sleep, retries=retries)
            except ModelCallError as exc:
                failed += 1
                first_error = first_error or f"{spec.name} on example {example.id} (line {example.line}): {exc}"
            else:
                has_usage = bool(answer.usage)
                tokens = usage_tokens(answer.usage)
                spent = model.pricing.cost_usd(*tokens) if has_usage else None
                await loop.run_in_executor(
                    writer, write, spec.name, example, answer.text, answer.finish_reason, answer.latency_ms,
                    tokens if has_usage else (None, None), spent, answer.attempts, now(),
                )  # fmt: skip
                answered += 1
                extra += answer.attempts - 1
                cost += spent or 0.0
            finished += 1
            if progress is not None:
                progress(finished, len(jobs))

    await pool.start()
    try:
        await asyncio.gather(*(one(spec, example) for spec, example in jobs))
    finally:
        await pool.stop()
        writer.shutdown(wait=True)  # a write already handed over completes, even on Ctrl-C
    return RunOutcome(run_id=run_id, asked=len(jobs), answered=answered, skipped_existing=len(done),
                      rescored=rescored, failed=failed, retries=extra, cost_usd=cost,
                      first_error=first_error)  # fmt: skip
