"""The report's rollup: each UTC day's requests aggregated once, so a report reads users x days, not requests.

`abproxy report` on 10M stored requests spent minutes reading them five times (bench scenario 7).
A day that is over changes only when late events arrive, so its aggregates are kept:

    rollup_requests   per (user, variant, rollout percent): requests, failures, empties, answered,
                      their latency sum, cost, regenerations, and the earliest request
    rollup_episodes   per (user, variant, episode): the episode's turns that day, its first request,
                      and the latest earlier day holding a fragment of it (prev_day)
    rollup_episode_days  per user and variant: the day's turns, and the episodes that begin that day
    rollup_feedback   per (user, variant, metric): request-level feedback on the day's requests
    rollup_latency    per variant: the day's answered requests with the lowest sample keys

The aggregations are the functions below, and the same ones run over the raw rows for whatever
part of a report's window is not rolled up (today, a day that changed since its build, a day the
window cuts): rolled up or not, a report reads the same numbers. A day is rebuilt whole from the
raw rows, never patched, so a late or redelivered event cannot make the rollup drift.

Which days are current, in `rollup_days`: every write that stores a request or request feedback
bumps its day's `gen` (`mark_written`, in the writer's transaction); a build records the `gen` it
read before aggregating. A day is current when the two are equal and it was built with the
report's regeneration window and sample size. A write that lands while a build runs bumps `gen`
past what the build read, so the day is rebuilt, never wrongly taken as current.

A regeneration is a request whose same prompt the same user sent again within the regeneration
window: its next request may be on the next day (or after the window's end), so a day is built
only once the window has passed after its end, and a request in the first window of a day marks
the day before too.

An episode's fragments on different days are tied by `prev_day`, found when a day is built from
the days built before it (oldest first). A report counts an episode on the first day of the
window holding a fragment of it (prev_day NULL or before the window) and each turn on its own
day, reading `rollup_episode_days` rather than regrouping fragments by episode. When a rebuild
changes which episodes a day holds (a late request, a deletion), the later days whose prev_day
that changes are marked not current, in the rebuild's transaction (`_mark_continuations`), so
they are rebuilt too and read from the raw rows until then.

The latency sample (hand-written: no library keeps a mergeable sample in SQL): percentiles over
every answered request would read them all. Instead each day keeps, per variant, the SAMPLE_SIZE
answered requests with the lowest sample key (the request id after its first 8 characters: the
proxy's ids start with their issue time, then random bytes), and a window's sample is the
SAMPLE_SIZE lowest of its days': a uniform random sample of the window's answered requests, the
same one whichever days are rolled up, and all of them when there are fewer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from proxy.event_stream import CLIENT_CLOSED
from proxy.store.schema import (
    feedback,
    requests,
    rollup_days,
    rollup_episode_days,
    rollup_episodes,
    rollup_feedback,
    rollup_latency,
    rollup_requests,
)

DAY_S = 86_400
SAMPLE_SIZE = 100_000  # answered requests per variant in a window's latency sample


# A day's rows, rebuilt whole (rollup_episode_days from the day's rollup_episodes: after them).
_DAY_TABLES = (rollup_requests, rollup_episodes, rollup_episode_days, rollup_feedback, rollup_latency)
_TABLES = (rollup_days, *_DAY_TABLES)


def utc_day(ts: float) -> int:
    return math.floor(ts / DAY_S)


@dataclass(frozen=True, slots=True)
class Span:
    """Half-open [since, until) in unix seconds."""

    since: float
    until: float


def day_of(conn: Connection, ts: Any) -> Any:
    """The UTC day of `ts` in SQL. PostgreSQL's CAST rounds, SQLite's truncates (ts >= 0)."""
    if conn.dialect.name == "postgresql":
        return sa.cast(sa.func.floor(ts / DAY_S), sa.Integer)
    return sa.cast(ts / DAY_S, sa.Integer)


def sample_key(conn: Connection, request_id: Any) -> Any:
    """The request id past its time prefix, ordered by code point on both back-ends."""
    key = sa.func.substr(request_id, 9, type_=sa.String)
    return sa.collate(key, "C") if conn.dialect.name == "postgresql" else key


def _within(ts: Any, spans: Sequence[Span], extend_s: float = 0.0) -> Any:
    return sa.or_(sa.false(), *(sa.and_(ts >= span.since, ts < span.until + extend_s) for span in spans))


# -- the aggregations: a day's build and a report's live part ----------------------------------


def request_groups(conn: Connection, experiment: str, spans: Sequence[Span], window_s: float) -> sa.Select[Any]:
    """rollup_requests' columns, experiment first, over the requests in `spans`."""
    r = requests.c
    next_same_prompt = sa.func.lead(r.ts).over(partition_by=(r.user_hash, r.prompt_hash), order_by=r.ts)
    # The next request with the same prompt may lie past the spans: the rows read reach window_s further.
    flagged = (
        sa.select(
            r.user_hash, r.variant, r.rollout_percent, r.ts, r.status, r.error, r.completion_tokens, r.endpoint,
            r.latency_ms, r.cost_usd,
            sa.case((sa.and_(r.prompt_hash.is_not(None), next_same_prompt - r.ts <= window_s), 1),
                    else_=0).label("regenerated"),
        )
        .where(r.experiment == experiment, _within(r.ts, spans, window_s))
        .subquery()
    )  # fmt: skip
    f = flagged.c
    ok = f.status == 200
    # A 200 with an error is a failure the client did not see as one: a stream broken off with an
    # in-band error event, or a treatment call answered by the control (fallback_to_control).
    failed = sa.or_(sa.and_(f.status != 200, f.status != CLIENT_CLOSED), sa.and_(ok, f.error.is_not(None)))
    empty = sa.and_(ok, f.completion_tokens == 0, f.endpoint != "embeddings")
    day = day_of(conn, f.ts).label("day")
    return (
        sa.select(
            sa.literal(experiment, sa.String).label("experiment"),
            day,
            f.user_hash,
            f.variant,
            f.rollout_percent,
            sa.func.min(f.ts).label("first_ts"),
            sa.func.count().label("requests"),
            sa.func.sum(sa.case((failed, 1), else_=0)).label("failed"),
            sa.func.sum(sa.case((empty, 1), else_=0)).label("empty"),
            sa.func.sum(sa.case((ok, 1), else_=0)).label("answered"),
            sa.func.sum(sa.case((ok, sa.func.coalesce(f.latency_ms, 0.0)), else_=0.0)).label("latency_ms"),
            sa.func.sum(f.cost_usd).label("cost_usd"),
            sa.func.sum(f.regenerated).label("regenerated"),
        )
        .where(_within(f.ts, spans))
        .group_by(day, f.user_hash, f.variant, f.rollout_percent)
    )


