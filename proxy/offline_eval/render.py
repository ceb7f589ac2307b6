"""An EvalReport as a terminal table, Markdown or a self-contained HTML page (JSON is `report.to_json`).

The terminal and Markdown views share `sections`; long answers are cut there and shown whole in the
HTML page and the JSON. Every text in the page is escaped by Jinja2's autoescape: answers are model
output, and model output may be HTML.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

from jinja2 import Environment, PackageLoader, select_autoescape
from rich.console import Console
from rich.table import Table

from proxy.offline_eval.paired import PairedRates, PairedScores
from proxy.offline_eval.report import Comparison, EvalReport, ExampleChange, ModelSummary
from proxy.untrusted_text import terminal_text

Section = tuple[str, list[str], list[list[str]]]
# Changed examples listed in the terminal and Markdown views: regressions are what a reader must see.
SHOWN = {"regressed": 20, "improved": 5}
_CUT = 70


def _pct(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.1%}"


def _num(value: float | None, fmt: str = "{:.3f}") -> str:
    return "—" if value is None or math.isnan(value) else fmt.format(value)


def _p(value: float) -> str:
    return f"{value:.2g}" if value >= 0.0001 else "<0.0001"


def _signed(value: float, percent: bool) -> str:
    if math.isnan(value):
        return "—"
    return f"{value * 100:+.1f} pp" if percent else f"{value:+.3f}"


def _diff(test: PairedRates | PairedScores, percent: bool) -> str:
    if math.isnan(test.diff):
        return "—"
    return f"{_signed(test.diff, percent)} ({_signed(test.ci_low, percent)}, {_signed(test.ci_high, percent)})"


def cut(text: str, width: int = _CUT) -> str:
    """One line: newlines shown as ⏎, cut to `width` characters."""
    flat = text.strip().replace("\r\n", "\n").replace("\n", " ⏎ ")
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def summary_lines(report: EvalReport) -> list[str]:
    lines = []
    for run in report.runs:
        when = datetime.fromtimestamp(run.created_at, UTC).strftime("%Y-%m-%d %H:%M UTC")
        checks = run.scoring.get("checks") or []
        case = "folded" if run.scoring.get("casefold") else "kept"
        lines.append(f"run {run.id} ({when}): {run.test_file}, {run.examples} examples, {run.answered}/"
                     f"{run.expected_answers} answers; max_tokens {run.max_tokens}; "
                     f"{len(checks)} format check(s); case {case}")  # fmt: skip
    for comparison in report.comparisons:
        lines.append(f"{comparison.candidate} vs {comparison.baseline} on {comparison.paired} paired examples: "
                     f"{comparison.verdict.replace('_', ' ')} (alpha {report.alpha:g}); "
                     f"{len(comparison.regressions)} example(s) regressed")  # fmt: skip
    return lines + report.notes


def sections(report: EvalReport) -> list[Section]:
    """(title, columns, rows) for every table, shared by the terminal and Markdown views."""
    out: list[Section] = [_models(report.models)]
    for comparison in report.comparisons:
        out.append(_comparison(comparison))
        for kind in ("regressed", "improved"):
            changes = [c for c in comparison.changes if c.change == kind]
            if changes:
                out.append(_changes(comparison, kind, changes))
    return out


def _models(models: list[ModelSummary]) -> Section:
    def row(name: str, values: list[str]) -> list[str]:
        return [name, *values]

    rows = [
        row("upstream model", [m.model for m in models]),
        row("answered", [f"{m.answered}/{m.examples}" for m in models]),
        row("exact match", [_pct(m.exact_rate) for m in models]),
        row("format ok", [_pct(m.format_rate) for m in models]),
        row("similarity mean", [_num(m.similarity_mean) for m in models]),
        row("similarity min", [_num(m.similarity_min) for m in models]),
        row("latency p50", [_num(m.latency_p50_ms, "{:.0f} ms") for m in models]),
        row("latency p95", [_num(m.latency_p95_ms, "{:.0f} ms") for m in models]),
        row("tokens per answer", [_num(m.tokens_per_answer, "{:.1f}") for m in models]),
        row("cost per example", [_num(m.cost_per_example, "${:.6f}") for m in models]),
        row("cut by max_tokens", [str(m.truncated) for m in models]),
    ]
    return "per model", ["", *(m.label for m in models)], rows


def _comparison(c: Comparison) -> Section:
    tests: list[tuple[str, PairedRates | PairedScores | None, bool]] = [
        ("exact match", c.exact, True), ("format ok", c.format, True), ("similarity", c.similarity, False),
    ]
    rows = []
    for name, test, percent in tests:
        if test is None:
            continue
        show = _pct if percent else _num
        base = test.base_rate if isinstance(test, PairedRates) else test.base_mean
        cand = test.candidate_rate if isinstance(test, PairedRates) else test.candidate_mean
        rows.append([name, show(base), show(cand), _diff(test, percent), _p(test.p_value), test.test,
                     f"{test.improved} / {test.regressed}"])  # fmt: skip
    title = f"{c.candidate} vs {c.baseline}, paired on {c.paired} examples: {c.verdict.replace('_', ' ')}"
    columns = ["metric", c.baseline, c.candidate, "difference (95% CI)", "p", "test", "better / worse"]
    return title, columns, rows


def _changes(c: Comparison, kind: str, changes: list[ExampleChange]) -> Section:
    shown = SHOWN[kind]
    more = f", first {shown} (all in --format json or html)" if len(changes) > shown else ""
    rows = [
        [str(ch.line), cut(ch.prompt, 40), cut(ch.expected, 40), cut(ch.baseline.prediction),
         cut(ch.candidate.prediction), _what(ch)]
        for ch in changes[:shown]
    ]  # fmt: skip
    title = f"{len(changes)} example(s) {kind} in {c.candidate}{more}"
    return title, ["line", "prompt", "expected", c.baseline, c.candidate, "what"], rows


def _what(change: ExampleChange) -> str:
    b, c = change.baseline, change.candidate
    parts = []
    if b.exact != c.exact:
        parts.append("lost exact match" if b.exact else "became exact")
    if b.format_ok is not None and c.format_ok is not None and b.format_ok != c.format_ok:
        parts.append(f"format broken: {', '.join(c.format_failures)}" if b.format_ok else "format fixed")
    parts.append(f"similarity {b.similarity:.2f} → {c.similarity:.2f}")
    return "; ".join(parts)


def to_table(report: EvalReport, console: Console) -> None:
    for line in summary_lines(report):
        console.print(line, highlight=False, markup=False)
    for title, columns, rows in sections(report):
        table = Table(*columns, title=title, title_justify="left")
        for row in rows:
            table.add_row(*(terminal_text(cell) for cell in row))
        console.print(table)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(report: EvalReport) -> str:
    title = "vs".join(f" {r.id} " for r in report.runs).strip()
    out = [f"# Offline evaluation: {title}", ""]
    out += [f"- {line}" for line in summary_lines(report)]
    for name, columns, rows in sections(report):
        out += ["", f"## {name}", "", "| " + " | ".join(map(_md_cell, columns)) + " |",
                "|" + "---|" * len(columns)]  # fmt: skip
        out += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
    return "\n".join(out) + "\n"


def to_html(report: EvalReport) -> str:
    env = Environment(loader=PackageLoader("proxy.offline_eval", "templates"), autoescape=select_autoescape(["html"]))
    template = env.get_template("report.html")
    # The page lists every changed example whole, so its tables are only the figures.
    tables = [_models(report.models), *(_comparison(c) for c in report.comparisons)]
    return template.render(report=report, lines=summary_lines(report), tables=tables, what=_what)
