"""A StudyReport as a terminal table, Markdown or CSV rows (JSON is `report.to_json`).

Model names come from an imported file or the config, and warnings quote them: they are written
through `proxy.untrusted_text`, so a name can neither drive the terminal nor run in a rendered report.
"""

from __future__ import annotations

import csv
import io

from rich.console import Console
from rich.table import Table

from proxy.humaneval.report import StudyReport
from proxy.untrusted_text import markdown_text, terminal_text


def _p(value: float | None) -> str:
    return "—" if value is None else f"{value:.2g}" if value >= 0.0001 else "<0.0001"


def _pct(value: float) -> str:
    return f"{value:.0%}"


def _ci(pair: tuple[float, float], fmt: str = "{:.0f}") -> str:
    return f"({fmt.format(pair[0])}, {fmt.format(pair[1])})"


def sections(report: StudyReport) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, columns, rows) for every table, shared by the terminal and Markdown views."""
    ratings_rows = [
        [r.model, f"{r.rating:.0f}", _ci(r.ci), f"{report.elo.get(r.model, float('nan')):.0f}",
         "{:.0f} ± {:.0f}".format(*report.elo_orderings[r.model][:2]) if r.model in report.elo_orderings else "—",
         str(r.games)]
        for r in report.bradley_terry
    ]
    pair_rows = [
        [f"{p.model} vs {p.other}", str(p.wins), str(p.ties), str(p.losses),
         f"{_pct(p.win_rate)} {_ci(p.win_ci, '{:.0%}')}", _pct(p.tie_rate), _p(p.sign_test_p)]
        for p in report.pairs
    ]
    criterion_rows = [
        [c.criterion, f"{c.model} vs {c.other}", f"{c.wins}/{c.ties}/{c.losses}",
         f"{_pct(c.win_rate)} {_ci(c.win_ci, '{:.0%}')}",
         "—" if c.mean_score is None else f"{c.mean_score:.2f} vs {c.other_mean_score:.2f}", _p(c.sign_test_p)]
        for c in report.criteria
    ]
    kappa_rows = [
        [f"{k.a} & {k.b}", str(k.shared), "—" if k.kappa is None else f"{k.kappa:.2f}", "LOW" if k.flag else ""]
        for k in report.kappa_pairs
    ]
    evaluator_rows = [
        [m.evaluator, "—" if m.agreement is None else _pct(m.agreement), str(m.shared),
         f"{report.median_ms.get(m.evaluator, float('nan')) / 1000:.1f} s"]
        for m in report.majority
    ]
    return [
        ("ratings (Bradley-Terry on the Elo scale, 95 % bootstrap CI; online Elo in vote order and over random "
         "orders)", ["model", "BT rating", "95% CI", "Elo", "Elo over orders", "votes"], ratings_rows),
        ("head to head (Wilson 95 % CI; sign test, ties excluded)",
         ["pair", "wins", "ties", "losses", "win rate", "ties", "p"], pair_rows),
        ("per criterion", ["criterion", "pair", "W/T/L", "win rate", "mean score", "p"], criterion_rows),
        ("agreement between evaluators (Cohen's kappa on shared comparisons)",
         ["evaluators", "shared", "kappa", ""], kappa_rows),
        ("evaluators", ["evaluator", "agrees with majority", "shared", "median time per vote"], evaluator_rows),
        *_judge_sections(report),
    ]


def _judge_sections(report: StudyReport) -> list[tuple[str, list[str], list[list[str]]]]:
    """The automatic judge: its agreement with the human majority, and its ratings beside the humans'."""
    judge = report.judge
    if judge is None:
        return []
    kappa = judge.agreement
    agreement_row = [judge.judge, str(judge.votes), "—" if kappa.kappa is None else f"{kappa.kappa:.2f}",
                     str(kappa.shared), "LOW" if kappa.flag else "", f"${judge.cost_usd:.4f}"]  # fmt: skip
    human = {r.model: r for r in report.bradley_terry}
    rating_rows = [
        [r.model, f"{r.rating:.0f}", _ci(r.ci),
         f"{human[r.model].rating:.0f} {_ci(human[r.model].ci)}" if r.model in human else "—"]
        for r in judge.ratings
    ]
    return [
        ("automatic judge (both orders asked; Cohen's kappa of its verdict vs the human majority on shared "
         "comparisons)", ["judge", "votes", "kappa", "shared", "", "cost"], [agreement_row]),
        ("automatic judge ratings beside the humans' (Bradley-Terry, 95 % bootstrap CI)",
         ["model", "judge BT", "95% CI", "human BT (95% CI)"], rating_rows),
    ]


def summary_lines(report: StudyReport) -> list[str]:
    fleiss = "—" if report.fleiss is None else f"{report.fleiss:.2f}"
    position = report.position
    return [
        f"{report.votes} votes by {report.evaluators} evaluators on {report.comparisons} comparisons "
        f"({report.multi_rated} rated by two or more); Fleiss' kappa {fleiss}",
        f"left answer chosen in {_pct(position.left_share)} of decisive votes (p = {_p(position.p_value)})"
        if position.left_votes + position.right_votes else "no decisive votes yet",
    ]


def to_table(report: StudyReport, console: Console) -> None:
    console.print(f"[bold]study {terminal_text(report.study)}[/bold]: "
                  f"{terminal_text(', '.join(report.models))}")  # fmt: skip
    for line in summary_lines(report):
        console.print(terminal_text(line), highlight=False)
    for title, columns, rows in sections(report):
        if rows:
            table = Table(*columns, title=title, title_justify="left")
            for row in rows:
                table.add_row(*(terminal_text(cell) for cell in row))
            console.print(table)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {terminal_text(warning)}", highlight=False)


def to_markdown(report: StudyReport) -> str:
    lines = [f"## Study {report.study}", "", *[f"- {line}" for line in summary_lines(report)]]
    for title, columns, rows in sections(report):
        if rows:
            lines += ["", f"**{title}**", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(markdown_text(cell) for cell in row) + " |" for row in rows]
    if report.warnings:
        lines += ["", *[f"- **warning:** {markdown_text(w)}" for w in report.warnings]]
    return "\n".join(lines) + "\n"


def to_csv(report: StudyReport) -> str:
    """Ratings and head-to-head figures, raw numbers, one row each."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["section", "model", "other", "value", "low", "high", "wins", "ties", "losses", "p"])
    for r in report.bradley_terry:
        writer.writerow(["bradley_terry", r.model, "", r.rating, r.ci[0], r.ci[1], "", "", "", ""])
    for model, value in report.elo.items():
        writer.writerow(["elo", model, "", value, "", "", "", "", "", ""])
    for p in report.pairs:
        writer.writerow(["win_rate", p.model, p.other, p.win_rate, p.win_ci[0], p.win_ci[1], p.wins, p.ties,
                         p.losses, "" if p.sign_test_p is None else p.sign_test_p])
    for c in report.criteria:
        writer.writerow([f"criterion:{c.criterion}", c.model, c.other, c.win_rate, c.win_ci[0], c.win_ci[1], c.wins,
                         c.ties, c.losses, "" if c.sign_test_p is None else c.sign_test_p])
    if report.judge is not None:
        for r in report.judge.ratings:
            writer.writerow(["judge_bradley_terry", r.model, report.judge.judge, r.rating, r.ci[0], r.ci[1], "", "",
                             "", ""])  # fmt: skip
    return out.getvalue()