def episode_fragments(conn: Connection, experiment: str, spans: Sequence[Span]) -> sa.Select[Any]:
    """rollup_episodes' columns: each episode's requests per day in `spans`."""
    r = requests.c
    day = day_of(conn, r.ts).label("day")
    return (
        sa.select(
            sa.literal(experiment, sa.String).label("experiment"), day, r.user_hash, r.variant, r.episode_id,
            sa.func.min(r.ts).label("started"), sa.func.count().label("turns"),
        )
        .where(r.experiment == experiment, _within(r.ts, spans), r.user_hash.is_not(None), r.episode_id.is_not(None))
        .group_by(day, r.user_hash, r.variant, r.episode_id)
    )  # fmt: skip


def feedback_groups(conn: Connection, experiment: str, spans: Sequence[Span]) -> sa.Select[Any]:
    """rollup_feedback's columns: request-level feedback on the requests in `spans`, by their day."""
    r, fb = requests.c, feedback.c
    day = day_of(conn, r.ts).label("day")
    return (
        sa.select(
            sa.literal(experiment, sa.String).label("experiment"), day, r.user_hash, r.variant, fb.metric,
            sa.func.sum(fb.value).label("total"), sa.func.count().label("count"),
        )
        .select_from(feedback.join(requests, fb.request_id == r.request_id))
        .where(r.experiment == experiment, _within(r.ts, spans), fb.level == "request", r.user_hash.is_not(None))
        .group_by(day, r.user_hash, r.variant, fb.metric)
    )  # fmt: skip


