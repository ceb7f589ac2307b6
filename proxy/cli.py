"""The `abproxy` command line: serve, assign, rollout, events, collect, store, report, stats, traffic,
mock-upstream, demo, humaneval, eval (in `proxy.cli_eval`)."""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

import click
import httpx
from rich.table import Table

from proxy.cli_common import (
    add_row,
    base_url_option,
    config_option,
    console,
    eval_link,
    fail,
    load_config,
    migrate_store,
    migrated_store,
    print_report,
    print_study,
    store_engine,
    store_option,
    study_arguments,
)
from proxy.cli_controller import controller_command
from proxy.cli_eval import eval_group

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from sqlalchemy import Engine

    from proxy.config import Settings
    from proxy.humaneval.studies import ImportResult


@click.group()
@click.version_option(package_name="llm-ab-proxy")
def main() -> None:
    """llm-ab-proxy: an OpenAI-compatible gateway that A/B tests a fine-tuned model against its base."""


main.add_command(eval_group)
main.add_command(controller_command)


@main.command()
@click.option("--config", "config", envvar="ABPROXY_CONFIG", help="YAML config file [env ABPROXY_CONFIG].")
@click.option("--host", default=None, help="Bind address [config server.host, 0.0.0.0].")
@click.option("--port", type=int, default=None, help="Port [config server.port, 8080].")
@click.option("--workers", type=int, default=None, help="Worker processes [config server.workers, 1].")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def serve(config: str | None, host: str | None, port: int | None, workers: int | None, log_level: str) -> None:
    """Run the proxy."""
    import uvicorn

    from proxy.app import create_app
    from proxy.logs import configure_logging
    from proxy.metrics import multiprocess_dir, prepare_multiprocess_dir

    path, settings = load_config(config)
    configure_logging(log_level)
    workers = workers or settings.server.workers
    options: dict[str, Any] = {
        "host": host or settings.server.host,
        "port": port or settings.server.port,
        "loop": "uvloop",
        "http": "httptools",
        "access_log": False,  # the event stream is the access log, written off the request path
        "server_header": False,
        "proxy_headers": False,  # applied to the admin API and /eval only (proxy/app.py)
        "log_level": log_level,
        # SIGTERM: stop accepting, let open requests and streams run this long, then end them and
        # flush the event sinks (the app's lifespan shutdown).
        "timeout_graceful_shutdown": settings.server.shutdown_timeout_s,
    }
    metrics_port = settings.server.metrics_port
    if metrics_port is not None and metrics_port == options["port"]:
        fail(f"config error: server.metrics_port: must differ from the serving port ({metrics_port})")
    if workers > 1 or multiprocess_dir() is not None:
        # prometheus-client is in multiprocess mode whenever the variable is set, one worker
        # too: that directory must exist and hold no earlier run's files before metrics exist.
        prepare_multiprocess_dir()
    if workers > 1:
        # Each worker re-reads the (already validated) file through the factory, and writes its
        # metrics to the shared multiprocess directory, set before the workers are spawned.
        os.environ["ABPROXY_CONFIG"] = os.path.abspath(path)
        _metrics_port(options["host"], metrics_port, None)
        uvicorn.run("proxy.app:create_app_from_env", factory=True, workers=workers, **options)
    else:
        app = create_app(settings, freeze_gc=True)
        _metrics_port(options["host"], metrics_port, app.runtime.metrics.registry)
        uvicorn.run(app, **options)


def _metrics_port(host: str, port: int | None, registry: CollectorRegistry | None) -> None:
    from proxy.metrics import serve_metrics_port

    if port is None:
        return
    try:
        serve_metrics_port(host, port, registry)
    except OSError as exc:
        fail(f"config error: server.metrics_port: cannot listen on {host}:{port}: {exc.strerror}")


@main.command("hash-key")
@click.option("--key", envvar="ABPROXY_CLIENT_KEY", prompt=True, hide_input=True,
              help="The client key to accept [env ABPROXY_CLIENT_KEY; prompted, not echoed, if unset].")
def hash_key(key: str) -> None:
    """Print the SHA-256 of a client key, for client_auth.key_sha256 (the key itself is never stored)."""
    import hashlib

    if not key.strip():
        fail("the key is empty")
    click.echo(hashlib.sha256(key.strip().encode()).hexdigest())


@main.command()
@click.argument("experiment")
@click.argument("user_id")
@click.option("--config", "config", envvar="ABPROXY_CONFIG", help="YAML config file [env ABPROXY_CONFIG].")
def assign(experiment: str, user_id: str, config: str | None) -> None:
    """Print USER_ID's bucket in EXPERIMENT and its variant under the live percent (read from Redis)."""
    from proxy.assignment import bucket, choose_variant, threshold
    from proxy.experiments import Router

    _, settings = load_config(config, upstream_keys=False)
    exp = Router(settings).experiments.get(experiment)
    if exp is None:
        fail(f"unknown experiment {experiment!r}; known: {', '.join(sorted(settings.experiments))}")
    percent, source = asyncio.run(_live_percent(settings, experiment, exp.default_percent))
    b = bucket(exp.salt, user_id)
    variant = choose_variant(b, threshold(percent))
    click.echo(f"experiment={experiment} user={user_id} bucket={b} percent={percent:g} ({source}) variant={variant}")


