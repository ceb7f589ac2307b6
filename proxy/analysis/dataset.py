"""From the store to per-user numbers: what the statistics need, aggregated in the database.

The randomisation unit is the user, so everything is summed per (user, day) and the rows that
come back number users x active days, never requests:

    exposures   each user's first request in the window: variant, and the rollout percent then
    requests    per user and day: requests, errors, empty answers, regenerations, latency, cost
    episodes    per user and day: the turns taken, and the episodes begun (counted on the
                first day of the window holding a request of theirs)
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

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from proxy.analysis import columnar
from proxy.store import rollup
from proxy.store.schema import (
    feedback,
    requests,
    rollup_episode_days,
    rollup_episodes,
    rollup_feedback,
    rollup_latency,
    rollup_requests,
)

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


def resolve_window(conn: Connection, experiment: str, since: float | None, until: float | None, now: float) -> Window:
    """The analysis window; by default from the experiment's first stored request until now."""
    end = now if until is None else min(until, now)
    if since is None:
        first = conn.execute(
            sa.select(sa.func.min(requests.c.ts)).where(requests.c.experiment == experiment)
        ).scalar()  # fmt: skip
        since = float(first) if first is not None else end
    return Window(since, end)


def load(conn: Connection, experiment: str, window: Window, *, regeneration_window_s: float) -> Dataset:
    with loading(conn, experiment, window, regeneration_window_s=regeneration_window_s) as dataset:
        return dataset()


@contextlib.contextmanager
def loading(
    conn: Connection, experiment: str, window: Window, *, regeneration_window_s: float
) -> Iterator[Callable[[], Dataset]]:
    """`load`, begun: the store is read while the caller does other work, and calling what this
    yields (within the block) waits for the reads and gives the Dataset."""
    plan = rollup.plan(conn, experiment, window.since, window.until, regeneration_window_s)
    source = _Source(conn, experiment, window, plan, rollup.utc_day(window.since), regeneration_window_s)
    if not _at_once(conn.engine):  # in turn on the caller's connection, once the caller asks
        with columnar.reader(conn) as read:
            yield partial(_load, source, {part: partial(reads, source, read) for part, reads in _READS.items()})
        return
    # Each part on a connection of its own, all at once: the caller goes on meanwhile.
    with ThreadPoolExecutor(max_workers=len(_READS)) as pool:
        futures = {part: pool.submit(_read_apart, conn.engine, partial(read, source)) for part, read in _READS.items()}
        try:
            yield partial(_load, source, {part: future.result for part, future in futures.items()})
        finally:
            for future in futures.values():  # the caller failed before it took the data: stop what has not begun
                future.cancel()


def _at_once(engine: Engine) -> bool:
    """Whether the parts are read at once, each on a connection of its own.

    PostgreSQL does the work in its own processes while the driver waits outside the GIL: on the
    bench's 10M requests, a load in 9.1 s at once against 11.0 in turn. A SQLite file is read in
    this process or, when large, by child processes (columnar): either way each read takes a core
    of its own, so at once only with a second core (on one, five threads hand each other the GIL
    at every row, and five children each load pyarrow and the driver, ~0.3 s). An in-memory
    database is seen by one connection only.
    """
    if engine.dialect.name == "postgresql":
        return True
    return not columnar.in_memory(engine) and len(os.sched_getaffinity(0)) > 1


def _read_apart(engine: Engine, reads: Callable[[columnar.Reader], pa.Table]) -> pa.Table:
    with columnar.engine_reader(engine) as read:
        return reads(read)


