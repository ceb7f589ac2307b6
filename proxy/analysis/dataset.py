"""From the store to per-user numbers: what the statistics need, aggregated in the database.

The randomisation unit is the user, so everything is summed per (user, day) and the rows that
come back number users x active days, never requests:

    exposures   each user's first request in the window: variant, and the rollout percent then
    requests    per user and day: requests, errors, empty answers, regenerations, latency, cost
    episodes    per user and day of an episode's first request: episodes, turns
    feedback    request-level: per user, day and metric, the sum and count of values
                user-level: one value per user and metric (scoped to the experiment, else global)
    latencies   a uniform sample of the answered requests, per variant (rollup.SAMPLE_SIZE)

Days are UTC days, numbered from the window's first. Each day is read from the rollup when it
is current there and from the raw rows otherwise (proxy/store/rollup.py): the same
aggregations, so the same numbers.

A user is analysed in the variant of their first exposure. Raising the rollout moves some
control users to treatment; their later requests are left out ("crossovers"), since counting
them in either arm would mix the two treatments in one unit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import repeat
from typing import Any

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from proxy.store import rollup
from proxy.store.schema import feedback, requests, rollup_episodes, rollup_feedback, rollup_latency, rollup_requests

DAY_S = float(rollup.DAY_S)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class Window:
    since: float
    until: float

    @property
    def days(self) -> float:
        return max(self.until - self.since, 0.0) / DAY_S

    @property
    def utc_days(self) -> int:
        """The UTC days the window touches (at least one)."""
        if self.until <= self.since:
            return 1
        return rollup.utc_day(math.nextafter(self.until, -math.inf)) - rollup.utc_day(self.since) + 1


@dataclass(slots=True)
class Observations:
    """One metric's data as (user, day) rows: a ratio sum(num) / sum(den) per user and variant."""

    user: IntArray
    day: IntArray
    num: FloatArray
    den: FloatArray

    @classmethod
    def empty(cls) -> Observations:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0))


@dataclass(slots=True)
class Dataset:
    window: Window
    users: list[str]  # user index -> user hash
    treatment: npt.NDArray[np.bool_]  # per user: first exposure in treatment
    first_day: IntArray  # per user: day of first exposure
    expected_treatment: FloatArray  # per user: P(treatment) = rollout percent at first exposure / 100
    requests: dict[str, Observations] = field(default_factory=dict)  # error, empty_response, latency, ...
    request_feedback: dict[str, Observations] = field(default_factory=dict)
    user_feedback: dict[str, Observations] = field(default_factory=dict)  # den == 1, one row per user
    latency_ms: dict[str, FloatArray] = field(default_factory=dict)  # variant -> sampled answered requests
    ttft_ms: dict[str, FloatArray] = field(default_factory=dict)
    requests_by_variant: dict[str, int] = field(default_factory=dict)
    unidentified_requests: int = 0
    crossover_users: int = 0

    @property
    def looks(self) -> int:
        """Daily looks over the window, the last one at its end: every observation is in one."""
        return self.window.utc_days


def load(conn: Connection, experiment: str, window: Window, *, regeneration_window_s: float) -> Dataset:
    plan = rollup.plan(conn, experiment, window.since, window.until, regeneration_window_s)
    source = _Source(conn, experiment, window, plan, rollup.utc_day(window.since))
    if conn.engine.url.database in (None, "", ":memory:"):  # an in-memory SQLite: one connection sees it
        return _load(source, lambda: _episodes(source), regeneration_window_s)
    # The episodes' aggregation is the database's longest read (7 of its 10 s at 10M requests)
    # and the other reads are mostly Python's: on a second connection, the two overlap.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return _load(source, pool.submit(_episodes_apart, conn.engine, source).result, regeneration_window_s)


