"""`abproxy eval`: offline evaluation of models on a held-out test set (run, report, compare, to-study, runs)."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click
import orjson

from proxy.cli_common import (
    add_row,
    base_url_option,
    config_option,
    console,
    fail,
    load_config,
    migrated_store,
    print_report,
    print_study,
    store_option,
    study_arguments,
)

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from proxy.offline_eval.runs import Run

FORMATS = ["table", "markdown", "json", "html"]


@click.group("eval")
def eval_group() -> None:
    """Offline evaluation: a held-out test set through the models, compared with paired tests."""


def _load_run(engine: Engine, run_id: str) -> Run:
    from proxy.offline_eval.runs import load_run

    run = load_run(engine, run_id)
    if run is None:
        engine.dispose()
        fail(f"no evaluation run named {run_id!r} (list them: abproxy eval runs)")
    return run


@eval_group.command("run")
@click.option("--test-file", required=True, type=click.Path(dir_okay=False),
              help="OpenAI fine-tuning chat JSONL: the last message of each line is the expected answer.")
@click.option("--model", "models", multiple=True, required=True,
              help="A model name from the config; repeat it. The first is the baseline, e.g. --model base "
                   "--model finetuned.")  # fmt: skip
@click.option("--system-prompt", default=None, help="Every example's system message (replaces the file's own).")
@click.option("--concurrency", type=click.IntRange(min=1), default=16, show_default=True, help="Calls in flight.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True, help="Per answer.")
@click.option("--check", "check_file", default=None, type=click.Path(dir_okay=False),
              help="Format checks YAML (line_regex, regex, json_schema, entry_point).")
@click.option("--casefold", is_flag=True, help="Exact match and similarity ignore case.")
@click.option("--retries", type=click.IntRange(min=0), default=3, show_default=True,
              help="Retries of a 429, 5xx or transport failure (Retry-After honoured).")
@click.option("--run", "run_id", default=None,
              help="Name the run [<test file>-<hash of the inputs>: the same command resumes the same run].")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Also write <out>/<run>/ results.jsonl and report.{md,json,html}.")
@click.option("--format", "fmt", default="table", show_default=True, type=click.Choice(FORMATS),
              help="How to print the report at the end.")
@config_option
@store_option
def eval_run(
    test_file: str, models: tuple[str, ...], system_prompt: str | None, concurrency: int, max_tokens: int,
    check_file: str | None, casefold: bool, retries: int, run_id: str | None, out_dir: str | None, fmt: str,
    config: str | None, store_url: str | None,
) -> None:  # fmt: skip
    """Ask every model every example at temperature 0, store each answer as it arrives, print the comparison.

    Interrupted, the same command resumes: answered examples are not asked again.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from proxy.offline_eval.checks import CheckFileError, load_checks
    from proxy.offline_eval.runner import model_specs, run_eval
    from proxy.offline_eval.runs import Scoring, default_run_id
    from proxy.offline_eval.testset import TestFileError, load_test_set

    _, settings = load_config(config)  # with the upstream keys: models are called through their upstreams
    try:
        specs = model_specs(settings, models)
        test = load_test_set(test_file, system_prompt=system_prompt)
        checks = load_checks(check_file) if check_file else None
    except (ValueError, TestFileError, CheckFileError) as exc:
        fail(str(exc))
    run_id = run_id or default_run_id(test, specs, system_prompt, max_tokens)
    engine = migrated_store(config, store_url)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(f"{run_id}: {' vs '.join(models)}", total=None)
            outcome = asyncio.run(run_eval(
                engine, settings, test, specs, run_id=run_id, scoring=Scoring(casefold, checks),
                system_prompt=system_prompt, max_tokens=max_tokens, concurrency=concurrency, retries=retries,
                progress=lambda n, total: bar.update(task, completed=n, total=total),
            ))  # fmt: skip
    except ValueError as exc:
        engine.dispose()
        fail(str(exc))
    except KeyboardInterrupt:
        engine.dispose()
        click.echo(f"interrupted: the answers so far are stored in run {run_id}; run the same command again "
                   "to resume", err=True)  # fmt: skip
        sys.exit(130)
    click.echo(f"run {run_id}: {outcome.answered} answered now, {outcome.skipped_existing} stored before, "
               f"{outcome.failed} failed; {outcome.retries} retries; cost ${outcome.cost_usd:.4f}"
               + (f"; {outcome.rescored} stored answers rescored with the new scoring" if outcome.rescored else ""),
               err=True)  # fmt: skip
    run = _load_run(engine, run_id)
    engine.dispose()
    _show(run, fmt)
    if out_dir:
        written = _export(run, Path(out_dir))
        click.echo(f"wrote {written}/", err=True)
    if outcome.failed:
        fail(f"{outcome.failed} call(s) failed (first: {outcome.first_error}); run the same command again to "
              "retry them")  # fmt: skip