def _load(source: _Source, tables: Mapping[str, Callable[[], pa.Table]]) -> Dataset:
    """`load` once its parts are being read: `tables[part]()` gives a part's table (see _READS)."""
    groups = tables["requests"]()
    users = _sorted_users(groups["user_hash"])
    user = _user_index(users, groups["user_hash"])
    treated_row = _equals(groups["variant"], "treatment")
    days = _ints(groups["day"]) - source.day0
    first = _first_rows(user, _floats(groups["first_ts"]))
    data = Dataset(
        window=source.window,
        users=users.to_pylist(),
        treatment=treated_row[first.rows],
        first_day=days[first.rows],
        expected_treatment=(_floats(groups["rollout_percent"]) / 100.0)[first.rows],
    )
    reader = _Reader(source, data, users)
    reader.decide_ties(first.tied)
    counts = _floats(groups["requests"])
    names = _distinct(groups["variant"])
    data.requests_by_variant = {v: int(counts[_equals(groups["variant"], v)].sum()) for v in names}
    data.unidentified_requests = int(counts[user < 0].sum())
    member = reader.members(user, treated_row)
    data.crossover_users = int(np.unique(user[(user >= 0) & ~member]).size)
    for name, num, den in (
        ("error", "failed", "requests"),
        ("empty_response", "empty", "requests"),
        ("latency_mean", "latency_ms", "answered"),
        ("cost_per_query", "cost_usd", "requests"),
        ("regenerated", "regenerated", "requests"),
    ):
        data.requests[name] = _observations(user, days, _floats(groups[num]), _floats(groups[den]), member)
    reader.episodes(tables["episodes"]())
    reader.request_feedback(tables["request_feedback"]())
    reader.user_feedback(tables["user_feedback"]())
    reader.latencies(tables["latencies"]())
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


# -- Arrow columns to numpy: vectorised, a NULL as the value the statistics take for it --------


def _floats(column: pa.ChunkedArray) -> FloatArray:
    """A column as floats, a NULL (a sum over no value) as 0."""
    return np.asarray(pc.fill_null(column.cast(pa.float64()), 0.0).to_numpy(), dtype=np.float64)


def _ints(column: pa.ChunkedArray) -> IntArray:
    return np.asarray(column.cast(pa.int64()).to_numpy(), dtype=np.int64)


def _texts(column: pa.ChunkedArray) -> pa.ChunkedArray:
    # A column of NULLs only (from rows built out of Python values) has Arrow's null type.
    return column.cast(pa.string()) if pa.types.is_null(column.type) else column


def _equals(column: pa.ChunkedArray, value: str) -> BoolArray:
    return np.asarray(pc.fill_null(pc.equal(_texts(column), value), False).to_numpy(), dtype=np.bool_)


def _distinct(column: pa.ChunkedArray) -> list[str]:
    """The column's values, sorted, NULL left out."""
    return sorted(pc.unique(_texts(column)).drop_null().to_pylist())


def _sorted_users(user_hash: pa.ChunkedArray) -> pa.Array:
    """The identified users, in code point order (Arrow sorts UTF-8 by bytes: the same order)."""
    users = pc.unique(_texts(user_hash)).drop_null()
    return users.take(pc.sort_indices(users))


def _user_index(users: pa.Array, user_hash: pa.ChunkedArray) -> IntArray:
    """Each row's user index; -1 for no identified user (or one with no request in the window)."""
    found = pc.index_in(_texts(user_hash), value_set=users)
    return np.asarray(pc.fill_null(found, -1).cast(pa.int64()).to_numpy(), dtype=np.int64)


def _observations(user: IntArray, day: IntArray, num: FloatArray, den: FloatArray, keep: BoolArray) -> Observations:
    return Observations(user[keep], day[keep], num[keep], den[keep])


