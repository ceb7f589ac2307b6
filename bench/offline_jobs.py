"""Scenario 7's in-process measurements, each run as its own process pinned to the core under test:

    python -m bench.offline_jobs bt VOTES BOOTSTRAP        Bradley-Terry with bootstrap, as `abproxy humaneval report`
    python -m bench.offline_jobs eval CONFIG TEST STORE CONCURRENCY
                                                          `abproxy eval run`'s library entry point

Each prints one JSON line: the seconds and CPU seconds of the work itself (imports and set-up
excluded), and what it produced, for the scenario to check.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import numpy as np

MODELS = ("base", "finetuned", "gpt-4o", "claude-haiku", "llama-70b")
STRENGTH = {"base": 0.0, "finetuned": 0.35, "gpt-4o": 0.5, "claude-haiku": 0.2, "llama-70b": -0.3}


def votes(n: int, seed: int = 3) -> list[Any]:
    """`n` blind votes among five models: a random pair per comparison, each comparison rated by two
    of 40 evaluators (sides shuffled), outcomes from known strengths (a logistic model), 15 % ties."""
    from proxy.humaneval.ratings import Choice, Vote

    rng = np.random.default_rng(seed)
    out = []
    pair = (0, 1)
    for k in range(n):
        if k % 2 == 0:
            pair = tuple(rng.choice(len(MODELS), 2, replace=False))
        a, b = pair if rng.random() < 0.5 else pair[::-1]
        ma, mb = MODELS[a], MODELS[b]
        p_a = 1 / (1 + np.exp(STRENGTH[mb] - STRENGTH[ma]))
        choice: Choice = "tie" if rng.random() < 0.15 else ("A" if rng.random() < p_a else "B")
        out.append(Vote(comparison_id=f"c{k // 2}", evaluator=f"e{(k + k // 80) % 40}", model_a=ma, model_b=mb,
                        choice=choice, ts=1_767_225_600.0 + k,
                        time_taken_ms=float(rng.uniform(8000, 60000))))  # fmt: skip
    return out


def bt(n: int, bootstrap: int) -> dict[str, Any]:
    from proxy.humaneval.ratings import bradley_terry
    from proxy.humaneval.report import build_study_report

    given = votes(n)
    wall, cpu = time.perf_counter(), time.process_time()
    ratings = bradley_terry(given, sorted(MODELS), bootstrap=bootstrap)
    bt_s, bt_cpu = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    build_study_report("bench", given, bootstrap=bootstrap)
    report_s, report_cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "votes": n, "bootstrap": bootstrap, "bt_s": bt_s, "bt_cpu_s": bt_cpu, "report_s": report_s,
        "report_cpu_s": report_cpu, "order": [r.model for r in ratings],
        "ci_ok": all(r.ci[0] <= r.rating <= r.ci[1] for r in ratings),
    }  # fmt: skip


def eval_run(config: str, test_file: str, store: str, concurrency: int) -> dict[str, Any]:
    from proxy.config import load_settings
    from proxy.offline_eval.runner import model_specs, run_eval
    from proxy.offline_eval.runs import Scoring
    from proxy.offline_eval.testset import load_test_set
    from proxy.store.db import engine_for, migrate

    settings = load_settings(config)
    specs = model_specs(settings, ["base", "finetuned"])
    test = load_test_set(test_file)
    engine = engine_for(store)
    migrate(engine)
    wall, cpu = time.perf_counter(), time.process_time()
    outcome = asyncio.run(run_eval(engine, settings, test, specs, run_id="bench", scoring=Scoring(False, None),
                                   concurrency=concurrency, max_tokens=64))  # fmt: skip
    seconds, cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    engine.dispose()
    return {
        "items": len(test.examples), "asked": outcome.asked, "answered": outcome.answered, "failed": outcome.failed,
        "seconds": seconds, "cpu_s": cpu_s, "concurrency": concurrency,
    }  # fmt: skip


def main(argv: list[str]) -> None:
    if argv[0] == "bt":
        result = bt(int(argv[1]), int(argv[2]))
    elif argv[0] == "eval":
        result = eval_run(argv[1], argv[2], argv[3], int(argv[4]))
    else:
        raise SystemExit(f"unknown job {argv[0]!r}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