def _load(source: _Source, episodes: Callable[[], list[list[Any]] | None], regeneration_window_s: float) -> Dataset:
    """`load` once the episodes are being read: `episodes()` gives their rows when needed."""
    conn, experiment, window = source.conn, source.experiment, source.window
    live = rollup.request_groups(conn, experiment, source.plan.live, regeneration_window_s)
    groups = source.columns(rollup_requests, live)
    _, day, user_hash, variant, percent, first_ts, n, failed, empty, answered, latency, cost, regenerated = groups
    users = sorted({user for user in user_hash if user is not None})
    index = {user: i for i, user in enumerate(users)}
    user = _user_index(index, user_hash)
    treated_row = np.array([v == "treatment" for v in variant], dtype=np.bool_)
    days = np.array(day, dtype=np.int64) - source.day0
    first = _first_rows(user, np.array(first_ts, dtype=np.float64))
    data = Dataset(
        window=window,
        users=users,
        treatment=treated_row[first.rows],
        first_day=days[first.rows],
        expected_treatment=np.array([(p or 0.0) / 100.0 for p in percent], dtype=np.float64)[first.rows],
    )
    reader = _Reader(source, data, index)
    reader.decide_ties(first.tied)
    counts = _floats(n)
    variants = np.array(variant, dtype=object)
    names = sorted(set(variant))
    data.requests_by_variant = {v: int(counts[variants == v].sum()) for v in names}
    data.unidentified_requests = int(counts[user < 0].sum())
    member = reader.members(user, treated_row)
    data.crossover_users = int(np.unique(user[(user >= 0) & ~member]).size)
    for name, num, den in (
        ("error", failed, n),
        ("empty_response", empty, n),
        ("latency_mean", latency, answered),
        ("cost_per_query", cost, n),
        ("regenerated", regenerated, n),
    ):
        data.requests[name] = _observations(user, days, _floats(num), _floats(den), member)
    reader.episodes(episodes())
    reader.request_feedback()
    reader.user_feedback()
    reader.latencies(names)
    return data


@dataclass(frozen=True, slots=True)
class _FirstRows:
    rows: IntArray  # per user: the row holding their earliest request
    tied: IntArray  # users with two rows at that earliest ts


def _first_rows(user: IntArray, first_ts: FloatArray) -> _FirstRows:
    """Each user's first exposure among rows already grouped per (user, variant, percent, day).

    A sort of those rows (users x days), not of the window's requests. Two rows of one user at the
    same earliest `ts` (two variants or percents at one instant) are a tie for `decide_ties`.
    """
    known = np.flatnonzero(user >= 0)
    if known.size == 0:
        return _FirstRows(np.zeros(0, np.int64), np.zeros(0, np.int64))
    order = known[np.lexsort((first_ts[known], user[known]))]
    sorted_user, sorted_ts = user[order], first_ts[order]
    starts = np.flatnonzero(np.r_[True, sorted_user[1:] != sorted_user[:-1]])
    following = starts + 1
    has_next = following < order.size
    tied = np.zeros(starts.size, dtype=np.bool_)
    nxt = following[has_next]
    head = starts[has_next]
    tied[has_next] = (sorted_user[nxt] == sorted_user[head]) & (sorted_ts[nxt] == sorted_ts[head])
    return _FirstRows(order[starts], sorted_user[starts[tied]])


def _floats(values: Sequence[float | None]) -> FloatArray:
    """A column as floats, a NULL sum (no request had a value) as 0."""
    return np.nan_to_num(np.array(values, dtype=np.float64), nan=0.0)


def _observations(user: IntArray, day: IntArray, num: FloatArray, den: FloatArray, keep: BoolArray) -> Observations:
    return Observations(user[keep], day[keep], num[keep], den[keep])


@dataclass(frozen=True, slots=True)
class _Source:
    """Where one load reads: the rolled-up days and the live spans of its window."""

    conn: Connection
    experiment: str
    window: Window
    plan: rollup.Plan
    day0: int  # the UTC day the window starts on: day numbers count from it

    def parts(self, table: sa.Table, live: sa.Select[Any]) -> list[sa.Select[Any]]:
        """The rolled-up days' rows of `table` and the live aggregation, in the same columns."""
        parts: list[sa.Select[Any]] = []
        if self.plan.rolled:
            t = table.c
            rolled = sa.select(*(t[c.name] for c in live.selected_columns))
            parts.append(rolled.where(t.experiment == self.experiment, t.day.in_(self.plan.rolled)))
        if self.plan.live:
            parts.append(live)
        return parts

    def columns(self, table: sa.Table, live: sa.Select[Any]) -> list[list[Any]]:
        return self.fetch(self.parts(table, live), len(live.selected_columns))

    def fetch(self, selects: Sequence[sa.Select[Any]], width: int) -> list[list[Any]]:
        """The rows of all `selects` (same columns), as one list per column (zip(*rows) would
        build a tuple per row): at 10M requests a report reads about a million rows."""
        rows = self.rows(selects)
        return [[row[k] for row in rows] for k in range(width)]

    def rows(self, selects: Sequence[sa.Select[Any]]) -> list[Sequence[Any]]:
        """The rows of all `selects`: the DBAPI cursor's tuples, not SQLAlchemy's Row objects."""
        rows: list[Sequence[Any]] = []
        for select in selects:
            result = self.conn.execute(select)
            cursor = result.cursor
            try:
                while chunk := cursor.fetchmany(_FETCH_ROWS):
                    rows.extend(chunk)
            finally:
                result.close()
        return rows


