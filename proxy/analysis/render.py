"""A Report as JSON (the admin API's body), a terminal table, Markdown, or CSV rows.

JSON is the reference form: the other three are views of it, so they can never disagree.
Numbers that do not exist (an interval with no spread, a hidden p-value) are null, never NaN.
"""

from __future__ import annotations

import csv
import io
import math
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from proxy.analysis.report import MetricResult, Report
from proxy.jsonable import dataclass_json, finite

FORMATS = ("table", "markdown", "json", "csv")
_DECISION_STYLE = {"ship": "bold green", "roll_back": "bold red", "untrustworthy": "bold red"}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def to_json(report: Report) -> dict[str, Any]:
    body = dataclass_json(report)
    body["window"] = {"since": _iso(report.since), "until": _iso(report.until),
                      "days": round((report.until - report.since) / 86400, 3)}
    body["generated_at"] = _iso(report.generated_at)
    for key in ("since", "until"):
        body.pop(key)
    return body


def _num(value: float | None, kind: str = "mean") -> str:
    if value is None or not math.isfinite(value):
        return "—"
    if kind == "rate":
        return f"{value:.1%}"
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"


def _pct(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:+.1%}"


def _interval(pair: tuple[float, float] | list[float] | None, fmt: Any = _pct) -> str:
    if pair is None or any(v is None or not math.isfinite(v) for v in pair):
        return "—"
    return f"({fmt(pair[0])}, {fmt(pair[1])})"


def _p(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.2g}" if value >= 0.0001 else "<0.0001"


def _metric_cells(m: MetricResult) -> list[str]:
    name = m.label + ("" if m.higher_is_better else " (lower is better)")
    if m.role == "primary":
        name += " [primary]"
    significant = "yes" if m.significant else "no"
    if m.significant:
        significant += " (better)" if m.better else " (worse)"
    lift = f"{_pct(m.lift)} {_interval(m.lift_ci)}" if m.lift is not None else _num(m.diff, m.kind)
    return [
        name,
        f"{_num(m.control.value, m.kind)} (n={m.control.users})",
        f"{_num(m.treatment.value, m.kind)} (n={m.treatment.users})",
        lift,
        _p(m.p_value),
        _p(m.sequential_p),
        _p(m.adjusted_p) if m.role != "primary" else "",
        significant,
    ]


METRIC_COLUMNS = ["metric", "control", "treatment", "lift (95% CI)", "p (fixed)", "p (always valid)", "p (Holm)",
                  "significant?"]
GUARDRAIL_COLUMNS = ["guardrail", "control", "treatment", "change", "bound", "margin", "status"]


def _guardrail_rows(report: Report) -> list[list[str]]:
    rows = []
    for g in report.guardrails:
        change = _pct(g.ratio - 1) if g.ratio is not None else _num(g.diff)
        rows.append([g.name, _num(g.control), _num(g.treatment), change, _num(g.bound), _num(g.margin), g.status])
    return rows


def _header_lines(report: Report) -> list[str]:
    c, t = report.arms["control"], report.arms["treatment"]
    srm = report.srm
    srm_text = (f"MISMATCH (p = {_p(srm.p_value)}): results untrustworthy" if srm.mismatch
                else f"ok (p = {_p(srm.p_value)})")
    plan = report.plan
    lines = [
        f"window {_iso(report.since)} .. {_iso(report.until)}",
        f"control {c.model}: {c.users} users, {c.requests} requests; "
        f"treatment {t.model}: {t.users} users, {t.requests} requests",
        f"sample ratio: expected {srm.expected[0]:.0f}/{srm.expected[1]:.0f}, observed "
        f"{srm.observed[0]}/{srm.observed[1]}: {srm_text}",
    ]
    if report.unidentified_requests or report.crossover_users:
        lines.append(f"left out: {report.unidentified_requests} requests without a user id; "
                     f"{report.crossover_users} users who changed variant when the rollout moved "
                     "(analysed in their first variant)")
    if plan.planned_users_per_variant is not None:
        need = plan.planned_users_per_variant
        status = "reached" if plan.reached else f"about {math.ceil(plan.days_left or 0)} day(s) left"
        power = f", power now {plan.current_power:.0%}" if plan.current_power is not None else ""
        lines.append(f"plan: {need[0]}/{need[1]} users per variant ({plan.planned_from}){power}: {status}")
    else:
        lines.append("plan: no pre-registered sample size (set analysis.planned_users_per_variant or analysis.mde); "
                     "fixed-horizon p-values stay hidden")
    if report.cost_per_success is not None:
        cps = report.cost_per_success
        # Per thousand: a task costs fractions of a cent, unreadable as $1.6e-05.
        lines.append(f"{cps.label}, per 1,000: control ${_num(1000 * cps.control.value)}, treatment "
                     f"${_num(1000 * cps.treatment.value)} ({_pct(cps.lift)} {_interval(cps.lift_ci)})")
    return lines