@dataclass(frozen=True, slots=True)
class _Source:
    """Where one load reads: the rolled-up days and the live spans of its window."""

    conn: Connection  # the caller's: its dialect shapes the SQL; the rare reads of raw requests
    experiment: str
    window: Window
    plan: rollup.Plan
    day0: int  # the UTC day the window starts on: day numbers count from it
    regeneration_window_s: float

    def table(self, read: columnar.Reader, table: sa.Table, live: sa.Select[Any]) -> pa.Table:
        parts = self.parts(table, live)
        return read.table(parts) if parts else columnar.empty(self.columns(live))

    def columns(self, live: sa.Select[Any]) -> sa.Select[Any]:
        """`live` without the experiment column: the load knows it."""
        kept = [c for c in live.selected_columns if c.name != "experiment"]
        return live.with_only_columns(*kept, maintain_column_froms=True)

    def parts(self, table: sa.Table, live: sa.Select[Any], rolled: list[int] | None = None) -> list[sa.Select[Any]]:
        """The rolled-up days' rows of `table` (`rolled`, by default all of the plan's) and the live
        aggregation, in the same columns."""
        live = self.columns(live)
        days = self.plan.rolled if rolled is None else rolled
        parts: list[sa.Select[Any]] = []
        if days:
            t = table.c
            select = sa.select(*(t[c.name] for c in live.selected_columns))
            parts.append(select.where(t.experiment == self.experiment, t.day.in_(days)))
        if self.plan.live:
            parts.append(live)
        return parts


class _Reader:
    """One load's parts, each added to `data` from its table; `users`: index -> user hash."""

    def __init__(self, src: _Source, data: Dataset, users: pa.Array) -> None:
        self.src, self.data, self.users = src, data, users

    def members(self, user: IntArray, treated_row: BoolArray) -> BoolArray:
        """Rows of a user in the arm of their first exposure; a crossover's other rows are not."""
        known = user >= 0
        member = known.copy()
        member[known] = self.data.treatment[user[known]] == treated_row[known]
        return member

    def rows_of(self, user_hash: pa.ChunkedArray, variant: pa.ChunkedArray) -> tuple[IntArray, BoolArray]:
        user = _user_index(self.users, user_hash)
        return user, self.members(user, _equals(variant, "treatment"))

    def decide_ties(self, tied: IntArray) -> None:
        """A user's rows tied at their earliest `ts`: the lowest request id decides, as
        ROW_NUMBER() OVER (ORDER BY ts, request_id) did. Rare: those users' requests are read."""
        r, data = requests.c, self.data
        names = [data.users[u] for u in tied.tolist()]
        index = {name: int(u) for name, u in zip(names, tied.tolist(), strict=True)}
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
                    u = index[user_hash]
                    data.treatment[u] = variant == "treatment"
                    data.expected_treatment[u] = (percent or 0.0) / 100.0

    def episodes(self, table: pa.Table) -> None:
        """Turns per episode from `_episodes`' table."""
        user, member = self.rows_of(table["user_hash"], table["variant"])
        self.data.requests["turns_per_episode"] = _observations(
            user, _ints(table["day"]) - self.src.day0, _floats(table["turns"]), _floats(table["episodes"]), member
        )

    def request_feedback(self, groups: pa.Table) -> None:
        user, member = self.rows_of(groups["user_hash"], groups["variant"])
        days, num, den = _ints(groups["day"]) - self.src.day0, _floats(groups["total"]), _floats(groups["count"])
        self.data.request_feedback = {
            name: _observations(user, days, num, den, member & _equals(groups["metric"], name))
            for name in _distinct(groups["metric"])
        }

    def user_feedback(self, rows: pa.Table) -> None:
        """One value per user and metric: one scoped to this experiment beats one sent for the
        user in general. Its day: when it was sent, but never before the user's first exposure."""
        data = self.data
        names = _distinct(rows["metric"])
        code = np.asarray(pc.index_in(_texts(rows["metric"]), value_set=pa.array(names, pa.string()))
                          .fill_null(-1).cast(pa.int64()).to_numpy(), dtype=np.int64)  # fmt: skip
        user = _user_index(self.users, rows["user_hash"])
        general = np.asarray(rows["experiment"].is_null().to_numpy(), dtype=np.bool_)
        known = np.flatnonzero(user >= 0)
        # Per (metric, user), the scoped value first: a (subject, metric) is unique, so at most two.
        ordered = known[np.lexsort((general[known], user[known], code[known]))]
        if ordered.size:
            ordered = ordered[np.r_[True, (code[ordered][1:] != code[ordered][:-1])
                                    | (user[ordered][1:] != user[ordered][:-1])]]  # fmt: skip
        chosen_user = user[ordered]
        days = np.maximum(_ints(rows["day"])[ordered] - self.src.day0, data.first_day[chosen_user])
        values = _floats(rows["value"])[ordered]
        data.user_feedback = {}
        for i, name in enumerate(names):
            mine = code[ordered] == i
            data.user_feedback[name] = Observations(chosen_user[mine], days[mine], values[mine],
                                                    np.ones(int(mine.sum())))  # fmt: skip

    def latencies(self, rows: pa.Table) -> None:
        """Per variant, the window's latency sample (`_latencies`), crossovers left out."""
        self.data.latency_ms, self.data.ttft_ms = {}, {}
        # Arrow orders strings by their UTF-8 bytes, the code point order both back-ends order the key in.
        rows = rows.sort_by([("sample_key", "ascending"), ("request_id", "ascending")])
        for variant in ("control", "treatment"):
            mine = rows.filter(pc.equal(_texts(rows["variant"]), variant)).slice(0, rollup.SAMPLE_SIZE)
            _, member = self.rows_of(mine["user_hash"], mine["variant"])
            latency = mine["latency_ms"].cast(pa.float64()).to_numpy(zero_copy_only=False)[member]
            ttft = mine["ttft_ms"].cast(pa.float64()).to_numpy(zero_copy_only=False)[member]
            self.data.latency_ms[variant] = np.asarray(latency, dtype=np.float64)
            self.data.ttft_ms[variant] = np.asarray(ttft[~np.isnan(ttft)], dtype=np.float64)