async def _live_percent(settings: Settings, experiment: str, default: float) -> tuple[float, str]:
    import redis.asyncio as aioredis

    from proxy.errors import StateUnavailable
    from proxy.rollout import RolloutStore

    client = aioredis.from_url(settings.redis_url, decode_responses=True, socket_connect_timeout=2, socket_timeout=2)
    try:
        state = await RolloutStore(client, {experiment: default}).get(experiment)
    except StateUnavailable:
        fail(f"cannot read the live percent: Redis at {settings.redis_url} is unreachable")
    finally:
        await client.aclose()
    return state.percent, "live" if state.source == "redis" else "config default: Redis holds no value"


# -- rollout: the admin API over HTTP -------------------------------------------------------
def _admin_client(url: str | None, token: str | None) -> httpx.Client:
    base = url or os.environ.get("ABPROXY_URL", "http://127.0.0.1:8080")
    token = token or os.environ.get("ABPROXY_ADMIN_TOKEN")
    if not token:
        fail("no admin token: set ABPROXY_ADMIN_TOKEN or pass --token")
    actor = os.environ.get("USER") or "cli"
    return httpx.Client(
        base_url=base, timeout=10, headers={"Authorization": f"Bearer {token}", "X-Abproxy-Actor": actor}
    )


def _call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        fail(f"cannot reach the proxy at {client.base_url}: {exc}")
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        fail(f"error {response.status_code}: {message}")
    return response.json()


_url = click.option("--url", envvar="ABPROXY_URL", help="Proxy base URL [env ABPROXY_URL, http://127.0.0.1:8080].")
_token = click.option("--token", help="Admin token [env ABPROXY_ADMIN_TOKEN].")


@main.group()
def rollout() -> None:
    """Read or change an experiment's live rollout percent."""


def _print_experiments(rows: list[dict[str, Any]]) -> None:
    table = Table("experiment", "percent", "control", "treatment", "updated", "by", "reason")
    for row in rows:
        add_row(table,
            row["name"] + (" (stale)" if row.get("stale") else ""),
            f"{row['percent']:g}%" + ("" if row["source"] == "redis" else " (config)"),
            row["control"]["upstream_model"],
            row["treatment"]["upstream_model"],
            row["updated_at"] or "-",
            row["updated_by"] or "-",
            row["reason"] or "-",
        )
    console.print(table)


@rollout.command("get")
@click.argument("experiment", required=False)
@_url
@_token
def rollout_get(experiment: str | None, url: str | None, token: str | None) -> None:
    """Show one experiment's live percent (or all)."""
    with _admin_client(url, token) as client:
        if experiment is None:
            _print_experiments(_call(client, "GET", "/admin/experiments")["experiments"])
        else:
            _print_experiments([_call(client, "GET", f"/admin/experiments/{experiment}")])


@rollout.command("set")
@click.argument("experiment")
@click.argument("percent", type=float)
@click.option("--reason", default=None, help="Why, for the audit trail.")
@_url
@_token
def rollout_set(experiment: str, percent: float, reason: str | None, url: str | None, token: str | None) -> None:
    """Set EXPERIMENT's rollout to PERCENT (0..100, two decimals); every instance follows within a second."""
    with _admin_client(url, token) as client:
        body = _call(
            client, "PUT", f"/admin/experiments/{experiment}/rollout", json={"percent": percent, "reason": reason}
        )
    previous = "?" if body["previous_percent"] is None else f"{body['previous_percent']:g}%"
    click.echo(f"{experiment}: {previous} -> {body['percent']:g}%")


@rollout.command("audit")
@click.argument("experiment")
@click.option("--limit", default=20, show_default=True)
@_url
@_token
def rollout_audit(experiment: str, limit: int, url: str | None, token: str | None) -> None:
    """Show EXPERIMENT's rollout change history, newest first."""
    with _admin_client(url, token) as client:
        body = _call(client, "GET", f"/admin/experiments/{experiment}/audit", params={"limit": limit})
    table = Table("at", "from", "to", "by", "reason")
    for e in body["entries"]:
        add_row(table, e["at"], f"{e['from']:g}%", f"{e['to']:g}%", e["by"], e["reason"] or "-")
    console.print(table)


