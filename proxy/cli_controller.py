"""`abproxy controller`, and `abproxy rollout plan` (the plan, its state, decisions, and a dry run)."""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click
from rich.table import Table

from proxy.cli_common import add_row, config_option, console, fail, load_config, store_engine

if TYPE_CHECKING:
    from proxy.config import Settings


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


@click.command("controller")
@config_option
@click.option("--once", is_flag=True, help="One round (take the lease, evaluate, act), then exit.")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on this port.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def controller_command(config: str | None, once: bool, metrics_port: int | None, log_level: str) -> None:
    """Drive every experiment's rollout plan: promote, hold, roll back or halt by its gates.

    Run one per replica if you like: only the holder of the Redis lease acts (see README, Staged rollout).
    """
    import redis.asyncio as aioredis
    from prometheus_client import CollectorRegistry, start_http_server

    from proxy.controller.controller import Controller
    from proxy.controller.webhook import Notifier
    from proxy.logs import configure_logging

    _, settings = load_config(config, upstream_keys=False)
    configure_logging(log_level)
    if not any(e.rollout_plan for e in settings.experiments.values()):
        fail("no experiment has a rollout_plan in the config: nothing to drive")
    registry = CollectorRegistry()
    if metrics_port is not None:
        start_http_server(metrics_port, addr="0.0.0.0", registry=registry)
    engine = store_engine(settings.store.url)

    async def main() -> None:
        redis = aioredis.from_url(settings.redis_url, decode_responses=True, socket_timeout=5)
        notifier = Notifier(settings.controller.webhook_url) if settings.controller.webhook_url else None
        controller = Controller(settings, redis, engine, registry=registry, notifier=notifier)
        try:
            if once:
                try:
                    await controller.tick()
                finally:
                    await controller.lock.release()
                return
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await controller.run(stop)
        finally:
            await redis.aclose()

    try:
        asyncio.run(main())
    finally:
        engine.dispose()


async def show_plan(settings: Settings, experiment: str, *, dry_run: bool, limit: int) -> None:
    import redis.asyncio as aioredis

    from proxy.controller.controller import Controller
    from proxy.controller.evidence import span
    from proxy.errors import StateUnavailable

    plan = settings.experiments[experiment].rollout_plan
    engine = store_engine(settings.store.url)
    redis = aioredis.from_url(settings.redis_url, decode_responses=True, socket_timeout=5)
    try:
        controller = Controller(settings, redis, engine)
        try:
            if dry_run:
                state, evidence, decision = await controller.evaluate(experiment)
            else:
                state, evidence, decision = await controller.store.get(experiment), None, None
            decisions = await controller.store.decisions(experiment, limit)
        except StateUnavailable as exc:
            fail(str(exc))
    finally:
        await redis.aclose()
        engine.dispose()
    table = Table("phase", "percent", "min duration", "min users", "gates", title=f"rollout plan of {experiment}",
                  title_justify="left")  # fmt: skip
    for i, phase in enumerate(plan):
        here = state is not None and state.phase == i
        gates = ", ".join(f"{g.label} ({g.failure_action})" for g in phase.gates) or "-"
        add_row(table, ("▶ " if here else "  ") + phase.name, f"{phase.percent:g}%", span(phase.min_duration),
                      str(phase.min_users_per_variant), gates)  # fmt: skip
    console.print(table)
    if state is None:
        console.print("not started: the controller enters the first phase on its next round")
    else:
        status = state.status.replace("_", " ")
        console.print(f"phase {state.phase_name}, {status} since {_when(state.entered_at)} (rev {state.rev}, by "
                      f"{state.updated_by}: {state.reason})", markup=False, highlight=False)  # fmt: skip
    if evidence is not None:
        now = Table("gate", "status", "on fail", "roughly", "evidence", title="gates now", title_justify="left")
        for g in evidence.gates:
            add_row(now, g.gate, g.status, g.on_fail, span(g.eta_s) if g.status == "wait" else "-", g.detail)
        console.print(now)
        console.print(f"sample ratio: {evidence.srm_detail}", markup=False, highlight=False)
    if decision is not None:
        console.print(f"dry run: the controller would {decision.action}: {decision.reason}", markup=False,
                      highlight=False)  # fmt: skip
    if decisions:
        table = Table("at (UTC)", "by", "action", "phase", "percent", "reason", title="latest decisions",
                      title_justify="left")  # fmt: skip
        for d in decisions:
            add_row(table, _when(d.at), d.by, d.action, d.phase_to, f"{d.percent_from:g}% -> {d.percent_to:g}%",
                          d.reason)  # fmt: skip
        console.print(table)
