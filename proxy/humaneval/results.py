"""The results section of a study's admin page: the study report as HTML-ready tables and charts.

The figures are `proxy.humaneval.report`'s, computed the same way (same bootstrap, same seed) as
`abproxy humaneval report`, so the page and the command line never disagree. This module only
decides what the page shows: the summary lines, two SVG charts (`charts.ratings_svg`) and the
report's tables as the terminal and Markdown views lay them out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Engine

from proxy.humaneval.charts import ChartRow, ratings_svg
from proxy.humaneval.studies import StudySummary

Section = tuple[str, list[str], list[list[str]]]  # title, column names, rows of cells


@dataclass(frozen=True, slots=True)
class StudyResults:
    votes: int
    summary: list[str] = field(default_factory=list)
    charts: list[tuple[str, str]] = field(default_factory=list)  # (caption, SVG document; its text escaped)
    sections: list[Section] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None  # why the figures cannot be computed (yet): shown instead of them


def study_results(engine: Engine, study: StudySummary) -> StudyResults:
    # Imported here: the statistics stack is loaded by the first results page, not by every page.
    from proxy.humaneval import render, report

    try:
        built = report.study_report(engine, study.name)
    except ValueError as exc:  # e.g. ratings across models that never met: say so, keep the page
        return StudyResults(votes=0, error=str(exc))
    if not built.votes:
        return StudyResults(votes=0)
    bt_title = "Bradley-Terry rating on the Elo scale, 95 % bootstrap interval (dashed: 1500, the average)"
    bt = ratings_svg([ChartRow(r.model, r.rating, r.ci[0], r.ci[1]) for r in built.bradley_terry], title=bt_title)
    elo_title = "Elo over random vote orders: mean and the middle 95 % (dashed: 1500, the start)"
    order = [r.model for r in built.bradley_terry] or sorted(built.elo_orderings)
    elo = ratings_svg(
        [ChartRow(m, built.elo_orderings[m][0], built.elo_orderings[m][2], built.elo_orderings[m][3])
         for m in order if m in built.elo_orderings],
        title=elo_title,
    )  # fmt: skip
    # render's table layout is shared with the terminal and Markdown views (private there, for now).
    sections = [s for s in render.sections(built) if s[2]]
    charts = [(title, svg) for title, svg in ((bt_title, bt), (elo_title, elo)) if svg]
    return StudyResults(built.votes, render.summary_lines(built), charts, sections, built.warnings)