def _override_command(action: str, summary: str) -> None:
    @rollout.command(action, help=f"{summary} A person's word always wins over the controller's; audited.")
    @click.argument("experiment")
    @click.option("--reason", required=True, help="Why, for the audit trail and the decision record.")
    @_url
    @_token
    def command(experiment: str, reason: str, url: str | None, token: str | None) -> None:
        with _admin_client(url, token) as client:
            body = _call(client, "POST", f"/admin/experiments/{experiment}/plan/{action}", json={"reason": reason})
        state = body["state"]
        click.echo(f"{experiment}: {action} -> phase {state['phase_name']}, {state['status'].replace('_', ' ')}")


_override_command("pause", "Stop the controller acting on EXPERIMENT's plan; the percent stays.")
_override_command("resume", "Let the controller act again (after a halt, rollback or abort: re-enter the phase).")
_override_command("promote", "Move EXPERIMENT to the next phase now, whatever its gates say.")
_override_command("abort", "Set EXPERIMENT to 0 % at once and stop its plan.")


@rollout.command("plan")
@click.argument("experiment")
@click.option("--dry-run", is_flag=True, help="Also evaluate the gates now and say what the controller would do.")
@click.option("--limit", default=10, show_default=True, help="Latest decisions shown.")
@config_option
def rollout_plan(experiment: str, dry_run: bool, limit: int, config: str | None) -> None:
    """EXPERIMENT's rollout plan, where it stands, its latest decisions; with --dry-run, the next one and why."""
    from proxy.cli_controller import show_plan

    _, settings = load_config(config, upstream_keys=False)
    if experiment not in settings.experiments:
        fail(f"no experiment named {experiment!r} (configured: {', '.join(sorted(settings.experiments))})")
    if not settings.experiments[experiment].rollout_plan:
        fail(f"experiment {experiment!r} has no rollout_plan in the config")
    asyncio.run(show_plan(settings, experiment, dry_run=dry_run, limit=limit))


@main.command("mock-upstream")
@click.option("--port", type=int, required=True)
@click.option("--name", required=True, help="Named in every answer, so you can see who answered.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--latency-ms", type=float, default=0.0, show_default=True, help="Delay before the first byte.")
@click.option("--tokens-per-s", type=float, default=0.0, show_default=True, help="Streaming pace; 0 = no pause.")
@click.option("--api-key", envvar="MOCK_API_KEY", default=None, help="Require this bearer key [env MOCK_API_KEY].")
@click.option("--fail-first", type=int, default=0, show_default=True,
              help="Answer the first N requests --fail-status with --retry-after (to test retries).")
@click.option("--fail-status", type=click.IntRange(400, 599), default=429, show_default=True,
              help="HTTP status (4xx or 5xx) of the --fail-first failures.")
@click.option("--retry-after", default="0", show_default=True,
              help='Retry-After header of the --fail-first failures; "" sends none.')
@click.option("--answers", "answers_file", type=click.Path(dir_okay=False), default=None,
              help="Test set (OpenAI fine-tuning chat JSONL) whose prompts get its expected answers, --skill of "
                   "the time; a deterministic wrong answer otherwise.")  # fmt: skip
@click.option("--skill", type=click.FloatRange(0.0, 1.0), default=1.0, show_default=True,
              help="Share of --answers prompts answered exactly (which ones: a hash of --name and the prompt).")
@click.option("--error-rate", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="Share of requests answered 500 (drawn from a generator seeded by --name).")
def mock_upstream(
    port: int, name: str, host: str, latency_ms: float, tokens_per_s: float, api_key: str | None, fail_first: int,
    fail_status: int, retry_after: str, answers_file: str | None, skill: float, error_rate: float,
) -> None:
    """Run a small OpenAI-compatible server for demos, tests and benchmarks."""
    from proxy.mock_upstream import load_answers, run

    answers = None
    if answers_file is not None:
        try:
            answers = load_answers(answers_file)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise click.ClickException(f"--answers {answers_file}: {reason}") from None
    run(host=host, port=port, name=name, latency_ms=latency_ms, tokens_per_s=tokens_per_s, api_key=api_key,
        fail_first=fail_first, fail_status=fail_status, retry_after=retry_after, answers=answers, skill=skill,
        error_rate=error_rate)


@main.command()
@click.option("--users", default=2000, show_default=True, help="Simulated users.")
@click.option("--requests-per-user", default=2, show_default=True, help="Requests per user at each rollout step.")
@click.option("--concurrency", default=32, show_default=True)
def demo(users: int, requests_per_user: int, concurrency: int) -> None:
    """Run Redis (unless REDIS_URL is set), two mock upstreams and the proxy; ramp 10 % -> 50 %; print the table."""
    from proxy.demo import run_demo

    try:
        run_demo(users, requests_per_user, concurrency)
    except RuntimeError as exc:
        fail(f"demo failed: {exc}")


# -- events: the per-request event stream in Redis ------------------------------------------
@main.group()
def events() -> None:
    """Read the per-request event stream (events.redis_stream in the config)."""