def latency_sample(conn: Connection, experiment: str, spans: Sequence[Span], size: int) -> sa.Select[Any]:
    """rollup_latency's columns: per variant, the `size` answered requests in `spans` with the lowest keys."""
    r = requests.c
    key = sample_key(conn, r.request_id)
    ranked = (
        sa.select(
            r.variant, day_of(conn, r.ts).label("day"), key.label("sample_key"), r.request_id, r.user_hash,
            r.latency_ms, r.ttft_ms,
            sa.func.row_number().over(partition_by=r.variant, order_by=(key, r.request_id)).label("rank"),
        )
        .where(r.experiment == experiment, _within(r.ts, spans), r.status == 200)
        .subquery()
    )  # fmt: skip
    s = ranked.c
    return sa.select(
        sa.literal(experiment, sa.String).label("experiment"), s.variant, s.day, s.sample_key, s.request_id,
        s.user_hash, s.latency_ms, s.ttft_ms,
    ).where(s.rank <= size)


# -- at ingest: which days a write changed --------------------------------------------------------


def days_of_requests(rows: Iterable[Mapping[str, Any]], window_s: float) -> set[tuple[str, int]]:
    """The days these request rows belong to, and the day before for those early enough in
    theirs to be the regeneration of a request of that day.

    Per experiment, every day from that of (earliest ts - window) to that of the latest: a batch
    spans minutes, so this is its day (or two across midnight), found with min/max in C rather
    than a day computed per row (the collector pays this on every batch). A day in between that
    holds no row of the batch is marked too, costing at most one needless rebuild.
    """
    rows = list(rows)
    experiments = set(map(itemgetter("experiment"), rows))
    by_experiment: dict[str, list[float]] = {}
    if len(experiments) == 1:  # the usual batch
        by_experiment[experiments.pop()] = list(map(itemgetter("ts"), rows))
    else:
        for experiment, ts in map(itemgetter("experiment", "ts"), rows):
            by_experiment.setdefault(experiment, []).append(ts)
    return {
        (experiment, day)
        for experiment, times in by_experiment.items()
        for day in range(utc_day(min(times) - window_s), utc_day(max(times)) + 1)
    }


def days_of_feedback(connection: Connection, request_ids: Sequence[str]) -> set[tuple[str, int]]:
    """The days of the requests this request-level feedback is about (those already stored:
    a request stored later marks its day then).

    One statement with the ids as one parameter (a PostgreSQL array, a JSON array SQLite's
    json_each reads) instead of an IN list SQLAlchemy renders per batch: the lookups themselves
    are primary-key reads.
    """
    if not request_ids:
        return set()
    if connection.dialect.name == "postgresql":
        rows = connection.exec_driver_sql(_FEEDBACK_DAYS_PG, (list(request_ids),))
    else:
        rows = connection.exec_driver_sql(_FEEDBACK_DAYS_SQLITE, (orjson.dumps(list(request_ids)).decode(),))
    return {(experiment, int(day)) for experiment, day in rows}


_FEEDBACK_DAYS_PG = (
    "SELECT DISTINCT experiment, CAST(floor(ts / 86400) AS INTEGER) FROM requests "
    "WHERE request_id = ANY(%s::varchar[])"
)
_FEEDBACK_DAYS_SQLITE = (
    "SELECT DISTINCT experiment, CAST(ts / 86400 AS INTEGER) FROM requests "
    "WHERE request_id IN (SELECT value FROM json_each(?))"
)
_MARK = "INSERT INTO rollup_days (experiment, day, gen) VALUES ({}, {}, 1) " \
        "ON CONFLICT (experiment, day) DO UPDATE SET gen = rollup_days.gen + 1"  # fmt: skip


