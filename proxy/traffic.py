"""`abproxy traffic`: a steady stream of simulated users, for the compose stack and demos.

Sends chat completions (a share of them streaming) through the official openai client at a
fixed rate, from a fixed pool of user ids, and optionally walks the rollout through a list of
percents through the admin API, so a dashboard shows both variants and the rollout move.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
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


@dataclass
class TrafficStats:
    sent: int = 0
    by_outcome: Counter[str] = field(default_factory=Counter)


async def run_traffic(plan: TrafficPlan, report: Callable[[str], None]) -> TrafficStats:
    rng = random.Random(plan.seed)
    client = openai.AsyncOpenAI(base_url=plan.base_url, api_key="traffic", max_retries=0, timeout=120)
    stats = TrafficStats()
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
            task = asyncio.create_task(_one(client, plan.model, user, rng.choice(PROMPTS), stream, stats))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            task.add_done_callback(lambda _: slots.release())
            stats.sent += 1
            if time.monotonic() >= next_report:
                report(f"sent {stats.sent}: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.by_outcome.items())))
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


async def _one(
    client: openai.AsyncOpenAI, model: str, user: str, prompt: str, stream: bool, stats: TrafficStats
) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": prompt}]
    try:
        if stream:
            chunks = await client.chat.completions.create(model=model, messages=messages, user=user, stream=True)
            async for _ in chunks:
                pass
            stats.by_outcome["stream ok"] += 1
        else:
            await client.chat.completions.create(model=model, messages=messages, user=user)
            stats.by_outcome["ok"] += 1
    except openai.APIStatusError as exc:
        stats.by_outcome[f"http {exc.status_code}"] += 1
    except openai.APIError as exc:
        stats.by_outcome[type(exc).__name__] += 1


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