@events.command("tail")
@click.option("--config", "config", envvar="ABPROXY_CONFIG", help="YAML config file [env ABPROXY_CONFIG].")
@click.option("--experiment", default=None, help="Only this experiment's requests.")
@click.option("--variant", type=click.Choice(["control", "treatment"]), default=None, help="Only this variant.")
@click.option("--json", "as_json", is_flag=True, help="Print each event as its JSON object.")
@click.option("--last", default=0, show_default=True, help="First replay this many recent events.")
def events_tail(config: str | None, experiment: str | None, variant: str | None, as_json: bool, last: int) -> None:
    """Follow requests live, one line each, until interrupted."""
    import orjson

    from proxy.event_stream import StreamEvent
    from proxy.events_tail import follow, format_line, matches

    _, settings = load_config(config, upstream_keys=False)
    stream = settings.events.redis_stream
    if not stream.enabled:
        click.echo("note: events.redis_stream.enabled is false in this config; waiting for events anyway", err=True)

    def show(entry: StreamEvent) -> None:
        if matches(entry.event, experiment, variant):
            click.echo(orjson.dumps(entry.event).decode() if as_json else format_line(entry.event))

    try:
        asyncio.run(follow(settings.redis_url, stream.key, show, lambda m: click.echo(m, err=True), last=last))
    except KeyboardInterrupt:
        pass


# -- collect and store: the event stream into the durable store the analysis reads ----------


@main.command()
@click.option("--config", "config", envvar="ABPROXY_CONFIG", help="YAML config file [env ABPROXY_CONFIG].")
@click.option("--consumer", default=None, help="This collector's name in the consumer group [hostname-pid].")
@click.option("--once", is_flag=True, help="Store what the stream holds now, then exit.")
@store_option
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on this port.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def collect(
    config: str | None, consumer: str | None, once: bool, store_url: str | None, metrics_port: int | None,
    log_level: str,
) -> None:  # fmt: skip
    """Write the event stream's requests and feedback to the store, until SIGTERM (or drained, with --once)."""
    import redis.asyncio as aioredis
    import structlog
    from prometheus_client import start_http_server
    from redis.exceptions import RedisError
    from sqlalchemy.exc import SQLAlchemyError

    from proxy.gc_tuning import freeze_startup_heap
    from proxy.logs import configure_logging
    from proxy.store.collector import Collector, CollectorMetrics, default_consumer, error_line
    from proxy.store.collector import collect as collect_events
    from proxy.store.db import Store

    _, settings = load_config(config, upstream_keys=False)
    engine = store_engine(store_url or settings.store.url)
    configure_logging(log_level)
    metrics = CollectorMetrics()
    if metrics_port is not None:
        try:
            start_http_server(metrics_port, addr="0.0.0.0", registry=metrics.registry)
        except OSError as exc:
            fail(f"--metrics-port: cannot listen on port {metrics_port}: {exc.strerror}")
    revision = migrate_store(engine)
    # A long-running drain: full collections would rescan the start-up heap (proxy/gc_tuning.py).
    frozen = freeze_startup_heap()
    structlog.get_logger("abproxy").info(
        "store_ready", store=engine.url.render_as_string(hide_password=True), revision=revision,
        gc_frozen_objects=frozen,
    )  # fmt: skip
    options = settings.collector

    async def run() -> None:
        # The read timeout outlasts the longest blocking XREADGROUP.
        client = aioredis.from_url(
            settings.redis_url, socket_connect_timeout=5, socket_timeout=options.block_ms / 1000 + 10
        )
        collector = Collector(
            client, Store(engine, regeneration_window_s=settings.feedback.regeneration_window_s),
            key=settings.events.redis_stream.key, group=options.group, consumer=consumer or default_consumer(),
            batch_size=options.batch_size, block_ms=options.block_ms, claim_idle_ms=options.claim_idle_ms,
            metrics=metrics, rollup_interval_s=0.0 if once else options.rollup_interval_s,
            rollup_settle_s=options.rollup_settle_s,
        )  # fmt: skip
        try:
            await collect_events(collector, once=once)
        finally:
            await client.aclose()

    try:
        asyncio.run(run())
    except (RedisError, OSError, SQLAlchemyError) as exc:  # only --once lets an error out
        fail(f"collect failed: {error_line(exc)}")
    finally:
        engine.dispose()


@main.group("store")
def store_group() -> None:
    """The durable store that `abproxy collect` writes (store.url in the config)."""


@store_group.command("migrate")
@click.option("--config", "config", envvar="ABPROXY_CONFIG", help="YAML config file [env ABPROXY_CONFIG].")
@store_option
def store_migrate(config: str | None, store_url: str | None) -> None:
    """Create or upgrade the store's tables to the newest revision, and print it."""
    if store_url is None:
        store_url = load_config(config, upstream_keys=False)[1].store.url
    # With --store, no config file is read: nothing else in it matters here.
    engine = store_engine(store_url)
    revision = migrate_store(engine)
    engine.dispose()
    click.echo(f"store {engine.url.render_as_string(hide_password=True)}: at revision {revision}")


