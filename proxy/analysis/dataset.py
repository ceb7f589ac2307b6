"""From the store to per-user numbers: what the statistics need, aggregated in the database.

The randomisation unit is the user, so everything is summed per (user, day) in SQL and the rows
that come back number users x active days, never requests:

    exposures   each user's first request in the window: variant, and the rollout percent then
    requests    per user and day: requests, errors, empty answers, regenerations, latency, cost
    episodes    per user and day of an episode's first request: episodes, turns
    feedback    request-level: per user, day and metric, the sum and count of values
                user-level: one value per user and metric (scoped to the experiment, else global)

A user is analysed in the variant of their first exposure. Raising the rollout moves some
control users to treatment; their later requests are left out ("crossovers"), since counting
them in either arm would mix the two treatments in one unit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from proxy.store.schema import feedback, requests

DAY_S = 86_400.0
# A request the user saw fail. 499 is the client leaving, its choice, not the model's failure.
CLIENT_CLOSED = 499

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Window:
    since: float
    until: float

    @property
    def days(self) -> float:
        return max(self.until - self.since, 0.0) / DAY_S


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
    latency_ms: dict[str, FloatArray] = field(default_factory=dict)  # variant -> successful requests
    ttft_ms: dict[str, FloatArray] = field(default_factory=dict)
    requests_by_variant: dict[str, int] = field(default_factory=dict)
    unidentified_requests: int = 0
    crossover_users: int = 0

    @property
    def looks(self) -> int:
        """Daily looks over the window, the last one at its end: every observation is in one."""
        return max(math.ceil(self.window.days), 1)


def _day(conn: Connection, ts: Any, since: float) -> Any:
    """Whole days since the window opened. PostgreSQL's CAST rounds, SQLite's truncates."""
    offset = (ts - since) / DAY_S
    if conn.dialect.name == "postgresql":
        return sa.cast(sa.func.floor(offset), sa.BigInteger)
    return sa.cast(offset, sa.Integer)


def _in_window(experiment: str, window: Window) -> list[Any]:
    return [requests.c.experiment == experiment, requests.c.ts >= window.since, requests.c.ts < window.until]


def load(conn: Connection, experiment: str, window: Window, *, regeneration_window_s: float) -> Dataset:
    scope = _in_window(experiment, window)
    first = _first_exposures(conn, scope, window)
    users = [row[0] for row in first]
    index = {user: i for i, user in enumerate(users)}
    data = Dataset(
        window=window,
        users=users,
        treatment=np.array([row[1] == "treatment" for row in first], dtype=np.bool_),
        first_day=np.array([row[3] for row in first], dtype=np.int64),
        expected_treatment=np.array([(row[2] or 0.0) / 100.0 for row in first], dtype=np.float64),
    )
    data.unidentified_requests = int(
        conn.execute(sa.select(sa.func.count()).where(*scope, requests.c.user_hash.is_(None))).scalar_one()
    )
    _load_requests(conn, data, index, scope, regeneration_window_s)
    _load_episodes(conn, data, index, scope)
    _load_request_feedback(conn, data, index, scope)
    _load_user_feedback(conn, data, index, experiment, window)
    _load_latencies(conn, data, index, scope)
    return data


def _first_exposures(conn: Connection, scope: list[Any], window: Window) -> list[tuple[str, str, float | None, int]]:
    """Each identified user's first request in the window: (user hash, variant, rollout percent, day),
    by user hash as the database orders it; the first is the earliest `ts`, then the lowest request id.

    One hash aggregate, not a window function: the earliest `ts` per (user, variant, rollout percent)
    is a GROUP BY with min(), which needs no sort of the window's requests (row_number() over users
    sorted them all, or walked an index in user order with a random read per request: a minute at 10M
    requests on PostgreSQL). The group holding a user's earliest `ts` is their first exposure: its
    variant and percent. Only when two groups of one user share that earliest `ts` does the request
    id decide, and those users' requests at that instant are read to decide it as row_number() did.
    """
    r = requests.c
    groups = conn.execute(
        sa.select(r.user_hash, r.variant, r.rollout_percent, sa.func.min(r.ts).label("first_ts"),
                  _day(conn, sa.func.min(r.ts), window.since))
        .where(*scope, r.user_hash.is_not(None))
        .group_by(r.user_hash, r.variant, r.rollout_percent)
        .order_by(r.user_hash)
    ).all()  # fmt: skip
    first: dict[str, tuple[str, float | None, int, float]] = {}  # user -> variant, percent, day, ts
    tied: set[str] = set()
    for user_hash, variant, percent, ts, day in groups:
        seen = first.get(user_hash)
        if seen is None or ts < seen[3]:
            first[user_hash] = (variant, percent, day, ts)
            tied.discard(user_hash)
        elif ts == seen[3]:
            tied.add(user_hash)
    ties = sorted(tied)
    for i in range(0, len(ties), _TIE_CHUNK):
        chunk = ties[i : i + _TIE_CHUNK]
        earliest = {user: first[user][3] for user in chunk}
        rows = conn.execute(
            sa.select(r.user_hash, r.ts, r.variant, r.rollout_percent)
            .where(*scope, r.user_hash.in_(chunk))
            .order_by(r.ts, r.request_id)
        ).all()  # fmt: skip
        for user_hash, ts, variant, percent in rows:
            if earliest.pop(user_hash, None) == ts:  # the user's first row in (ts, request id) order
                first[user_hash] = (variant, percent, first[user_hash][2], ts)
    # dicts keep insertion order: the users in the database's user_hash order, as before.
    return [(user, variant, percent, day) for user, (variant, percent, day, _ts) in first.items()]


_TIE_CHUNK = 500


def _arm_member(data: Dataset, index: Mapping[str, int]) -> Callable[[str, str], int | None]:
    """user hash, variant -> the user's index, or None for a crossover's request (or an unknown user)."""

    def member(user_hash: str, variant: str) -> int | None:
        user = index.get(user_hash)
        if user is None or bool(data.treatment[user]) != (variant == "treatment"):
            return None
        return user

    return member


def _observations(users: list[int], days: list[int], num: list[float], den: list[float]) -> Observations:
    return Observations(
        np.array(users, dtype=np.int64),
        np.array(days, dtype=np.int64),
        np.array(num, dtype=np.float64),
        np.array(den, dtype=np.float64),
    )


def _load_requests(
    conn: Connection, data: Dataset, index: Mapping[str, int], scope: list[Any], regeneration_window_s: float
) -> None:
    r = requests.c
    next_same_prompt = sa.func.lead(r.ts).over(partition_by=(r.user_hash, r.prompt_hash), order_by=r.ts)
    flagged = (
        sa.select(
            r.user_hash,
            r.variant,
            r.ts,
            r.status,
            r.error,
            r.completion_tokens,
            r.endpoint,
            r.latency_ms,
            r.cost_usd,
            sa.case(
                (sa.and_(r.prompt_hash.is_not(None), next_same_prompt - r.ts <= regeneration_window_s), 1), else_=0
            ).label("regenerated"),
        )
        .where(*scope)
        .subquery()
    )
    f = flagged.c
    ok = f.status == 200
    # A 200 with an error is a failure the client did not see as one: a stream broken off with an
    # in-band error event, or a treatment call answered by the control (fallback_to_control).
    failed = sa.or_(sa.and_(f.status != 200, f.status != CLIENT_CLOSED), sa.and_(ok, f.error.is_not(None)))
    empty = sa.and_(ok, f.completion_tokens == 0, f.endpoint != "embeddings")
    rows = conn.execute(
        sa.select(
            f.user_hash,
            f.variant,
            _day(conn, f.ts, data.window.since).label("day"),
            sa.func.count(),
            sa.func.sum(sa.case((failed, 1), else_=0)),
            sa.func.sum(sa.case((empty, 1), else_=0)),
            sa.func.sum(sa.case((ok, 1), else_=0)),
            sa.func.sum(sa.case((ok, f.latency_ms), else_=0.0)),
            sa.func.sum(f.cost_usd),
            sa.func.sum(f.regenerated),
        ).group_by(f.user_hash, f.variant, "day")
    ).all()
    cols: dict[str, tuple[list[float], list[float]]] = {
        name: ([], []) for name in ("error", "empty_response", "latency_mean", "cost_per_query", "regenerated")
    }
    users: list[int] = []
    days: list[int] = []
    crossed: set[str] = set()
    member_of = _arm_member(data, index)
    for user_hash, variant, day, n, errors, empties, oks, latency, cost, regenerated in rows:
        data.requests_by_variant[variant] = data.requests_by_variant.get(variant, 0) + n
        if user_hash is None:
            continue
        user = member_of(user_hash, variant)
        if user is None:
            crossed.add(user_hash)
            continue
        users.append(user)
        days.append(day)
        for name, (num, den) in (
            ("error", (errors, n)),
            ("empty_response", (empties, n)),
            ("latency_mean", (latency, oks)),
            ("cost_per_query", (cost, n)),
            ("regenerated", (regenerated, n)),
        ):
            cols[name][0].append(float(num or 0))
            cols[name][1].append(float(den or 0))
    data.crossover_users = len(crossed)
    for name, (num, den) in cols.items():
        data.requests[name] = _observations(users, days, num, den)


def _load_episodes(conn: Connection, data: Dataset, index: Mapping[str, int], scope: list[Any]) -> None:
    r = requests.c
    per_episode = (
        sa.select(r.user_hash, r.variant, sa.func.min(r.ts).label("started"), sa.func.count().label("turns"))
        .where(*scope, r.user_hash.is_not(None), r.episode_id.is_not(None))
        .group_by(r.user_hash, r.variant, r.episode_id)
        .subquery()
    )
    e = per_episode.c
    rows = conn.execute(
        sa.select(
            e.user_hash,
            e.variant,
            _day(conn, e.started, data.window.since).label("day"),
            sa.func.count(),
            sa.func.sum(e.turns),
        ).group_by(e.user_hash, e.variant, "day")
    ).all()
    users, days, num, den = [], [], [], []
    member_of = _arm_member(data, index)
    for user_hash, variant, day, episodes, turns in rows:
        user = member_of(user_hash, variant)
        if user is not None:
            users.append(user)
            days.append(day)
            num.append(float(turns))
            den.append(float(episodes))
    data.requests["turns_per_episode"] = _observations(users, days, num, den)


def _load_request_feedback(conn: Connection, data: Dataset, index: Mapping[str, int], scope: list[Any]) -> None:
    r, fb = requests.c, feedback.c
    rows = conn.execute(
        sa.select(
            r.user_hash,
            r.variant,
            _day(conn, r.ts, data.window.since).label("day"),
            fb.metric,
            sa.func.sum(fb.value),
            sa.func.count(),
        )
        .select_from(feedback.join(requests, fb.request_id == r.request_id))
        .where(*scope, fb.level == "request", r.user_hash.is_not(None))
        .group_by(r.user_hash, r.variant, "day", fb.metric)
    ).all()
    by_metric: dict[str, tuple[list[int], list[int], list[float], list[float]]] = {}
    member_of = _arm_member(data, index)
    for user_hash, variant, day, metric, total, count in rows:
        user = member_of(user_hash, variant)
        if user is None:
            continue
        users, days, num, den = by_metric.setdefault(metric, ([], [], [], []))
        users.append(user)
        days.append(day)
        num.append(float(total))
        den.append(float(count))
    data.request_feedback = {metric: _observations(*cols) for metric, cols in by_metric.items()}


def _load_user_feedback(
    conn: Connection, data: Dataset, index: Mapping[str, int], experiment: str, window: Window
) -> None:
    fb = feedback.c
    rows = conn.execute(
        sa.select(fb.user_hash, fb.metric, fb.value, fb.experiment, _day(conn, fb.ts, window.since)).where(
            fb.level == "user",
            sa.or_(fb.experiment == experiment, fb.experiment.is_(None)),
            fb.ts < window.until,
        )
    ).all()
    # A value scoped to this experiment beats one sent for the user in general.
    chosen: dict[tuple[str, int], tuple[bool, float, int]] = {}
    for user_hash, metric, value, scoped_to, day in rows:
        user = index.get(user_hash)
        if user is None:
            continue
        scoped = scoped_to is not None
        key = (metric, user)
        if key not in chosen or (scoped and not chosen[key][0]):
            chosen[key] = (scoped, float(value), max(int(day), int(data.first_day[user])))
    by_metric: dict[str, tuple[list[int], list[int], list[float], list[float]]] = {}
    for (metric, user), (_scoped, value, day) in sorted(chosen.items()):
        users, days, num, den = by_metric.setdefault(metric, ([], [], [], []))
        users.append(user)
        days.append(day)
        num.append(value)
        den.append(1.0)
    data.user_feedback = {metric: _observations(*cols) for metric, cols in by_metric.items()}


def _load_latencies(conn: Connection, data: Dataset, index: Mapping[str, int], scope: list[Any]) -> None:
    """Every answered request's latency (and TTFT), per variant, crossovers left out.

    The one query whose rows number requests, not users: the latency guardrails' percentiles are
    exact over all of them (`stats.percentile_bootstrap`). So its rows skip SQLAlchemy's Row objects
    (the DBAPI cursor's tuples, in C) and Python's per-row loop: each column becomes a numpy array
    and the crossover test one vectorised comparison. Same rows, same order, same arrays as a loop
    over them would build, at a fraction of the cost (10M requests: seconds, not tens of seconds).
    """
    r = requests.c
    # The variant as 1 (treatment), 0 (control) or -1 (neither): compared as integers, not strings.
    arm = sa.case((r.variant == "treatment", 1), (r.variant == "control", 0), else_=-1)
    result = conn.execute(sa.select(r.user_hash, arm, r.latency_ms, r.ttft_ms).where(*scope, r.status == 200))
    cursor = result.cursor
    chunks: list[Sequence[Any]] = []
    try:
        while rows := cursor.fetchmany(_FETCH_ROWS):
            chunks.append(rows)
    finally:
        result.close()
    rows = [row for chunk in chunks for row in chunk]
    del chunks
    # A list per column (zip(*rows) would build a tuple per row: 7x slower on a million rows).
    hashes, arms, latencies, ttfts = ([row[k] for row in rows] for k in range(4))
    del rows
    # Per row only C-level work (map over dict.get, numpy conversions): None becomes -1 (no user,
    # never a member) or NaN (no value), as the loop it replaces skipped them.
    user = np.fromiter(map(index.get, hashes, repeat(-1)), np.int64, len(hashes))
    treated = np.array(arms, dtype=np.int8)
    known = (user >= 0) & (treated >= 0)
    member = known.copy()
    member[known] = data.treatment[user[known]] == (treated[known] == 1)
    latency = np.array(latencies, dtype=np.float64)
    ttft = np.array(ttfts, dtype=np.float64)
    data.latency_ms, data.ttft_ms = {}, {}
    for variant, flag in (("control", 0), ("treatment", 1)):
        mine = member & (treated == flag)
        data.latency_ms[variant] = latency[mine]
        ttft_mine = ttft[mine]
        data.ttft_ms[variant] = ttft_mine[~np.isnan(ttft_mine)]


_FETCH_ROWS = 100_000