def mark_written(connection: Connection, days: Iterable[tuple[str, int]]) -> None:
    """Bump each day's gen, in the writer's transaction (in one order: two writers' upserts of the
    same days cannot deadlock on PostgreSQL)."""
    rows = sorted(days)
    if rows:
        marks = ("%s", "%s") if connection.dialect.name == "postgresql" else ("?", "?")
        connection.exec_driver_sql(_MARK.format(*marks), rows)


# -- building -----------------------------------------------------------------------------------


def enter_stored_days(conn: Connection) -> int:
    """Enter, as not built, every day of stored requests `rollup_days` lacks: rows written around
    the store's writer (a bulk load, a restore). A full scan of the requests; returns the days added."""
    r, d = requests.c, rollup_days.c
    day = day_of(conn, r.ts)
    stored = sa.select(r.experiment, day.label("day")).distinct().subquery()
    missing = sa.select(stored.c.experiment, stored.c.day, sa.literal(1)).where(
        ~sa.exists().where(d.experiment == stored.c.experiment, d.day == stored.c.day)
    )
    statement = sa.insert(rollup_days).from_select(["experiment", "day", "gen"], missing)
    result = conn.execute(statement.execution_options(preserve_rowcount=True))
    return max(result.rowcount, 0)


def _current(window_s: float) -> Any:
    d = rollup_days.c
    # Never-built days hold NULLs, and NOT (NULL = x) is NULL, not true: coalesced, so due() finds them.
    return sa.and_(
        sa.func.coalesce(d.built_gen, -1) == d.gen,
        sa.func.coalesce(d.built_window_s, -1.0) == window_s,
        sa.func.coalesce(d.built_sample, -1) == SAMPLE_SIZE,
    )


def due(
    conn: Connection, window_s: float, now: float, settle_s: float, *, current_too: bool = False
) -> list[tuple[str, int]]:
    """Days not current (or all, `current_too`) whose end is past by the regeneration window and
    `settle_s`, oldest first."""
    d = rollup_days.c
    last_closed = utc_day(now - window_s - settle_s) - 1
    query = sa.select(d.experiment, d.day).where(d.day <= last_closed).order_by(d.day, d.experiment)
    rows = conn.execute(query if current_too else query.where(sa.not_(_current(window_s))))
    return [(experiment, int(day)) for experiment, day in rows]


def build_day(
    engine: Engine, experiment: str, day: int, window_s: float, now: float | None = None, *, force: bool = False
) -> bool:
    """Rebuild one day's rollup from the raw rows, in one transaction; False if it was current
    once this build held the day (another collector built it meanwhile) and not `force`."""
    span = [Span(day * DAY_S, (day + 1) * DAY_S)]
    d = rollup_days.c
    this_day = sa.and_(d.experiment == experiment, d.day == day)
    with engine.begin() as conn:
        # One build of an experiment's days at a time: two collectors building one day together
        # would each delete the rows the other had not committed yet, then both insert (the day
        # counted twice), and a build reads the earlier days' episodes and marks later days.
        # PostgreSQL: a transaction-scoped advisory lock, which leaves rollup_days' rows free for
        # the writers' marks. SQLite: a write first, so the transaction holds the database's write
        # lock before it reads and no other writer commits between the gen read and the inserts.
        if conn.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtext(experiment), _BUILD_LOCK)))
        else:
            conn.execute(sa.update(rollup_days).where(this_day).values(gen=d.gen))
        if not force and conn.execute(sa.select(d.day).where(this_day, _current(window_s))).first() is not None:
            return False
        _mark_continuations(conn, experiment, day, episode_fragments(conn, experiment, span))
        for table in _DAY_TABLES:
            conn.execute(sa.delete(table).where(table.c.experiment == experiment, table.c.day == day))
        gen = conn.execute(sa.select(d.gen).where(this_day)).scalar()
        for table, select in (
            (rollup_requests, request_groups(conn, experiment, span, window_s)),
            (rollup_episodes, _with_prev_day(episode_fragments(conn, experiment, span), experiment, day)),
            (rollup_episode_days, _episode_days(experiment, day)),
            (rollup_feedback, feedback_groups(conn, experiment, span)),
            (rollup_latency, latency_sample(conn, experiment, span, SAMPLE_SIZE)),
        ):
            conn.execute(sa.insert(table).from_select([c.name for c in select.selected_columns], select))
        r = requests.c
        first_ts, last_ts = conn.execute(
            sa.select(sa.func.min(r.ts), sa.func.max(r.ts)).where(r.experiment == experiment, _within(r.ts, span))
        ).one()
        values = {
            "built_gen": gen if gen is not None else 0, "built_window_s": window_s, "built_sample": SAMPLE_SIZE,
            "built_at": time.time() if now is None else now, "first_ts": first_ts, "last_ts": last_ts,
        }  # fmt: skip
        if gen is None:  # a day no write marked (stored before this table existed, or an empty day)
            conn.execute(sa.insert(rollup_days).values(experiment=experiment, day=day, gen=0, **values))
        else:
            conn.execute(sa.update(rollup_days).where(this_day).values(**values))
    return True