@store_group.command("rollup")
@click.option("--config", "config", envvar="ABPROXY_CONFIG", help="YAML config file [env ABPROXY_CONFIG].")
@store_option
@click.option("--settle-s", type=click.FloatRange(min=0), default=None,
              help="Build a day this long after its end [collector.rollup_settle_s].")
@click.option("--scan", is_flag=True, help="First enter the days of requests stored around the collector "
              "(a bulk load, a restore): a full scan of the requests.")
@click.option("--all", "rebuild_all", is_flag=True, help="Rebuild every day, current or not, that is over.")
def store_rollup(config: str | None, store_url: str | None, settle_s: float | None, scan: bool,
                 rebuild_all: bool) -> None:
    """Build the report's rollup of every day that is over and not current (the collector does it each minute)."""
    import time

    from rich.progress import Progress
    from sqlalchemy.exc import SQLAlchemyError

    from proxy.store import rollup
    from proxy.store.collector import error_line

    settings = load_config(config, upstream_keys=False)[1]
    engine = store_engine(store_url or settings.store.url)
    migrate_store(engine)
    window_s = settings.feedback.regeneration_window_s
    settle = settings.collector.rollup_settle_s if settle_s is None else settle_s
    now = time.time()
    try:
        if scan:
            with engine.begin() as conn:
                rollup.enter_stored_days(conn)
        with engine.connect() as conn:
            days = rollup.due(conn, window_s, now, settle, current_too=rebuild_all)
        with Progress(transient=True) as progress:
            task = progress.add_task("building days", total=len(days))
            built = 0
            for experiment, day in days:
                built += rollup.build_day(engine, experiment, day, window_s, now, force=rebuild_all)
                progress.advance(task)
        if built:
            rollup.tidy(engine)
    except SQLAlchemyError as exc:
        fail(f"rollup failed: {error_line(exc)}")
    finally:
        engine.dispose()
    click.echo(f"rollup: {built} day(s) built in {time.time() - now:.1f} s")


# -- analysis: the report, and planning ------------------------------------------------------
@main.command()
@click.argument("experiment")
@click.option("--config", "config", envvar="ABPROXY_CONFIG", help="YAML config file [env ABPROXY_CONFIG].")
@click.option("--since", default=None, help="Window start: 7d, 12h, an ISO date/time or unix seconds [first request].")
@click.option("--until", default=None, help="Window end, same forms [now].")
@click.option("--format", "fmt", default="table", show_default=True,
              type=click.Choice(["table", "markdown", "json", "csv"]))
@store_option
def report(
    experiment: str, config: str | None, since: str | None, until: str | None, fmt: str, store_url: str | None
) -> None:
    """The experiment's outcomes, significance, sample-ratio check, power and verdict, from the store."""
    import time

    from proxy.analysis.service import StoreNotReady, parse_bounds, report_from_store
    from proxy.gc_tuning import cyclic_collector_paused

    _, settings = load_config(config, upstream_keys=False)
    if experiment not in settings.experiments:
        fail(f"no experiment named {experiment!r} (configured: {', '.join(sorted(settings.experiments))})")
    now = time.time()
    try:
        start, end = parse_bounds(since, until, now)
    except ValueError as exc:
        fail(f"--{exc}")
    engine = store_engine(store_url or settings.store.url)
    try:
        with cyclic_collector_paused():
            result = report_from_store(engine, settings, experiment, since=start, until=end, now=now)
    except StoreNotReady as exc:
        fail(str(exc))
    finally:
        engine.dispose()
    # Imported once the report is built: it imports the statistics, which report_from_store
    # imports while the store is read.
    from proxy.analysis.render import to_csv, to_json, to_markdown, to_table

    print_report(fmt, result, to_json, to_markdown, to_csv, to_table)


@main.group("stats")
def stats_group() -> None:
    """Planning: how many users an experiment needs before it starts."""


@stats_group.command("sample-size")
@click.option("--baseline", type=float, default=None, help="Control's rate (0..1) for a rate metric.")
@click.option("--sd", type=float, default=None, help="Per-user standard deviation, for a mean metric instead.")
@click.option("--mde", type=float, required=True, help="Smallest absolute change worth detecting (0.05 = 5 points).")
@click.option("--alpha", type=float, default=0.05, show_default=True)
@click.option("--power", type=float, default=0.8, show_default=True)
@click.option("--treatment-share", type=float, default=0.5, show_default=True,
              help="Share of users in treatment (the rollout percent / 100).")