def _user_index(index: dict[str, int], user_hash: Sequence[str | None]) -> IntArray:
    """Each row's user index; -1 for no identified user (or one with no request in the window)."""
    # dict.get over the column: C-level work per row, None (no user) as -1 like any unknown.
    lookup: dict[str | None, int] = index  # type: ignore[assignment]
    return np.fromiter(map(lookup.get, user_hash, repeat(-1)), np.int64, len(user_hash))


class _Reader:
    """One load's parts, each read through `src` and added to `data`; `index`: user hash -> index."""

    def __init__(self, src: _Source, data: Dataset, index: dict[str, int]) -> None:
        self.src, self.data, self.index = src, data, index

    def members(self, user: IntArray, treated_row: BoolArray) -> BoolArray:
        """Rows of a user in the arm of their first exposure; a crossover's other rows are not."""
        known = user >= 0
        member = known.copy()
        member[known] = self.data.treatment[user[known]] == treated_row[known]
        return member

    def rows_of(self, user_hash: Sequence[str | None], variant: Sequence[str]) -> tuple[IntArray, BoolArray]:
        user = _user_index(self.index, user_hash)
        return user, self.members(user, np.array([v == "treatment" for v in variant], dtype=np.bool_))

    def decide_ties(self, tied: IntArray) -> None:
        """A user's rows tied at their earliest `ts`: the lowest request id decides, as
        ROW_NUMBER() OVER (ORDER BY ts, request_id) did. Rare: those users' requests are read."""
        r, data = requests.c, self.data
        names = [data.users[u] for u in tied.tolist()]
        for i in range(0, len(names), _TIE_CHUNK):
            chunk = names[i : i + _TIE_CHUNK]
            rows = self.src.conn.execute(
                sa.select(r.user_hash, r.variant, r.rollout_percent)
                .where(*_in_window(self.src.experiment, self.src.window), r.user_hash.in_(chunk))
                .order_by(r.ts, r.request_id)
            ).all()  # fmt: skip
            decided: set[str] = set()
            for user_hash, variant, percent in rows:
                if user_hash not in decided:  # the user's first row in (ts, request id) order
                    decided.add(user_hash)
                    u = self.index[user_hash]
                    data.treatment[u] = variant == "treatment"
                    data.expected_treatment[u] = (percent or 0.0) / 100.0

    def episodes(self, rows: list[list[Any]] | None) -> None:
        """Turns per episode from `_episodes`' columns (None: no episode can be in the window)."""
        if rows is None:
            self.data.requests["turns_per_episode"] = Observations.empty()
            return
        user_hash, variant, days, episodes, turns = rows
        user, member = self.rows_of(user_hash, variant)
        self.data.requests["turns_per_episode"] = _observations(
            user, np.array(days, dtype=np.int64) - self.src.day0, _floats(turns), _floats(episodes), member
        )

    def request_feedback(self) -> None:
        live = rollup.feedback_groups(self.src.conn, self.src.experiment, self.src.plan.live)
        _, day, user_hash, variant, metric, total, count = self.src.columns(rollup_feedback, live)
        user, member = self.rows_of(user_hash, variant)
        days, num, den = np.array(day, dtype=np.int64) - self.src.day0, _floats(total), _floats(count)
        metrics = np.array(metric, dtype=object)
        self.data.request_feedback = {
            name: _observations(user, days, num, den, member & (metrics == name)) for name in sorted(set(metric))
        }

    def user_feedback(self) -> None:
        """One value per user and metric: one scoped to this experiment beats one sent for the
        user in general. Its day: when it was sent, but never before the user's first exposure."""
        data, fb = self.data, feedback.c
        select = sa.select(fb.user_hash, fb.metric, fb.value, fb.experiment, rollup.day_of(self.src.conn, fb.ts)).where(
            fb.level == "user",
            sa.or_(fb.experiment == self.src.experiment, fb.experiment.is_(None)),
            fb.ts < self.src.window.until,
        )
        user_hash, metric, value, scoped_to, day = self.src.fetch([select], 5)
        names = sorted(set(metric))
        code = np.fromiter(map({name: i for i, name in enumerate(names)}.__getitem__, metric), np.int64, len(metric))
        user = _user_index(self.index, user_hash)
        general = np.array([experiment is None for experiment in scoped_to], dtype=np.bool_)
        known = np.flatnonzero(user >= 0)
        # Per (metric, user), the scoped value first: a (subject, metric) is unique, so at most two.
        ordered = known[np.lexsort((general[known], user[known], code[known]))]
        if ordered.size:
            ordered = ordered[np.r_[True, (code[ordered][1:] != code[ordered][:-1])
                                    | (user[ordered][1:] != user[ordered][:-1])]]  # fmt: skip
        chosen_user = user[ordered]
        days = np.maximum(np.array(day, dtype=np.int64)[ordered] - self.src.day0, data.first_day[chosen_user])
        values = np.array(value, dtype=np.float64)[ordered]
        data.user_feedback = {}
        for i, name in enumerate(names):
            mine = code[ordered] == i
            data.user_feedback[name] = Observations(chosen_user[mine], days[mine], values[mine],
                                                    np.ones(int(mine.sum())))  # fmt: skip

    def latencies(self, variants: list[str]) -> None:
        """Per variant, the window's latency sample (rollup.SAMPLE_SIZE lowest sample keys of its
        answered requests, from the rolled-up days' samples and the live spans'), crossovers left out."""
        lat = rollup_latency.c
        size = rollup.SAMPLE_SIZE
        selects: list[sa.Select[Any]] = []
        if self.src.plan.rolled:
            selects += [
                sa.select(lat.variant, lat.sample_key, lat.request_id, lat.user_hash, lat.latency_ms, lat.ttft_ms)
                .where(lat.experiment == self.src.experiment, lat.variant == variant, lat.day.in_(self.src.plan.rolled))
                .order_by(lat.sample_key, lat.request_id)
                .limit(size)
                for variant in variants
            ]  # fmt: skip
        if self.src.plan.live:
            s = rollup.latency_sample(self.src.conn, self.src.experiment, self.src.plan.live, size).subquery().c
            selects.append(sa.select(s.variant, s.sample_key, s.request_id, s.user_hash, s.latency_ms, s.ttft_ms))
        rows = self.src.rows(selects)
        # Python orders str by code point, as both back-ends order the key (rollup.sample_key).
        rows.sort(key=lambda row: (row[0], row[1], row[2]))
        self.data.latency_ms, self.data.ttft_ms = {}, {}
        for variant in ("control", "treatment"):
            mine = [row for row in rows if row[0] == variant][:size]
            _, member = self.rows_of([row[3] for row in mine], [variant] * len(mine))
            latency = np.array([row[4] for row in mine], dtype=np.float64)[member]
            ttft = np.array([row[5] for row in mine], dtype=np.float64)[member]
            self.data.latency_ms[variant] = latency
            self.data.ttft_ms[variant] = ttft[~np.isnan(ttft)]