def to_table(report: Report, console: Console) -> None:
    console.print(f"[bold]{report.experiment}[/bold]")
    for line in _header_lines(report):
        console.print(line, highlight=False)
    table = Table(*METRIC_COLUMNS, title="outcomes", title_justify="left")
    for m in report.metrics:
        table.add_row(*_metric_cells(m))
    console.print(table)
    if report.guardrails:
        guard = Table(*GUARDRAIL_COLUMNS, title="guardrails (non-inferiority)", title_justify="left")
        for row in _guardrail_rows(report):
            guard.add_row(*row)
        console.print(guard)
    style = _DECISION_STYLE.get(report.verdict.decision, "bold yellow")
    console.print(f"[{style}]verdict: {report.verdict.decision}[/{style}] {report.verdict.summary}", highlight=False)
    for reason in report.verdict.reasons:
        console.print(f"  - {reason}", highlight=False)


def _markdown_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def to_markdown(report: Report) -> str:
    lines = [f"## {report.experiment}", ""]
    lines += [f"- {line}" for line in _header_lines(report)]
    lines += ["", *_markdown_table(METRIC_COLUMNS, [_metric_cells(m) for m in report.metrics])]
    if report.guardrails:
        lines += ["", *_markdown_table(GUARDRAIL_COLUMNS, _guardrail_rows(report))]
    lines += ["", f"**Verdict: {report.verdict.decision}.** {report.verdict.summary}"]
    lines += [f"- {reason}" for reason in report.verdict.reasons]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ["section", "name", "role", "control", "treatment", "control_users", "treatment_users", "diff",
               "diff_low", "diff_high", "lift", "lift_low", "lift_high", "p_value", "sequential_p", "adjusted_p",
               "significant", "status", "method"]


def to_csv(report: Report) -> str:
    """One row per metric and guardrail, raw numbers (no formatting), for spreadsheets."""
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS)
    writer.writeheader()
    for m in report.metrics + ([report.cost_per_success] if report.cost_per_success else []):
        lift_ci = m.lift_ci or (None, None)
        writer.writerow(finite({
            "section": "metric", "name": m.name, "role": m.role, "control": m.control.value,
            "treatment": m.treatment.value, "control_users": m.control.users, "treatment_users": m.treatment.users,
            "diff": m.diff, "diff_low": m.diff_ci[0], "diff_high": m.diff_ci[1], "lift": m.lift,
            "lift_low": lift_ci[0], "lift_high": lift_ci[1], "p_value": m.p_value, "sequential_p": m.sequential_p,
            "adjusted_p": m.adjusted_p, "significant": m.significant, "status": "", "method": m.method,
        }))
    for g in report.guardrails:
        writer.writerow(finite({
            "section": "guardrail", "name": g.name, "role": "guardrail", "control": g.control,
            "treatment": g.treatment, "diff": g.diff, "lift": None if g.ratio is None else g.ratio - 1,
            "status": g.status, "method": g.method,
        }))
    return out.getvalue()