# The second key of a build's advisory lock (the first: the experiment's hash). Days are numbered
# from 1970, so no lock taken per (experiment, day) elsewhere can be this one.
_BUILD_LOCK = -1


def _with_prev_day(fragments: sa.Select[Any], experiment: str, day: int) -> sa.Select[Any]:
    """The day's fragments with their prev_day: the latest earlier day holding a fragment of the
    same episode, looked up through ix_rollup_episodes_by_episode."""
    fragment = fragments.subquery()
    f = fragment.c
    earlier = rollup_episodes.alias("earlier")
    e = earlier.c
    prev_day = sa.select(sa.func.max(e.day)).where(
        e.experiment == experiment, e.user_hash == f.user_hash, e.variant == f.variant,
        e.episode_id == f.episode_id, e.day < day,
    ).scalar_subquery()  # fmt: skip
    return sa.select(*fragment.c, prev_day.label("prev_day"))


def _episode_days(experiment: str, day: int) -> sa.Select[Any]:
    """rollup_episode_days' columns, from the day's fragments as just built."""
    e = rollup_episodes.c
    begins = sa.func.sum(sa.case((e.prev_day.is_(None), 1), else_=0))
    return (
        sa.select(e.experiment, e.day, e.user_hash, e.variant, sa.func.sum(e.turns).label("turns"),
                  begins.label("episodes"))
        .where(e.experiment == experiment, e.day == day)
        .group_by(e.experiment, e.day, e.user_hash, e.variant)
    )  # fmt: skip


def _mark_continuations(conn: Connection, experiment: str, day: int, fragments: sa.Select[Any]) -> None:
    """Before a day's rebuild: mark not current the later days whose prev_day the rebuild changes.

    Those are the days holding a fragment of an episode the day gains (if their prev_day is
    earlier than the day, or NULL) or loses (if their prev_day is the day). An episode the day
    keeps changes no prev_day: a late request of an episode already there marks nothing.
    """
    e = rollup_episodes.c
    if conn.execute(sa.select(e.day).where(e.experiment == experiment, e.day > day).limit(1)).first() is None:
        return  # the usual build, oldest day first: no later day holds anything yet
    new = fragments.subquery()
    kept = sa.select(e.user_hash, e.variant, e.episode_id).where(e.experiment == experiment, e.day == day)
    built = sa.select(new.c.user_hash, new.c.variant, new.c.episode_id)
    later = rollup_episodes.alias("later")
    lt = later.c

    def days_of(episodes: sa.Subquery, prev_day: Any) -> sa.Select[Any]:
        same = sa.and_(lt.user_hash == episodes.c.user_hash, lt.variant == episodes.c.variant,
                       lt.episode_id == episodes.c.episode_id)  # fmt: skip
        return sa.select(lt.day).join(episodes, same).where(lt.experiment == experiment, lt.day > day, prev_day)

    gained = days_of(built.except_(kept).subquery(), sa.or_(lt.prev_day.is_(None), lt.prev_day < day))
    lost = days_of(kept.except_(built).subquery(), lt.prev_day == day)
    d = rollup_days.c
    stale = sa.union(gained, lost).subquery()
    conn.execute(
        sa.update(rollup_days)
        .where(d.experiment == experiment, d.day.in_(sa.select(stale.c.day)))
        .values(gen=d.gen + 1)
    )