# -- the parts of a load: each a read of its own, on one connection -------------------------------


def _requests(src: _Source, read: columnar.Reader) -> pa.Table:
    live = rollup.request_groups(src.conn, src.experiment, src.plan.live, src.regeneration_window_s)
    return src.table(read, rollup_requests, live)


def _request_feedback(src: _Source, read: columnar.Reader) -> pa.Table:
    return src.table(read, rollup_feedback, rollup.feedback_groups(src.conn, src.experiment, src.plan.live))


def _user_feedback(src: _Source, read: columnar.Reader) -> pa.Table:
    return read.table([user_feedback_select(src.conn, src.experiment, src.window)])


def user_feedback_select(conn: Connection, experiment: str, window: Window) -> sa.Select[Any]:
    """The user-level feedback a report of `experiment` reads: scoped to it or to no experiment."""
    fb = feedback.c
    return sa.select(
        fb.user_hash, fb.metric, fb.value, fb.experiment, rollup.day_of(conn, fb.ts).label("day")
    ).where(
        fb.level == "user",  # ix_feedback_user_level holds these rows only (migration 0007)
        sa.or_(fb.experiment == experiment, fb.experiment.is_(None)),
        fb.ts < window.until,
    )


def _latencies(src: _Source, read: columnar.Reader) -> pa.Table:
    """Per variant, rollup.SAMPLE_SIZE answered requests or fewer: the lowest sample keys of the
    rolled-up days' samples, and the live spans' own sample."""
    lat = rollup_latency.c
    size = rollup.SAMPLE_SIZE
    columns = (lat.variant, lat.sample_key, lat.request_id, lat.user_hash, lat.latency_ms, lat.ttft_ms)
    selects: list[sa.Select[Any]] = []
    if src.plan.rolled:
        selects += [
            sa.select(*columns)
            .where(lat.experiment == src.experiment, lat.variant == variant, lat.day.in_(src.plan.rolled))
            .order_by(lat.sample_key, lat.request_id)
            .limit(size)
            for variant in ("control", "treatment")
        ]  # fmt: skip
    if src.plan.live:
        s = rollup.latency_sample(src.conn, src.experiment, src.plan.live, size).subquery().c
        selects.append(sa.select(s.variant, s.sample_key, s.request_id, s.user_hash, s.latency_ms, s.ttft_ms))
    return read.table(selects) if selects else columnar.empty(sa.select(*columns))