@click.option("--users-per-day", type=float, default=None, help="Identified users per day, to estimate the duration.")
def stats_sample_size(
    baseline: float | None, sd: float | None, mde: float, alpha: float, power: float, treatment_share: float,
    users_per_day: float | None,
) -> None:
    """Users needed per variant to detect --mde at --alpha with --power (two-sided)."""
    import math

    from proxy.analysis.stats import sample_size_means, sample_size_proportions

    if (baseline is None) == (sd is None):
        fail("give --baseline (a rate metric) or --sd (a mean metric)")
    if not 0 < treatment_share < 1:
        fail("--treatment-share must be between 0 and 1 (exclusive)")
    ratio = treatment_share / (1 - treatment_share)
    try:
        if baseline is not None:
            control = sample_size_proportions(baseline, mde, alpha=alpha, power=power, ratio=ratio)
            what = f"a rate of {baseline:g} -> {baseline + mde:g}"
        else:
            assert sd is not None
            control = sample_size_means(sd, mde, alpha=alpha, power=power, ratio=ratio)
            what = f"a mean change of {mde:g} with sd {sd:g}"
    except ValueError as exc:
        fail(str(exc))
    treatment = math.ceil(control * ratio)
    click.echo(f"to detect {what} at alpha {alpha:g} with power {power:.0%}:")
    click.echo(f"  control   {control:>8,} users")
    click.echo(f"  treatment {treatment:>8,} users")
    click.echo(f"  total     {control + treatment:>8,} users")
    if users_per_day:
        click.echo(f"  about {math.ceil((control + treatment) / users_per_day)} day(s) at {users_per_day:g} users/day")


@main.command()
@click.option("--base-url", default="http://127.0.0.1:8080/v1", show_default=True, help="The proxy's /v1 URL.")
@click.option("--model", default="sales-companion", show_default=True, help="Model alias to request.")
@click.option("--rps", default=5.0, show_default=True, help="Requests per second.")
@click.option("--users", default=500, show_default=True, help="Size of the simulated user pool.")
@click.option("--stream-share", default=0.3, show_default=True, help="Share of streaming requests (0..1).")
@click.option("--duration", default=0.0, show_default=True, help="Seconds to run; 0 = until interrupted.")
@click.option("--ramp", default="", help="Comma-separated rollout percents to walk through, e.g. 5,10,25,50.")
@click.option("--ramp-every", default=120.0, show_default=True, help="Seconds between ramp steps.")
@click.option("--admin-url", default=None, help="Proxy URL for the admin API [the --base-url host].")
@click.option("--experiment", default=None, help="Experiment to ramp [--model].")
@click.option("--feedback", is_flag=True,
              help="After each answer, post simulated outcomes to /v1/feedback (task_completed, csat, escalated), "
                   "the treatment truly better (proxy/traffic.py TRUTH).")
def traffic(
    base_url: str, model: str, rps: float, users: int, stream_share: float, duration: float,
    ramp: str, ramp_every: float, admin_url: str | None, experiment: str | None, feedback: bool,
) -> None:
    """Send simulated users' requests at a steady rate (and optionally ramp the rollout, and report outcomes)."""
    from proxy.traffic import TrafficPlan, run_traffic

    if rps <= 0 or users < 1 or not 0 <= stream_share <= 1:
        fail("--rps must be > 0, --users >= 1 and --stream-share within 0..1")
    try:
        percents = tuple(float(p) for p in ramp.split(",") if p.strip())
    except ValueError:
        fail(f"--ramp must be comma-separated numbers, got {ramp!r}")
    token = os.environ.get("ABPROXY_ADMIN_TOKEN")
    if percents and not token:
        fail("--ramp changes the rollout through the admin API: set ABPROXY_ADMIN_TOKEN")
    plan = TrafficPlan(
        base_url=base_url, model=model, rps=rps, users=users, stream_share=stream_share, duration_s=duration,
        ramp=percents, ramp_every_s=ramp_every, admin_url=admin_url or base_url.removesuffix("/v1"),
        admin_token=token, experiment=experiment, feedback=feedback,
    )
    try:
        stats = asyncio.run(run_traffic(plan, lambda line: click.echo(line, err=True)))
    except KeyboardInterrupt:
        return
    click.echo(stats.summary())


# -- humaneval: blind human comparison of the models' answers --------------------------------
@main.group("humaneval")
def humaneval() -> None:
    """Blind human comparison: import answer pairs, build studies, hand out evaluators' links."""






def _import_pairs(engine: Engine, file: str, source: str | None) -> ImportResult:
    """Import FILE and print what happened; exits 2 when nothing in it could be used."""
    import time

    from proxy.humaneval.studies import import_jsonl

    try:
        result = import_jsonl(engine, file, source=source, now=time.time())
    except ValueError as exc:
        fail(str(exc))
    if not result.parsed:
        first = f": line {result.errors[0][0]}: {result.errors[0][1]}" if result.errors else ""
        fail(f"no valid comparison in {file} ({len(result.errors)} line(s) with errors{first})")
    click.echo(f"imported {file} as {result.source}: {result.added} added, {result.duplicates} duplicate(s), "
               f"{len(result.flagged)} flagged, {len(result.errors)} error(s)")  # fmt: skip
    if result.flagged:
        click.echo("flagged (an answer may give its model away; studies leave these out):")
        for cid, reason in result.flagged:
            click.echo(f"  {cid}: {reason}")
    if result.errors:
        click.echo("errors (lines skipped):")
        for line, message in result.errors:
            click.echo(f"  line {line}: {message}")
    return result


