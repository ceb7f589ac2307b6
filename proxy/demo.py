"""`abproxy demo`: the whole product on one machine, with no API key.

Starts Redis (unless REDIS_URL is set), two mock upstreams, the proxy and the collector (into a
SQLite store). It first evaluates both models offline on the shipped held-out set, then lets the
rollout controller walk the staged plan canary 10 % -> beta 50 % -> GA 100 % on a simulated clock,
driving simulated users through the official openai client in each phase. Each beta answer gets
feedback through the same client,
drawn from a known truth: the fine-tune completes more tasks (70 % -> 78 %), pleases more
(CSAT 3.8 -> 4.1) and escalates less (28 % -> 21 %). It prints per-variant tables from the
event stream, then the experiment report from the store, which should find that truth.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import yaml
from openai.types.chat import ChatCompletionMessageParam
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from proxy.analysis.render import to_table
from proxy.analysis.service import report_from_store
from proxy.assignment import bucket, choose_variant, threshold
from proxy.config import load_settings
from proxy.traffic import TRUTH

EXPERIMENT = "sales-companion"
SALT = "sales-v2"
_OUTCOMES = random.Random(2026)  # seeded: the same feedback draws on every run
# The held-out set of the offline evaluation step (in the repository, not in the installed package).
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "eval"
EVAL_SET = EXAMPLES / "icd10.jsonl"
PROMPTS = [
    "Draft a follow-up email to a prospect who went quiet after the demo.",
    "Summarise this call: pricing objections, wants SSO, decision in Q3.",
    "Which of our plans fits a 40-seat team with audit needs?",
    "Write a two-line LinkedIn intro for a CFO at a logistics company.",
    "The customer says we're too expensive. What do I say?",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not open port {port} within {timeout:.0f}s")


class Stack:
    """The demo's processes; all stopped on exit, whatever happens."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None) -> Path:
        out = self.workdir / f"{name}.out"
        proc = subprocess.Popen(
            argv,
            stdout=out.open("wb"),
            stderr=(self.workdir / f"{name}.err").open("wb"),
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.procs.append(proc)
        try:
            _wait_for_port(port, proc, name)
        except RuntimeError as exc:
            err = (self.workdir / f"{name}.err").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{exc}\n{err}") from None
        return out

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """A process with no port to wait for (the collector)."""
        proc = subprocess.Popen(
            argv,
            stdout=(self.workdir / f"{name}.out").open("wb"),
            stderr=(self.workdir / f"{name}.err").open("wb"),
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@dataclass(frozen=True)
class Running:
    url: str
    token: str
    events: Path
    redis_url: str
    config: Path
    store_url: str
    collector: subprocess.Popen[bytes]


@contextmanager
def running_stack(console: Console) -> Iterator[Running]:
    """Everything started, and stopped on the way out."""
    with tempfile.TemporaryDirectory(prefix="abproxy-demo-") as tmp:
        workdir = Path(tmp)
        stack = Stack(workdir)
        try:
            redis_url = os.environ.get("REDIS_URL")
            if redis_url is None:
                binary = shutil.which("redis-server")
                if binary is None:
                    raise RuntimeError(
                        "no REDIS_URL and no redis-server on PATH: install one "
                        "(Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis) or set REDIS_URL"
                    )
                port = _free_port()
                stack.start("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""], port)
                redis_url = f"redis://127.0.0.1:{port}/0"
                console.print(f"[dim]redis-server on {redis_url}[/]")
            ports = {"base": _free_port(), "finetuned": _free_port(), "proxy": _free_port()}
            mock = [sys.executable, "-m", "proxy", "mock-upstream"]
            # Both mocks know the held-out set's answers; the fine-tune answers it right far more often.
            knows = {name: ["--answers", str(EVAL_SET), "--skill", skill] if EVAL_SET.exists() else []
                     for name, skill in (("base", "0.35"), ("finetuned", "0.85"))}  # fmt: skip
            stack.start("mock-base", [*mock, "--port", str(ports["base"]), "--name", "base",
                                      "--latency-ms", "40", "--tokens-per-s", "400", *knows["base"]], ports["base"])
            stack.start("mock-ft", [*mock, "--port", str(ports["finetuned"]), "--name", "finetuned",
                                    "--latency-ms", "55", "--tokens-per-s", "500", *knows["finetuned"]],
                        ports["finetuned"])
            config = workdir / "demo.yaml"
            config.write_text(yaml.safe_dump(_demo_config(ports["base"], ports["finetuned"])))
            token = secrets.token_urlsafe(24)
            store_url = f"sqlite:///{workdir / 'store.db'}"
            env = {
                "REDIS_URL": redis_url, "ABPROXY_ADMIN_TOKEN": token, "ABPROXY_STORE_URL": store_url,
                # Secrets as a deployment would set them: users hashed with a key, request ids signed.
                "ABPROXY_USER_HASH_KEY": secrets.token_hex(16), "ABPROXY_SIGNING_KEY": secrets.token_hex(16),
            }
            events = stack.start(
                "proxy",
                [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--host", "127.0.0.1",
                 "--port", str(ports["proxy"]), "--log-level", "warning"],
                ports["proxy"],
                env=env,
            )
            collector = stack.spawn(
                "collector", [sys.executable, "-m", "proxy", "collect", "--config", str(config), "--log-level",
                              "warning"], env=env,
            )
            console.print(f"[dim]mock upstreams on :{ports['base']} and :{ports['finetuned']}, "
                          f"proxy on http://127.0.0.1:{ports['proxy']}, collector into {store_url}[/]")
            yield Running(f"http://127.0.0.1:{ports['proxy']}", token, events, redis_url, config, store_url,
                          collector)
        finally:
            stack.stop()


def _demo_config(base_port: int, ft_port: int) -> dict[str, Any]:
    return {
        "upstreams": {
            "mock-base": {"base_url": f"http://127.0.0.1:{base_port}/v1", "timeout_s": 30},
            "mock-finetuned": {"base_url": f"http://127.0.0.1:{ft_port}/v1", "timeout_s": 30},
        },
        "models": {
            "base": {"upstream": "mock-base", "model": "gpt-4o-mini",
                     "pricing": {"input_per_1m": 0.15, "output_per_1m": 0.60}},
            "finetuned": {"upstream": "mock-finetuned", "model": "ft:gpt-4o-mini:acme:sales-v2:abc123",
                          "pricing": {"input_per_1m": 0.30, "output_per_1m": 1.20}},
        },
        "experiments": {
            EXPERIMENT: {
                "aliases": [EXPERIMENT, "gpt-4o-mini"], "control": "base", "treatment": "finetuned",
                "salt": SALT, "rollout_percent": 0,
                # Driven by the controller on a simulated clock: a week of canary, two of beta, then GA.
                "rollout_plan": [
                    {"name": "canary", "percent": 10, "min_duration": "7d", "min_users_per_variant": 100,
                     "gates": [{"guardrail": "error_rate", "max_regression": 0.02},
                               {"guardrail": "latency_p95", "max_ratio": 1.6}]},
                    {"name": "beta", "percent": 50, "min_duration": "14d",
                     "gates": [{"metric": "task_completed", "non_inferior_margin": 0.02},
                               {"metric": "csat", "non_inferior_margin": 0.1}]},
                    {"name": "ga", "percent": 100},
                ],
                "analysis": {
                    "primary_metric": "task_completed", "secondary_metrics": ["csat", "escalated"],
                    "mde": 0.05, "planned_users_per_variant": 800,
                    # The fine-tune costs twice as much per token: the team accepts up to 2.5x per query.
                    "guardrails": {"error_rate": {"max_regression": 0.01}, "latency_p95": {"max_ratio": 1.2},
                                   "cost_per_query": {"max_ratio": 2.5}},
                },
            },
        },
        "metrics": {
            "task_completed": {"type": "boolean", "higher_is_better": True},
            "csat": {"type": "float", "min": 1, "max": 5},
            "escalated": {"type": "boolean", "higher_is_better": False},
        },
        "events": {"redis_stream": {"enabled": True}},
    }


async def _drive(
    client: openai.AsyncOpenAI,
    users: list[str],
    requests_per_user: int,
    concurrency: int,
    progress: Progress,
    label: str,
    feedback: bool,
) -> dict[str, str]:
    """Send requests for every user (and their outcomes); return the variant each user was served."""
    seen: dict[str, str] = {}
    jobs = [(user, i) for user in users for i in range(requests_per_user)]
    random.shuffle(jobs)
    task = progress.add_task(label, total=len(jobs))
    queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker() -> None:
        while not queue.empty():
            user, i = queue.get_nowait()
            # Numbered, so no two requests share a prompt: a repeat would count as a regeneration.
            prompt = f"{random.choice(PROMPTS)} (ticket {user}-{i}-{label})"
            messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": prompt}]
            headers = {"X-User-Id": user, "X-Episode-Id": f"{user}-conv"}
            if i % 3 == 0:  # a third of the traffic streams, as chat UIs do
                chunks = await client.chat.completions.create(
                    model=EXPERIMENT, messages=messages, stream=True, extra_headers=headers
                )
                async for _ in chunks:
                    pass
                variant = chunks.response.headers["x-abproxy-variant"]
                request_id = chunks.response.headers["x-request-id"]
            else:
                answered = await client.chat.completions.with_raw_response.create(
                    model=EXPERIMENT, messages=messages, extra_headers=headers
                )
                variant = answered.headers["x-abproxy-variant"]
                request_id = answered.headers["x-request-id"]
            seen[user] = variant
            if feedback:
                await _give_feedback(client, request_id, variant)
            progress.advance(task)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return seen


async def _give_feedback(client: openai.AsyncOpenAI, request_id: str, variant: str) -> None:
    """What the app would post once it knows how the answer went, drawn from the variant's truth."""
    outcomes = {metric: simulated.draw(variant, _OUTCOMES) for metric, simulated in TRUTH.items()}
    for metric, value in outcomes.items():
        await client.post("/feedback", body={"request_id": request_id, "metric": metric, "value": value},
                          cast_to=httpx.Response)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _report(console: Console, events: list[dict[str, Any]], title: str) -> None:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e.get("experiment") == EXPERIMENT:
            groups[e["variant"]].append(e)
    total = sum(len(g) for g in groups.values())
    table = Table(title=title)
    columns = ("variant", "requests", "share", "p50 ms", "p99 ms", "TTFT p50 ms", "tokens/resp", "$ per 1k queries")
    for column in columns:
        table.add_column(column, justify="left" if column == "variant" else "right")
    for variant in ("control", "treatment"):
        rows = groups.get(variant, [])
        if not rows:
            table.add_row(variant, "0", "0.0%", "-", "-", "-", "-", "-")
            continue
        latency = [r["latency_ms"] for r in rows]
        ttft = [r["ttft_ms"] for r in rows if r.get("ttft_ms") is not None]
        table.add_row(
            variant,
            str(len(rows)),
            f"{100 * len(rows) / total:.1f}%",
            f"{_percentile(latency, 50):.1f}",
            f"{_percentile(latency, 99):.1f}",
            f"{_percentile(ttft, 50):.1f}" if ttft else "-",
            f"{statistics.fmean(r['completion_tokens'] for r in rows):.1f}",
            f"{1000 * statistics.fmean(r['cost_usd'] for r in rows):.4f}",
        )
    console.print(table)


def _read_events(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.startswith(b"{")]


@dataclass
class _SimulatedClock:
    """The controller's clock for phase durations: a week passes when the demo says so."""

    now: float

    def __call__(self) -> float:
        return self.now


async def _staged_rollout(
    running: Running, user_ids: list[str], requests_per_user: int, concurrency: int, console: Console
) -> tuple[dict[float, dict[str, str]], list[float], list[dict[str, Any]], list[Any]]:
    """The controller walks the plan canary -> beta -> GA; every user is driven in each phase.

    The controller runs in this process with a simulated clock, so "7 days of canary" is one round of
    traffic; its data windows are the real ones, as the proxy stamps requests with the wall clock.
    """
    import redis.asyncio as aioredis

    from proxy.controller.controller import Controller
    from proxy.logs import configure_logging
    from proxy.rollout import RolloutStore
    from proxy.store.db import engine_for

    configure_logging("warning")  # the demo prints each decision itself; its JSON log line would repeat it

    settings = load_settings(running.config, {**os.environ, "ABPROXY_STORE_URL": running.store_url},
                             upstream_keys=False)  # fmt: skip
    engine = engine_for(running.store_url)
    redis = aioredis.from_url(running.redis_url, decode_responses=True)
    clock = _SimulatedClock(time.time())
    controller = Controller(settings, redis, engine, clock=clock)
    rollout = RolloutStore(redis, {EXPERIMENT: 0.0})
    served: dict[float, dict[str, str]] = {}
    marks: list[float] = []
    client = openai.AsyncOpenAI(base_url=f"{running.url}/v1", api_key="demo-client-key", max_retries=0)
    try:
        started = (await controller.tick())[EXPERIMENT]
        console.print(f"controller: {started.decision.action}: {started.decision.reason}", markup=False)
        with Progress(console=console) as progress:
            for phase, days in (("canary", 7), ("beta", 14)):
                await asyncio.sleep(0.2)  # the proxies follow the percent by pub/sub within milliseconds
                percent = (await rollout.get(EXPERIMENT)).percent
                marks.append(time.time())
                # Outcomes are reported in the beta phase, the one the report analyses.
                served[percent] = await _drive(client, user_ids, requests_per_user, concurrency, progress,
                                               f"{phase} {percent:>3g}%", feedback=phase == "beta")  # fmt: skip
                await asyncio.sleep(0.3)  # the proxy flushes events every 100 ms
                await asyncio.to_thread(_wait_collected, running)
                clock.now += days * 86_400
                outcome = (await controller.tick())[EXPERIMENT]
                console.print(f"controller after {days} simulated days of {phase}: {outcome.decision.action}: "
                              f"{outcome.decision.reason}", markup=False)  # fmt: skip
        decisions = list(reversed(await controller.store.decisions(EXPERIMENT, 20)))
    finally:
        await client.close()
        await redis.aclose()
        engine.dispose()
    async with httpx.AsyncClient(base_url=running.url, headers={"Authorization": f"Bearer {running.token}"},
                                 timeout=10) as admin:  # fmt: skip
        audit = (await admin.get(f"/admin/experiments/{EXPERIMENT}/audit")).json()["entries"]
    return served, marks, audit, decisions


def _decisions(console: Console, decisions: list[Any]) -> None:
    """The controller's decisions with the evidence each gate gave: `abproxy rollout plan` shows the same."""
    table = Table("action", "phase", "percent", "gates (evidence)", title="staged rollout: the controller's decisions",
                  title_justify="left", show_lines=True)  # fmt: skip
    for d in decisions:
        gates = "\n".join(f"{g['gate']}: {g['status']} ({g['detail']})"
                          for g in (d.evidence or {}).get("gates", []))  # fmt: skip
        table.add_row(d.action, d.phase_to, f"{d.percent_from:g}% -> {d.percent_to:g}%", gates or d.reason)
    console.print(table)


def _wait_collected(running: Running, timeout_s: float = 60.0) -> None:
    """Until the collector's group has read and acknowledged everything on the stream."""
    import redis

    client = redis.Redis.from_url(running.redis_url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if running.collector.poll() is not None:
                raise RuntimeError(f"the collector exited with code {running.collector.returncode}")
            groups: Any = client.xinfo_groups("abproxy:events")
            if groups and groups[0]["lag"] == 0 and groups[0]["pending"] == 0:
                return
            time.sleep(0.2)
    finally:
        client.close()
    raise RuntimeError("the collector did not catch up within {timeout_s:.0f}s")


def _offline_eval(console: Console, running: Running) -> None:
    """Before any user sees the fine-tune: both models on the held-out set, compared example by example."""
    from proxy.offline_eval.checks import load_checks
    from proxy.offline_eval.render import to_table as eval_table
    from proxy.offline_eval.report import run_report
    from proxy.offline_eval.runner import model_specs, run_eval
    from proxy.offline_eval.runs import Scoring, default_run_id, load_run
    from proxy.offline_eval.testset import load_test_set
    from proxy.store.db import engine_for, migrate

    console.rule("1. offline evaluation: the held-out set, before any user sees the fine-tune")
    if not EVAL_SET.exists():
        console.print(f"[dim]skipped: {EVAL_SET} is not here (run the demo from a checkout)[/]")
        return
    settings = load_settings(running.config, {**os.environ, "ABPROXY_STORE_URL": running.store_url})
    engine = engine_for(running.store_url)
    migrate(engine)
    test = load_test_set(EVAL_SET)
    specs = model_specs(settings, ["base", "finetuned"])
    run_id = default_run_id(test, specs, None, 512)
    asyncio.run(run_eval(engine, settings, test, specs, run_id=run_id,
                         scoring=Scoring(False, load_checks(EXAMPLES / "format.yaml"))))  # fmt: skip
    run = load_run(engine, run_id)
    engine.dispose()
    assert run is not None
    eval_table(run_report(run), console)
    console.print("[dim]the same on your machine: abproxy eval run --config config/local.yaml --test-file "
                  "examples/eval/icd10.jsonl --model base --model finetuned --check examples/eval/format.yaml, "
                  "then abproxy eval to-study RUN --evaluators ann,bob (README, Offline evaluation)[/]")
    console.rule("2. staged rollout through the proxy")


def run_demo(users: int = 2000, requests_per_user: int = 2, concurrency: int = 32) -> None:
    console = Console(width=max(Console().width, 150))
    console.rule("llm-ab-proxy demo")
    user_ids = [f"user-{i:05d}" for i in range(users)]
    with running_stack(console) as running:
        _offline_eval(console, running)
        served, marks, audit, decisions = asyncio.run(
            _staged_rollout(running, user_ids, requests_per_user, concurrency, console)
        )
        time.sleep(0.3)  # the proxy flushes events every 100 ms
        events = _read_events(running.events)
        _wait_collected(running)
        settings = load_settings(running.config, {**os.environ, "ABPROXY_STORE_URL": running.store_url},
                                 upstream_keys=False)
        from proxy.store.db import engine_for

        engine = engine_for(running.store_url)
        # The beta phase alone: one constant split, every user first seen at 50 %.
        report = report_from_store(engine, settings, EXPERIMENT, since=marks[1], until=None, now=time.time())
        engine.dispose()

    first, second = (list(served) * 2)[:2]  # the same percent twice if the controller held
    _report(console, [e for e in events if e["ts"] < marks[1]], f"rollout {first:g} % (canary)")
    _report(console, [e for e in events if e["ts"] >= marks[1]], f"rollout {second:g} % (beta)")
    moved_back = sum(1 for u in user_ids
                     if served[first].get(u) == "treatment" and served[second].get(u) == "control")  # fmt: skip
    expected = {u: choose_variant(bucket(SALT, u), threshold(second)) for u in user_ids}
    agree = sum(1 for u in user_ids if served[second].get(u) == expected[u])
    console.print(f"users moved from treatment back to control when the rollout rose: [bold]{moved_back}[/]")
    console.print(f"users whose variant matches the public formula at {second:g} %: [bold]{agree}/{len(user_ids)}[/]")
    _decisions(console, decisions)
    steps = ", ".join(f"{e['from']:g}% -> {e['to']:g}% ({e['reason']})" for e in reversed(audit))
    console.print(f"audit trail: {steps}")
    console.print(f"[dim]{len(events)} events read from the proxy's event stream[/]")
    console.rule("experiment report (beta phase, from the store)")
    to_table(report, console)
    truth = ", ".join(f"{metric} {sim.control:g} -> {sim.treatment:g}" for metric, sim in TRUTH.items())
    console.print(f"[dim]simulated truth: {truth} (CSAT before rounding to whole scores 1..5, which "
                  "narrows its gap to about 0.27)[/]")