def _episodes(src: _Source, read: columnar.Reader) -> pa.Table:
    """Per (user, variant, day): the turns taken that day, and the episodes that begin that day,
    an episode beginning on the first day of the window that holds a request of it.

    The rolled-up days before the window's first live span (its head: all of it, for a window of
    past days) are read from rollup_episode_days, users x days, with the episodes that began before
    the window from the fragments that continue them. The rest (live spans, and days rolled up
    after the first of them) are grouped by episode from their fragments, an episode the head
    holds not counted again.
    """
    first_live = src.plan.live[0].since if src.plan.live else math.inf
    head = [day for day in src.plan.rolled if day * DAY_S < first_live]  # from day0, one after another
    tail = [day for day in src.plan.rolled if day * DAY_S >= first_live]
    selects: list[sa.Select[Any]] = []
    if head:
        ed, e = rollup_episode_days.c, rollup_episodes.c
        selects.append(sa.select(ed.user_hash, ed.variant, ed.day, ed.turns, ed.episodes)
                       .where(ed.experiment == src.experiment, ed.day.between(head[0], head[-1])))  # fmt: skip
        selects.append(
            sa.select(e.user_hash, e.variant, e.day, _ZERO.label("turns"), sa.func.count().label("episodes"))
            .where(e.experiment == src.experiment, e.prev_day.is_not(None), e.prev_day < src.day0,
                   e.day.between(head[0], head[-1]))
            .group_by(e.user_hash, e.variant, e.day)
        )  # fmt: skip
    if tail or src.plan.live:
        selects.append(_episodes_from_fragments(src, head, tail))
    return read.table(selects) if selects else _NO_EPISODES


def _episodes_from_fragments(src: _Source, head: list[int], rolled: list[int]) -> sa.Select[Any]:
    """`_episodes`' columns from the fragments of `rolled` days and of the live spans."""
    live = rollup.episode_fragments(src.conn, src.experiment, src.plan.live)
    parts = src.parts(rollup_episodes, live, rolled)
    fragments = (sa.union_all(*parts) if len(parts) > 1 else parts[0]).cte("fragments")
    f = fragments.c
    # A sum of sums is NUMERIC to PostgreSQL: cast back to an integer.
    turns = sa.select(f.user_hash, f.variant, f.day, sa.cast(sa.func.sum(f.turns), sa.BigInteger).label("turns"),
                      _ZERO.label("episodes")).group_by(f.user_hash, f.variant, f.day)  # fmt: skip
    firsts = (
        sa.select(f.user_hash, f.variant, f.episode_id, sa.func.min(f.day).label("day"))
        .group_by(f.user_hash, f.variant, f.episode_id)
        .subquery()
    )
    s = firsts.c
    begins = sa.select(s.user_hash, s.variant, s.day, _ZERO.label("turns"), sa.func.count().label("episodes"))
    if head:
        h = rollup_episodes.c
        begins = begins.where(~sa.exists().where(
            h.experiment == src.experiment, h.user_hash == s.user_hash, h.variant == s.variant,
            h.episode_id == s.episode_id, h.day.between(head[0], head[-1]),
        ))  # fmt: skip
    both = sa.union_all(turns, begins.group_by(s.user_hash, s.variant, s.day)).subquery()
    return sa.select(*both.c)


_ZERO = sa.literal(0, sa.BigInteger)


_NO_EPISODES = pa.schema(
    [("user_hash", pa.string()), ("variant", pa.string()), ("day", pa.int64()), ("turns", pa.int64()),
     ("episodes", pa.int64())]
).empty_table()  # fmt: skip

_READS: dict[str, Callable[[_Source, columnar.Reader], pa.Table]] = {
    "requests": _requests,  # the longest: first
    "episodes": _episodes,
    "request_feedback": _request_feedback,
    "user_feedback": _user_feedback,
    "latencies": _latencies,
}


def _in_window(experiment: str, window: Window) -> list[Any]:
    return [requests.c.experiment == experiment, requests.c.ts >= window.since, requests.c.ts < window.until]


_TIE_CHUNK = 500