@humaneval.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--source", default=None, help="Name the comparisons' source [import:<file name>].")
@config_option
@store_option
def humaneval_import(file: str, source: str | None, config: str | None, store_url: str | None) -> None:
    """Store FILE's comparisons (JSONL: {prompt, responses: {model: text, ...}} per line); repeats add nothing."""
    from sqlalchemy.exc import SQLAlchemyError

    from proxy.store.collector import error_line

    engine = migrated_store(config, store_url)
    try:
        _import_pairs(engine, file, source)
    except SQLAlchemyError as exc:
        fail(f"import failed: {error_line(exc)}")
    finally:
        engine.dispose()


@humaneval.command("create-study")
@click.argument("name")
@click.option("--from", "from_file", default=None, type=click.Path(dir_okay=False),
              help="Import this JSONL file first and draw only from its comparisons [every stored comparison].")
@click.option("--evaluators", required=True, help="Comma-separated evaluator names, e.g. ann,bob,cy.")
@click.option("--per-evaluator", type=int, default=40, show_default=True, help="Tasks in each evaluator's list.")
@click.option("--overlap", type=float, default=0.2, show_default=True,
              help="At least this share of the comparisons used goes to two or more evaluators.")
@click.option("--rubric", "rubric_file", default=None, type=click.Path(dir_okay=False), help="Rubric YAML file.")
@click.option("--models", default=None, help="Compare these two, e.g. base,finetuned [each comparison's models].")
@click.option("--seed", type=int, default=None, help="Seed of the assignment [random, and printed].")
@base_url_option
@config_option
@store_option
def humaneval_create_study(
    name: str, from_file: str | None, evaluators: str, per_evaluator: int, overlap: float, rubric_file: str | None,
    models: str | None, seed: int | None, base_url: str, config: str | None, store_url: str | None,
) -> None:
    """Build study NAME: a blind task list per evaluator, and each evaluator's personal link."""
    import time

    from sqlalchemy.exc import SQLAlchemyError

    from proxy.humaneval.studies import create_study
    from proxy.store.collector import error_line

    names, pair, rubric, seed = study_arguments(evaluators, models, rubric_file, seed)
    engine = migrated_store(config, store_url)
    try:
        source = _import_pairs(engine, from_file, None).source if from_file else None
        created = create_study(engine, name, evaluators=names, per_evaluator=per_evaluator, overlap=overlap,
                               models=pair, rubric=rubric, seed=seed, source=source, now=time.time())  # fmt: skip
    except ValueError as exc:
        fail(f"cannot create study {name!r}: {exc}")
    except SQLAlchemyError as exc:
        fail(f"cannot create study {name!r}: {error_line(exc)}")
    finally:
        engine.dispose()
    print_study(created, per_evaluator, overlap, seed, base_url)



@humaneval.command("link")
@click.argument("study")
@click.argument("evaluator")
@base_url_option
@config_option
@store_option
def humaneval_link(study: str, evaluator: str, base_url: str, config: str | None, store_url: str | None) -> None:
    """A new personal link for EVALUATOR; their previous link stops working, a revoked one is reopened."""
    from proxy.humaneval.studies import new_link

    engine = migrated_store(config, store_url)
    try:
        token = new_link(engine, study, evaluator)
    except KeyError:
        fail(f"no evaluator {evaluator!r} in study {study!r}")
    finally:
        engine.dispose()
    click.echo(f"{study} / {evaluator}: {eval_link(base_url, token)}")
    click.echo("shown once: the store keeps only a hash; the previous link no longer works")


@humaneval.command("revoke")
@click.argument("study")
@click.argument("evaluator")
@config_option
@store_option
def humaneval_revoke(study: str, evaluator: str, config: str | None, store_url: str | None) -> None:
    """Close EVALUATOR's link (their votes stay); `humaneval link` opens a new one."""
    import time

    from proxy.humaneval.studies import get_study, revoke

    engine = migrated_store(config, store_url)
    try:
        if revoke(engine, study, evaluator, now=time.time()):
            click.echo(f"{study} / {evaluator}: link revoked")
            return
        summary = get_study(engine, study)
    finally:
        engine.dispose()
    if summary is None:
        fail(f"no study named {study!r}")
    if not any(e.name == evaluator for e in summary.evaluators):
        fail(f"no evaluator {evaluator!r} in study {study!r}")
    click.echo(f"{study} / {evaluator}: link already revoked")


@humaneval.command("report")
@click.argument("study")
@click.option("--format", "fmt", default="table", show_default=True,
              type=click.Choice(["table", "markdown", "json", "csv"]))