def _show(run: Run, fmt: str) -> None:
    from proxy.offline_eval.report import run_report

    _print_eval(run_report(run), fmt)


def _print_eval(report: object, fmt: str) -> None:
    from proxy.offline_eval.render import to_html, to_markdown, to_table
    from proxy.offline_eval.report import to_json

    if fmt == "html":
        click.echo(to_html(report), nl=False)  # type: ignore[arg-type]
        return
    print_report(fmt, report, to_json, to_markdown, to_markdown, to_table)


def _export(run: Run, out_dir: Path) -> Path:
    """<out>/<run>/: every answer as JSON lines, and the report as Markdown, JSON and HTML."""
    from proxy.offline_eval.render import to_html, to_markdown
    from proxy.offline_eval.report import run_report, to_json

    target = out_dir / run.id
    target.mkdir(parents=True, exist_ok=True)
    examples = {e.id: e for e in run.examples}
    with (target / "results.jsonl").open("wb") as out:
        for model, results in run.results.items():
            for example_id, r in sorted(results.items(), key=lambda kv: examples[kv[0]].position):
                out.write(orjson.dumps({
                    "run": run.id, "model": model, "example_id": example_id, "line": examples[example_id].line,
                    "expected": examples[example_id].expected, "prediction": r.prediction, "exact": r.exact,
                    "format_ok": r.format_ok, "format_failures": r.format_failures, "similarity": r.similarity,
                    "latency_ms": r.latency_ms, "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens, "cost_usd": r.cost_usd, "attempts": r.attempts,
                    "finish_reason": r.finish_reason,
                }) + b"\n")  # fmt: skip
    report = run_report(run)
    (target / "report.md").write_text(to_markdown(report))
    (target / "report.json").write_bytes(orjson.dumps(to_json(report), option=orjson.OPT_INDENT_2))
    (target / "report.html").write_text(to_html(report))
    return target


@eval_group.command("report")
@click.argument("run_id", metavar="RUN")
@click.option("--format", "fmt", default="table", show_default=True, type=click.Choice(FORMATS))
@config_option
@store_option
def eval_report(run_id: str, fmt: str, config: str | None, store_url: str | None) -> None:
    """A run's per-model figures and the paired comparison with the baseline, regressions first."""
    engine = migrated_store(config, store_url)
    run = _load_run(engine, run_id)
    engine.dispose()
    _show(run, fmt)


@eval_group.command("compare")
@click.argument("run_a", metavar="RUN_A")
@click.argument("run_b", metavar="RUN_B")
@click.option("--model-a", default=None, help="RUN_A's model [its last: the candidate it evaluated].")
@click.option("--model-b", default=None, help="RUN_B's model [its last].")
@click.option("--format", "fmt", default="table", show_default=True, type=click.Choice(FORMATS))
@config_option
@store_option
def eval_compare(
    run_a: str, run_b: str, model_a: str | None, model_b: str | None, fmt: str, config: str | None,
    store_url: str | None,
) -> None:  # fmt: skip
    """Two runs (two training runs, say) on the examples they share: RUN_A's model is the baseline."""
    from proxy.offline_eval.report import compare_runs

    engine = migrated_store(config, store_url)
    first, second = _load_run(engine, run_a), _load_run(engine, run_b)
    engine.dispose()
    try:
        report = compare_runs(first, model_a or first.models[-1].name, second, model_b or second.models[-1].name)
    except ValueError as exc:
        fail(str(exc))
    _print_eval(report, fmt)


