"""`abproxy traffic`: a steady stream of simulated users, for the compose stack and demos.

Sends chat completions (a share of them streaming) through the official openai client at a
fixed rate, from a fixed pool of user ids, and optionally walks the rollout through a list of
percents through the admin API, so a dashboard shows both variants and the rollout move.

With `feedback` on, each answer is followed by the outcomes an app would report for it
(POST /v1/feedback through the same client), drawn from a known truth in which the treatment
is better (`TRUTH`, the demo's), so `abproxy report` on the collected data has an effect to find.
Feedback is best effort: a refused or failed post is counted, never fatal to the traffic.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam

PROMPTS = (
    "Draft a follow-up email to a prospect who went quiet after the demo.",
    "Summarise this call: pricing objections, wants SSO, decision in Q3.",
    "Which of our plans fits a 40-seat team with audit needs?",
    "The customer says we're too expensive. What do I say?",
)


@dataclass(frozen=True, slots=True)
class SimulatedMetric:
    """One outcome's truth per variant: a rate (boolean), or with `sd` a mean of scores rounded into low..high."""

    control: float
    treatment: float
    sd: float | None = None
    low: float = 1.0
    high: float = 5.0

    def draw(self, variant: str, rng: random.Random) -> bool | int:
        mean = self.treatment if variant == "treatment" else self.control
        if self.sd is None:
            return rng.random() < mean
        return int(min(self.high, max(self.low, round(rng.gauss(mean, self.sd)))))


# The demo's truth too (proxy/demo.py draws from it), so both tell the same story: the fine-tune completes
# more tasks (70 % -> 78 %), pleases more (CSAT 3.8 -> 4.1) and escalates less (28 % -> 21 %).
# The names are the metrics config/compose.yaml declares.
TRUTH: Mapping[str, SimulatedMetric] = {
    "task_completed": SimulatedMetric(0.70, 0.78),
    "csat": SimulatedMetric(3.8, 4.1, sd=0.9),
    "escalated": SimulatedMetric(0.28, 0.21),
}


@dataclass
class TrafficPlan:
    base_url: str
    model: str
    rps: float
    users: int
    stream_share: float
    duration_s: float = 0.0  # 0: until interrupted
    ramp: tuple[float, ...] = ()
    ramp_every_s: float = 120.0
    admin_url: str | None = None
    admin_token: str | None = None
    experiment: str | None = None
    max_in_flight: int = 64
    seed: int | None = None
    feedback: bool = False
    truth: Mapping[str, SimulatedMetric] = field(default_factory=lambda: dict(TRUTH))


@dataclass
class TrafficStats:
    sent: int = 0
    by_outcome: Counter[str] = field(default_factory=Counter)
    # "accepted", or why a post was refused ("http 404") or failed ("APIConnectionError").
    feedback: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        line = f"sent {self.sent}: " + ", ".join(f"{k} {v}" for k, v in sorted(self.by_outcome.items()))
        if self.feedback:
            line += "; feedback " + ", ".join(f"{k} {v}" for k, v in sorted(self.feedback.items()))
        return line


@dataclass
class _Run:
    """What every request task of one run shares."""

    plan: TrafficPlan
    client: openai.AsyncOpenAI
    rng: random.Random
    stats: TrafficStats
    report: Callable[[str], None]


async def run_traffic(plan: TrafficPlan, report: Callable[[str], None]) -> TrafficStats:
    client = openai.AsyncOpenAI(base_url=plan.base_url, api_key="traffic", max_retries=0, timeout=120)
    run = _Run(plan, client, random.Random(plan.seed), TrafficStats(), report)
    stats, rng = run.stats, run.rng
    slots = asyncio.Semaphore(plan.max_in_flight)
    tasks: set[asyncio.Task[None]] = set()
    ramp = asyncio.create_task(_ramp(plan, report)) if plan.ramp else None
    started = time.monotonic()
    next_report = started + 10
    interval = 1.0 / plan.rps
    try:
        while not plan.duration_s or time.monotonic() - started < plan.duration_s:
            await slots.acquire()
            user = f"user-{rng.randrange(plan.users)}"
            stream = rng.random() < plan.stream_share
            # Numbered, so no two requests share a prompt: the proxy counts a user's repeat as a regeneration.
            prompt = f"{rng.choice(PROMPTS)} (ticket {stats.sent})"
            task = asyncio.create_task(_one(run, user, prompt, stream))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            task.add_done_callback(lambda _: slots.release())
            stats.sent += 1
            if time.monotonic() >= next_report:
                report(stats.summary())
                next_report += 10
            await asyncio.sleep(interval)
        if tasks:
            await asyncio.wait(tasks)
    finally:
        if ramp is not None:
            ramp.cancel()
        for task in tasks:
            task.cancel()
        await client.close()
    return stats


async def _one(run: _Run, user: str, prompt: str, stream: bool) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": prompt}]
    completions, model, stats = run.client.chat.completions, run.plan.model, run.stats
    try:
        if stream:
            chunks = await completions.create(model=model, messages=messages, user=user, stream=True)
            async for _ in chunks:
                pass
            headers = chunks.response.headers
            stats.by_outcome["stream ok"] += 1
        else:
            raw = await completions.with_raw_response.create(model=model, messages=messages, user=user)
            raw.parse()
            headers = raw.headers
            stats.by_outcome["ok"] += 1
    except openai.APIStatusError as exc:
        stats.by_outcome[f"http {exc.status_code}"] += 1
        return
    except openai.APIError as exc:
        stats.by_outcome[type(exc).__name__] += 1
        return
    if run.plan.feedback:
        await _feedback(run, headers)


async def _feedback(run: _Run, headers: Mapping[str, str]) -> None:
    """What the app would post once it knows how the answer went, drawn from the served variant's truth."""
    request_id, variant = headers.get("x-request-id"), headers.get("x-abproxy-variant")
    if not request_id or not variant:
        return  # not an experiment's answer: no variant to draw an outcome for
    outcomes = {metric: simulated.draw(variant, run.rng) for metric, simulated in run.plan.truth.items()}
    for metric, value in outcomes.items():
        try:
            await run.client.post(
                "/feedback", body={"request_id": request_id, "metric": metric, "value": value}, cast_to=httpx.Response
            )
        except openai.APIError as exc:
            if isinstance(exc, openai.APIStatusError):
                outcome, what = f"http {exc.status_code}", "refused"
            else:
                outcome, what = type(exc).__name__, "failed"
            if outcome not in run.stats.feedback:  # once per kind: the reason, without flooding the log
                run.report(f"feedback {what} ({outcome}): {exc.message}")
            run.stats.feedback[outcome] += 1
        else:
            run.stats.feedback["accepted"] += 1


async def _ramp(plan: TrafficPlan, report: Callable[[str], None]) -> None:
    """Walk the rollout through `plan.ramp`, then start over: the dashboard keeps moving."""
    experiment = plan.experiment or plan.model
    headers = {"Authorization": f"Bearer {plan.admin_token}", "X-Abproxy-Actor": "abproxy-traffic"}
    async with httpx.AsyncClient(base_url=plan.admin_url or "", headers=headers, timeout=10) as admin:
        while True:
            for percent in plan.ramp:
                try:
                    response = await admin.put(
                        f"/admin/experiments/{experiment}/rollout",
                        json={"percent": percent, "reason": "abproxy traffic ramp"},
                    )
                    report(f"rollout {experiment} -> {percent:g}%: HTTP {response.status_code}")
                except httpx.HTTPError as exc:
                    report(f"rollout {experiment} -> {percent:g}% failed: {exc}")
                await asyncio.sleep(plan.ramp_every_s)