@click.option("--bootstrap", default=1000, show_default=True, help="Bootstrap rounds for the rating intervals.")
@click.option("--judge", default=None, help="Show this automatic judge's votes [the only judge, if one voted].")
@config_option
@store_option
def humaneval_report(
    study: str, fmt: str, bootstrap: int, judge: str | None, config: str | None, store_url: str | None
) -> None:
    """A study's ratings (Elo, Bradley-Terry with intervals), win rates, rubric results and agreement."""

    from proxy.humaneval.render import to_csv, to_markdown, to_table
    from proxy.humaneval.report import study_report, to_json

    if bootstrap < 0:
        fail("--bootstrap must be >= 0")
    engine = migrated_store(config, store_url)
    try:
        result = study_report(engine, study, bootstrap=bootstrap, judge=judge)
    except KeyError:
        fail(f"no study named {study!r}")
    finally:
        engine.dispose()
    print_report(fmt, result, to_json, to_markdown, to_csv, to_table)


@humaneval.command("judge")
@click.argument("study")
@click.option("--model", "model", required=True, help="The judge: a model name from the config.")
@click.option("--concurrency", type=click.IntRange(min=1), default=4, show_default=True, help="Calls in flight.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=400, show_default=True, help="Per answer.")
@config_option
@store_option
def humaneval_judge(
    study: str, model: str, concurrency: int, max_tokens: int, config: str | None, store_url: str | None
) -> None:
    """Have MODEL vote on STUDY's blind pairs, both orders each; a rerun asks only what is not stored yet."""
    import time

    from rich.progress import Progress

    from proxy.humaneval.judge import run_judge

    _, settings = load_config(config)  # with the upstream keys: the judge is called through its upstream
    if model not in settings.models:
        fail(f"no model named {model!r} in the config (models: {', '.join(sorted(settings.models))})")
    engine = migrated_store(config, store_url)
    try:
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"judging {study} with {model}", total=None)
            done = asyncio.run(run_judge(
                engine, settings, study, model, concurrency=concurrency, max_tokens=max_tokens, now=time.time,
                progress=lambda n, total: bar.update(task, completed=n, total=total),
            ))  # fmt: skip
    except ValueError as exc:
        fail(str(exc))
    finally:
        engine.dispose()
    click.echo(f"judge {model} on {study}: {done.asked} asked, {done.stored} stored, "
               f"{done.skipped_existing} already stored, {done.failed} failed; cost ${done.cost_usd:.4f}")  # fmt: skip
    if done.first_error:
        click.echo(f"first error: {done.first_error}")


@humaneval.command("studies")
@config_option
@store_option
def humaneval_studies(config: str | None, store_url: str | None) -> None:
    """Studies, newest first, with each evaluator's progress."""
    from datetime import UTC, datetime

    from proxy.humaneval.studies import list_studies

    def when(ts: float | None) -> str:
        return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")

    engine = migrated_store(config, store_url)
    try:
        found = list_studies(engine)
    finally:
        engine.dispose()
    if not found:
        click.echo("no studies yet: abproxy humaneval create-study NAME --from FILE --evaluators a,b")
        return
    table = Table("study", "created (UTC)", "models", "comparisons", "evaluator", "progress", "last vote", "link")
    for study in found:
        for i, e in enumerate(study.evaluators):
            head = [study.name, when(study.created_at), " vs ".join(study.models), str(study.comparisons)]
            add_row(table, *(head if i == 0 else ["", "", "", ""]), e.name, f"{e.voted}/{e.total}",
                          when(e.last_vote_at), "revoked" if e.revoked else "open")  # fmt: skip
    console.print(table)


@humaneval.command("serve")
@config_option
@store_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address.")
@click.option("--port", type=int, default=8080, show_default=True, help="Port.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def humaneval_serve(config: str | None, store_url: str | None, host: str, port: int, log_level: str) -> None:
    """Serve the evaluators' pages (/eval/s/...) and the study admin (/eval/admin) without the proxy.

    The admin token is ABPROXY_ADMIN_TOKEN (through the config when one is given); without it the admin
    pages answer 403.
    """
    import uvicorn

    from proxy.app import create_eval_app
    from proxy.logs import configure_logging

    if store_url is None and config is None:
        fail("give --store URL, or --config FILE (its store.url) [env ABPROXY_CONFIG]")
    settings = None if store_url is not None and config is None else load_config(config, upstream_keys=False)[1]
    url = store_url or (settings.store.url if settings else "")
    admin_token = settings.admin_token if settings else os.environ.get("ABPROXY_ADMIN_TOKEN") or None
    migrated_store(None, url).dispose()  # migrated before the first page, so a page never meets a missing table
    configure_logging(log_level)
    try:
        app = create_eval_app(url, admin_token=admin_token)
    except ValueError as exc:
        fail(f"config error: store.url: {exc}")
    # No access log: an evaluator's secret is in the path of every request they make.
    uvicorn.run(app, host=host, port=port, access_log=False, server_header=False, log_level=log_level)


if __name__ == "__main__":
    main()