@eval_group.command("to-study")
@click.argument("run_id", metavar="RUN")
@click.option("--evaluators", required=True, help="Comma-separated evaluator names, e.g. ann,bob,cy.")
@click.option("--sample", type=click.IntRange(min=1), default=50, show_default=True,
              help="Examples drawn at random (seeded) from those the two models answered differently.")
@click.option("--name", default=None, help="The study's name [eval-<run>].")
@click.option("--models", default=None, help="The two models to compare [the run's baseline and first candidate].")
@click.option("--per-evaluator", type=click.IntRange(min=1), default=None, help="Tasks per evaluator [the sample].")
@click.option("--overlap", type=float, default=0.2, show_default=True,
              help="At least this share of the comparisons goes to two or more evaluators.")
@click.option("--rubric", "rubric_file", default=None, type=click.Path(dir_okay=False), help="Rubric YAML file.")
@click.option("--seed", type=int, default=None, help="Seed of the sample and the assignment [random, printed].")
@click.option("--include-identical", is_flag=True, help="Keep examples both models answered with the same text.")
@base_url_option
@config_option
@store_option
def eval_to_study(
    run_id: str, evaluators: str, sample: int, name: str | None, models: str | None, per_evaluator: int | None,
    overlap: float, rubric_file: str | None, seed: int | None, include_identical: bool, base_url: str,
    config: str | None, store_url: str | None,
) -> None:  # fmt: skip
    """Turn RUN into a blind human-comparison study, and print each evaluator's link."""
    from sqlalchemy.exc import SQLAlchemyError

    from proxy.offline_eval.to_study import study_from_run
    from proxy.store.collector import error_line

    names, pair, rubric, seed = study_arguments(evaluators, models, rubric_file, seed)
    study = name or "eval-" + re.sub(r"[^A-Za-z0-9_.@-]", "-", run_id)[:123]
    engine = migrated_store(config, store_url)
    try:
        run = _load_run(engine, run_id)
        made = study_from_run(engine, run, study, evaluators=names, sample=sample, seed=seed, models=pair,
                              per_evaluator=per_evaluator, overlap=overlap, rubric=rubric,
                              include_identical=include_identical, now=time.time())  # fmt: skip
    except ValueError as exc:
        fail(f"cannot create study {study!r}: {exc}")
    except SQLAlchemyError as exc:
        fail(f"cannot create study {study!r}: {error_line(exc)}")
    finally:
        engine.dispose()
    identical = f", {made.identical} answered identically left out" if made.identical and not include_identical else ""
    click.echo(f"from run {run_id}: {made.sampled} of {made.eligible} examples sampled ({' vs '.join(made.models)}"
               f"{identical})")  # fmt: skip
    print_study(made.study, per_evaluator or made.study.comparisons, overlap, seed, base_url)


@eval_group.command("runs")
@config_option
@store_option
def eval_runs(config: str | None, store_url: str | None) -> None:
    """Stored evaluation runs, newest first."""
    from datetime import UTC, datetime

    from rich.table import Table

    from proxy.offline_eval.runs import list_runs

    engine = migrated_store(config, store_url)
    try:
        found = list_runs(engine)
    finally:
        engine.dispose()
    if not found:
        click.echo("no evaluation runs yet: abproxy eval run --test-file FILE --model base --model finetuned")
        return
    table = Table("run", "created (UTC)", "test file", "models (baseline first)", "answers")
    for r in found:
        when = datetime.fromtimestamp(r.created_at, UTC).strftime("%Y-%m-%d %H:%M")
        add_row(table, r.id, when, r.test_file, ", ".join(f"{m.name} ({m.model})" for m in r.models),
                      f"{r.answered}/{r.examples * len(r.models)}")  # fmt: skip
    console.print(table)
