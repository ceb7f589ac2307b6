"""The report from a store URL: what `abproxy report` and GET /admin/experiments/{name}/report share."""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from proxy.analysis.dataset import loading, resolve_window
from proxy.analysis.timespec import parse_time
from proxy.config import Settings

if TYPE_CHECKING:
    from proxy.analysis.report import Report


class StoreNotReady(Exception):
    """The store cannot be read: unreachable, or never migrated (no collector has run)."""


def parse_bounds(since: str | None, until: str | None, now: float) -> tuple[float | None, float | None]:
    """Raises ValueError naming the bound ("since: ..."), for a CLI option or a query parameter."""
    bounds: list[float | None] = []
    for name, text in (("since", since), ("until", until)):
        try:
            bounds.append(parse_time(text, now) if text else None)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return bounds[0], bounds[1]


def report_from_store(
    engine: sa.Engine, settings: Settings, experiment: str, *, since: float | None, until: float | None, now: float
) -> Report:
    """Raises KeyError for an unknown experiment, StoreNotReady when the store cannot be read."""
    if experiment not in settings.experiments:
        raise KeyError(experiment)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("requests"):
                raise StoreNotReady("the store has no tables yet: run `abproxy collect` (or `abproxy store migrate`)")
            window = resolve_window(conn, experiment, since, until, now)
            regeneration_window_s = settings.feedback.regeneration_window_s
            with loading(conn, experiment, window, regeneration_window_s=regeneration_window_s) as dataset:
                # The statistics' imports (scipy, statsmodels: ~1.5 s for `abproxy report`) while the
                # store is read: the report module is imported here, not at the top.
                from proxy.analysis.report import report_of

                return report_of(dataset(), settings, experiment, now=now)
    except SQLAlchemyError as exc:
        detail = str(exc.args[0]).splitlines()[0] if exc.args else ""
        raise StoreNotReady(f"the store cannot be read: {type(exc).__name__}: {detail}") from None