def _episodes_apart(engine: Engine, src: _Source) -> list[list[Any]] | None:
    """`_episodes` on a connection of its own (committed data, as every read of a report)."""
    with engine.connect() as conn:
        return _episodes(replace(src, conn=conn))


def _episodes(src: _Source) -> list[list[Any]] | None:
    """Per (user, variant, day): episodes and their turns, an episode on the day of its first
    request in the window: its fragments (one per day) summed across days in the database."""
    live = rollup.episode_fragments(src.conn, src.experiment, src.plan.live)
    parts = src.parts(rollup_episodes, live)
    if not parts:
        return None
    fragments = sa.union_all(*parts).subquery() if len(parts) > 1 else parts[0].subquery()
    f = fragments.c
    per_episode = (
        sa.select(f.user_hash, f.variant, sa.func.min(f.started).label("started"), sa.func.sum(f.turns).label("turns"))
        .group_by(f.user_hash, f.variant, f.episode_id)
        .subquery()
    )
    e = per_episode.c
    day = rollup.day_of(src.conn, e.started).label("day")
    select = sa.select(e.user_hash, e.variant, day, sa.func.count(), sa.func.sum(e.turns)).group_by(
        e.user_hash, e.variant, day
    )
    return src.fetch([select], 5)


def _in_window(experiment: str, window: Window) -> list[Any]:
    return [requests.c.experiment == experiment, requests.c.ts >= window.since, requests.c.ts < window.until]


_FETCH_ROWS = 100_000
_TIE_CHUNK = 500
