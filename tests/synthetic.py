"""Simulated experiments with a known truth, written as the proxy's own events.

Users are assigned with the real formula (`proxy.assignment`) against a rollout schedule, so the
split, the crossovers when the rollout rises, and the SRM check all see what production would.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any

from proxy.assignment import bucket, choose_variant, threshold

EXPERIMENT = "sales-companion"
SALT = "sales-v2"
DAY = 86_400.0


@dataclass
class Scenario:
    users: int = 2000
    days: int = 10
    schedule: list[tuple[float, float]] = field(default_factory=lambda: [(0.0, 50.0)])  # (from day, percent)
    requests_per_user: tuple[int, int] = (1, 4)
    task_rate: dict[str, float] = field(default_factory=lambda: {"control": 0.70, "treatment": 0.78})
    csat_mean: dict[str, float] = field(default_factory=lambda: {"control": 3.8, "treatment": 4.1})
    error_rate: dict[str, float] = field(default_factory=lambda: {"control": 0.01, "treatment": 0.01})
    latency_ms: dict[str, float] = field(default_factory=lambda: {"control": 800.0, "treatment": 820.0})
    cost_usd: dict[str, float] = field(default_factory=lambda: {"control": 0.0010, "treatment": 0.0011})
    returned_rate: dict[str, float] = field(default_factory=lambda: {"control": 0.5, "treatment": 0.5})
    lose_treatment_events: float = 0.0  # share of treatment users whose events never arrive (an SRM)
    regenerate_share: float = 0.0  # share of requests the user re-asks at once, same prompt
    episode_turns: int = 0  # >0: each user's requests form episodes of this many turns
    seed: int = 7

    def percent_at(self, day: float) -> float:
        current = self.schedule[0][1]
        for start, percent in self.schedule:
            if day >= start:
                current = percent
        return current


def generate(s: Scenario, t0: float) -> list[dict[str, Any]]:
    rng = random.Random(s.seed)
    events: list[dict[str, Any]] = []
    for u in range(s.users):
        user = f"user-{s.seed}-{u}"
        user_bucket = bucket(SALT, user)
        start_day = rng.random() * (s.days - 1)
        lost = rng.random() < s.lose_treatment_events
        n = rng.randint(*s.requests_per_user)
        first_variant = None
        for k in range(n):
            day = min(start_day + k * 0.2, s.days - 0.01)
            ts = t0 + day * DAY
            percent = s.percent_at(day)
            variant = choose_variant(user_bucket, threshold(percent))
            first_variant = first_variant or variant
            if lost and first_variant == "treatment":
                continue
            prompt = f"p-{u}-{k}"
            repeats = 2 if rng.random() < s.regenerate_share else 1
            for r in range(repeats):
                events += _request_and_feedback(s, rng, user, user_bucket, variant, percent, ts + r * 5, prompt, k)
        if not (lost and first_variant == "treatment"):
            events.append(_feedback(None, "returned", float(rng.random() < s.returned_rate[first_variant or "control"]),
                                    t0 + s.days * DAY - 1, user_hash=user, experiment=EXPERIMENT))
    return events


def _request_and_feedback(
    s: Scenario, rng: random.Random, user: str, user_bucket: int, variant: str, percent: float, ts: float,
    prompt: str, k: int,
) -> list[dict[str, Any]]:
    rid = os.urandom(20).hex()
    failed = rng.random() < s.error_rate[variant]
    episode = f"{user}-e{k // s.episode_turns}" if s.episode_turns else None
    request = {
        "ts": ts, "request_id": rid, "experiment": EXPERIMENT, "variant": variant,
        "model": "base" if variant == "control" else "finetuned", "user_hash": user, "bucket": user_bucket,
        "rollout_percent": percent, "episode_id": episode, "endpoint": "chat.completions", "stream": False,
        "status": 502 if failed else 200, "error": "5xx" if failed else None,
        "latency_ms": max(rng.gauss(s.latency_ms[variant], 150.0), 1.0), "ttft_ms": None,
        "prompt_tokens": 20, "completion_tokens": 0 if failed else 40, "cost_usd": s.cost_usd[variant],
        "prompt_hash": prompt,
    }
    if failed:
        return [request]
    csat = min(5.0, max(1.0, round(rng.gauss(s.csat_mean[variant], 0.9))))
    return [
        request,
        _feedback(rid, "task_completed", float(rng.random() < s.task_rate[variant]), ts + 30),
        _feedback(rid, "csat", csat, ts + 40),
    ]


def _feedback(
    request_id: str | None, metric: str, value: float, ts: float, *, user_hash: str | None = None,
    experiment: str | None = None,
) -> dict[str, Any]:
    return {
        "kind": "feedback", "ts": ts, "feedback_id": "fb_" + os.urandom(8).hex(),
        "level": "request" if request_id else "user", "request_id": request_id, "user_hash": user_hash,
        "experiment": experiment, "metric": metric, "value": value, "episode_id": None,
    }


def per_user_truth(events: list[dict[str, Any]], metric: str) -> dict[str, tuple[str, float, float]]:
    """Independently of the SQL: user -> (first variant, sum of the metric, feedback count)."""
    requests = sorted((e for e in events if "kind" not in e), key=lambda e: (e["ts"], e["request_id"]))
    first: dict[str, str] = {}
    variant_of: dict[str, tuple[str, str]] = {}
    for e in requests:
        first.setdefault(e["user_hash"], e["variant"])
        variant_of[e["request_id"]] = (e["user_hash"], e["variant"])
    sums: dict[str, tuple[str, float, float]] = {}
    for e in events:
        if e.get("kind") != "feedback" or e["metric"] != metric or e["request_id"] not in variant_of:
            continue
        user, variant = variant_of[e["request_id"]]
        if first[user] != variant:
            continue  # a crossover's later request
        _, total, count = sums.get(user, (variant, 0.0, 0.0))
        sums[user] = (variant, total + e["value"], count + 1)
    return sums