def build_due(
    engine: Engine, window_s: float, *, now: float | None = None, settle_s: float = 0.0
) -> list[tuple[str, int]]:
    """Build every due day, and then the days those builds marked (`_mark_continuations`: only
    later days, so this ends); returns those this call built."""
    moment = time.time() if now is None else now
    built: list[tuple[str, int]] = []
    while True:
        with engine.connect() as conn:
            days = due(conn, window_s, moment, settle_s)
        done = [(experiment, day) for experiment, day in days if build_day(engine, experiment, day, window_s, moment)]
        if not done:
            break
        built += done
    if built:
        tidy(engine)
    return built


def tidy(engine: Engine) -> None:
    """After builds, the rollup tables' statistics brought up to date.

    PostgreSQL: VACUUM (ANALYZE). A build deletes a day's rows and inserts them again; until a
    vacuum, an index-only read visits the table for each of them, and the planner counts the dead
    rows. Autovacuum gets there too, but after a report that follows the build. The pages a vacuum
    finds all-visible are skipped, so a day's build costs the vacuum that day.

    SQLite: ANALYZE (2.6 s at 10M requests). SQLite keeps no statistics of its own, and without
    them its planner reads a day's fragments, or the few continuing an episode from before a
    report's window, through the by-episode index: every fragment of the experiment (3.3M at 10M
    requests), where the day's index or the partial prev_day index finds them.
    """
    tables = ", ".join(table.name for table in _TABLES)
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:  # VACUUM: no transaction
            conn.exec_driver_sql(f"VACUUM (ANALYZE) {tables}")
        return
    with engine.begin() as conn:
        for table in _TABLES:
            conn.exec_driver_sql(f"ANALYZE {table.name}")


# -- reading: which of a window's days the report may take from the rollup -----------------------


@dataclass(frozen=True, slots=True)
class Plan:
    rolled: list[int]  # UTC days read from the rollup
    live: list[Span]  # the rest of the window, read from the raw rows


def plan(conn: Connection, experiment: str, since: float, until: float, window_s: float) -> Plan:
    """Split [since, until) into current rolled-up days and live spans.

    A day the window cuts is taken from the rollup only if all its requests lie inside the window
    (as with a window that starts at the experiment's first request).
    """
    if until <= since:
        return Plan([], [])
    if not sa.inspect(conn).has_table(rollup_days.name):
        # A store at a revision before the rollup (the new code's report ran before any collector
        # migrated it): the whole window from the raw rows, as the report read it before.
        return Plan([], [Span(since, until)])
    d = rollup_days.c
    first, last = utc_day(since), utc_day(math.nextafter(until, -math.inf))
    current = {
        int(day): (first_ts, last_ts)
        for day, first_ts, last_ts in conn.execute(
            sa.select(d.day, d.first_ts, d.last_ts).where(
                d.experiment == experiment, d.day >= first, d.day <= last, _current(window_s)
            )
        )
    }
    rolled: list[int] = []
    live: list[Span] = []
    for day in range(first, last + 1):
        start, end = max(day * DAY_S, since), min((day + 1) * DAY_S, until)
        bounds = current.get(day)
        whole = start == day * DAY_S and end == (day + 1) * DAY_S
        if bounds is not None and (whole or bounds[0] is None or (bounds[0] >= since and bounds[1] < until)):
            rolled.append(day)
        elif live and live[-1].until == start:
            live[-1] = Span(live[-1].since, end)
        else:
            live.append(Span(start, end))
    return Plan(rolled, live)
