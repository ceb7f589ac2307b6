"""What the CLI's commands share: the console, failing with one line, the config, the store, report output."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

from proxy.config import ConfigError, Settings, config_path, load_settings
from proxy.untrusted_text import terminal_text

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from proxy.humaneval.rubric import Rubric
    from proxy.humaneval.studies import CreatedStudy

# Piped output (scripts, CI logs) gets wide tables instead of truncated cells.
console = Console(width=None if sys.stdout.isatty() else 200)


def fail(message: str) -> NoReturn:
    click.echo(message, err=True)
    sys.exit(2)


def load_config(config: str | None, *, upstream_keys: bool = True) -> tuple[str, Settings]:
    try:
        path = config_path(config)
        return path, load_settings(path, upstream_keys=upstream_keys)
    except ConfigError as exc:
        fail(str(exc))


store_option = click.option(
    "--store", "store_url", default=None, help="Store URL [env ABPROXY_STORE_URL, config store.url]."
)


def store_engine(url: str) -> Engine:
    from proxy.store.db import engine_for

    try:
        return engine_for(url)
    except ValueError as exc:
        fail(f"config error: store.url: {exc}")


def migrate_store(engine: Engine) -> str | None:
    """Upgrade the store to the newest revision; returns it."""
    import logging

    from sqlalchemy.exc import SQLAlchemyError

    from proxy.store.collector import error_line
    from proxy.store.db import current_revision, migrate

    # Alembic narrates each step in plain text; stderr carries JSON lines, and the revision
    # reached is logged (or printed) once by the caller instead.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        migrate(engine)
        return current_revision(engine)
    except SQLAlchemyError as exc:
        engine.dispose()
        shown = engine.url.render_as_string(hide_password=True)
        fail(f"cannot migrate the store at {shown}: {error_line(exc)}")


def print_report(
    fmt: str, result: Any, to_json: Callable[[Any], Any], to_markdown: Callable[[Any], str],
    to_csv: Callable[[Any], str], to_table: Callable[[Any, Console], None],
) -> None:
    """One report in the chosen --format: the experiment report and the study report share this."""
    import orjson

    if fmt == "json":
        click.echo(orjson.dumps(to_json(result), option=orjson.OPT_INDENT_2).decode())
    elif fmt == "markdown":
        click.echo(to_markdown(result), nl=False)
    elif fmt == "csv":
        click.echo(to_csv(result), nl=False)
    else:
        to_table(result, console)


config_option = click.option(
    "--config", "config", envvar="ABPROXY_CONFIG", help="YAML config file [env ABPROXY_CONFIG]."
)
base_url_option = click.option("--base-url", default="http://127.0.0.1:8080", show_default=True,
                         help="Where evaluators reach the proxy (or `abproxy humaneval serve`).")


def migrated_store(config: str | None, store_url: str | None) -> Engine:
    """The migrated store; with --store no config file is read, as for `store migrate`."""
    if store_url is None:
        store_url = load_config(config, upstream_keys=False)[1].store.url
    engine = store_engine(store_url)
    migrate_store(engine)
    return engine


def eval_link(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/eval/s/{token}"


def print_study(created: CreatedStudy, per_evaluator: int, overlap: float, seed: int, base_url: str) -> None:
    """What a new study holds, and its evaluators' links: `humaneval create-study` and `eval to-study`."""
    name = created.name
    flagged = f" ({created.excluded_flagged} flagged left out)" if created.excluded_flagged else ""
    click.echo(f"study {name}: {len(created.links)} evaluator(s) x {per_evaluator} tasks, {created.comparisons} "
               f"comparisons{flagged}, seed {seed}")  # fmt: skip
    click.echo(f"overlap: {created.overlap_share:.1%} of the comparisons go to two or more evaluators "
               f"(asked at least {overlap:.1%})")  # fmt: skip
    click.echo("personal links (shown once: the store keeps only a hash of each; "
               f"`abproxy humaneval link {name} EVALUATOR` makes a new one):")  # fmt: skip
    width = max(len(e) for e in created.links)
    for evaluator, token in created.links.items():
        click.echo(f"  {evaluator:<{width}}  {eval_link(base_url, token)}")


def study_arguments(
    evaluators: str, models: str | None, rubric_file: str | None, seed: int | None
) -> tuple[list[str], tuple[str, str] | None, Rubric | None, int]:
    """--evaluators, --models, --rubric and --seed of a command that builds a study, checked."""
    import secrets

    from proxy.humaneval.rubric import load_rubric

    names = [e.strip() for e in evaluators.split(",") if e.strip()]
    pair: tuple[str, str] | None = None
    if models is not None:
        given = [m.strip() for m in models.split(",")]
        if len(given) != 2 or not all(given):
            fail(f"--models needs two comma-separated model names, got {models!r}")
        pair = (given[0], given[1])
    try:
        rubric = load_rubric(rubric_file) if rubric_file else None
    except ValueError as exc:
        fail(str(exc))
    # A recorded random seed: two studies differ, and either can be rebuilt.
    return names, pair, rubric, secrets.randbelow(2**31) if seed is None else seed


def add_row(table: Table, *cells: str) -> None:
    """A table row of plain text: reasons, actors and names come from Redis, the store or a file,
    and must never be read as rich markup (a crash) or reach the terminal as control sequences."""
    table.add_row(*(terminal_text(cell) for cell in cells))
