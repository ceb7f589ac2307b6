"""The report's rollup (proxy/store/rollup.py): a report read from it equals the report read from
the raw rows, on SQLite and PostgreSQL, whatever the window, and a late event is never missed."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from proxy.analysis import columnar
from proxy.analysis.dataset import Dataset, Observations, Window, load, user_feedback_select
from proxy.analysis.render import to_json
from proxy.analysis.report import build_report
from proxy.store import rollup
from proxy.store.db import Store, engine_for, migrate, request_row
from proxy.store.schema import requests, rollup_days, rollup_requests
from tests.harness import PostgresServer
from tests.synthetic import DAY, EXPERIMENT, Scenario, generate
from tests.test_report import _settings
from tests.test_store import request_event

W = 120.0  # the settings' regeneration window (feedback.regeneration_window_s)
NOW = time.time()
T0 = NOW - 9.5 * DAY


@pytest.fixture(autouse=True)
def _sqlite_read_by_a_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """These stores are small: read them as a large SQLite file is read, by a child process
    through SQLite's ADBC driver (proxy/analysis/columnar.py), so the tests cover that path."""
    monkeypatch.setattr(columnar, "SQLITE_CHILD_MIN_BYTES", 0)


def _events() -> list[dict[str, Any]]:
    """Crossovers (the rollout rises on day 3), regenerations, episodes of three turns 0.2 days
    apart (many cross midnight), every third request a stream with its TTFT."""
    scenario = Scenario(users=400, days=9, schedule=[(0, 20.0), (3, 50.0)], requests_per_user=(2, 8),
                        regenerate_share=0.15, episode_turns=3, seed=11)  # fmt: skip
    events = generate(scenario, T0)
    for i, event in enumerate(events):
        if "kind" not in event and i % 3 == 0 and event["status"] == 200:
            event["stream"], event["ttft_ms"] = True, event["latency_ms"] / 3
    return events


def _store(url: str, events: list[dict[str, Any]]) -> Engine:
    engine = engine_for(url)
    migrate(engine)
    store = Store(engine, regeneration_window_s=W)
    for i in range(0, len(events), 3000):
        store.write(events[i : i + 3000])
    return engine


def _report(engine: Engine, **window: Any) -> dict[str, Any]:
    settings = _settings(primary_metric="task_completed", mde=0.05)
    with engine.connect() as conn:
        return to_json(build_report(conn, settings, EXPERIMENT, now=NOW, **window))


def _same_report(a: Any, b: Any) -> bool:
    """Equal, floats to 1e-9 relative: the database sums a user-day's values in the order it reads
    them, which differs between a day's build and a live read in the last bits."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_report(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_report(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _dataset(engine: Engine, since: float, until: float) -> Dataset:
    with engine.connect() as conn:
        return load(conn, EXPERIMENT, Window(since, until), regeneration_window_s=W)


def _plan(engine: Engine, since: float, until: float) -> rollup.Plan:
    with engine.connect() as conn:
        return rollup.plan(conn, EXPERIMENT, since, until, W)


def _sums(obs: Observations) -> dict[tuple[int, int, str], float]:
    """An observation set as per (user, day) sums: rows may be split differently, sums may not
    (compared with a float tolerance: the database adds them in whatever order it reads them)."""
    out: dict[tuple[int, int, str], float] = {}
    columns = (obs.user.tolist(), obs.day.tolist(), obs.num.tolist(), obs.den.tolist())
    for user, day, num, den in zip(*columns, strict=True):
        out[user, day, "num"] = out.get((user, day, "num"), 0.0) + num
        out[user, day, "den"] = out.get((user, day, "den"), 0.0) + den
    return out


def _assert_same(a: Dataset, b: Dataset) -> None:
    assert a.users == b.users
    assert a.treatment.tolist() == b.treatment.tolist()
    assert a.first_day.tolist() == b.first_day.tolist()
    assert a.expected_treatment.tolist() == b.expected_treatment.tolist()
    assert (a.requests_by_variant, a.unidentified_requests, a.crossover_users) == (
        b.requests_by_variant, b.unidentified_requests, b.crossover_users)
    for part in ("requests", "request_feedback", "user_feedback"):
        ours, theirs = getattr(a, part), getattr(b, part)
        assert sorted(ours) == sorted(theirs), part
        for name in ours:
            assert _sums(ours[name]) == pytest.approx(_sums(theirs[name]), rel=1e-12, abs=1e-12), (part, name)
    for part in ("latency_ms", "ttft_ms"):
        for variant in ("control", "treatment"):
            assert np.array_equal(getattr(a, part)[variant], getattr(b, part)[variant]), (part, variant)


WINDOWS = {
    "default": (None, None),  # the experiment's first request to now: its first and last days cut
    "cut": (T0 + 2.5 * DAY, T0 + 7.3 * DAY),  # both ends inside days that hold requests outside it
    "aligned": (rollup.utc_day(T0 + 2 * DAY) * DAY, rollup.utc_day(T0 + 8 * DAY) * DAY),
}


def test_a_rolled_up_report_equals_the_raw_one(store_url: str) -> None:
    engine = _store(store_url, _events())
    try:
        raw = {name: _report(engine, since=since, until=until) for name, (since, until) in WINDOWS.items()}
        raw_data = _dataset(engine, T0, NOW)
        assert _plan(engine, T0, NOW).rolled == []  # nothing built yet: all of it live
        built = rollup.build_due(engine, W, now=NOW)
        assert len(built) >= 9
        plan = _plan(engine, T0, NOW)
        assert len(plan.rolled) >= 8 and plan.live  # today at least stays live
        for name, (since, until) in WINDOWS.items():
            assert _same_report(_report(engine, since=since, until=until), raw[name]), name
        _assert_same(_dataset(engine, T0, NOW), raw_data)
        # What the data holds, so equality is not of two empty reports.
        assert raw_data.crossover_users > 0
        assert raw_data.requests["regenerated"].num.sum() > 0
        assert raw_data.requests["turns_per_episode"].num.sum() > raw_data.requests["turns_per_episode"].den.sum()
        assert all(len(raw_data.ttft_ms[v]) > 0 for v in ("control", "treatment"))
        cut = _plan(engine, *WINDOWS["cut"])  # type: ignore[arg-type]
        assert cut.rolled and cut.live[0].since == WINDOWS["cut"][0] and cut.live[-1].until == WINDOWS["cut"][1]
    finally:
        engine.dispose()


def test_a_late_event_makes_its_day_live_until_it_is_rebuilt(store_url: str) -> None:
    events = _events()
    engine = _store(store_url, events)
    try:
        rollup.build_due(engine, W, now=NOW)
        day = rollup.utc_day(T0 + 4 * DAY)
        answered = [e for e in events if "kind" not in e and e["status"] == 200 and rollup.utc_day(e["ts"]) == day]
        before = _dataset(engine, T0, NOW)
        late = {"kind": "feedback", "ts": NOW, "feedback_id": "fb_late", "level": "request",
                "request_id": answered[0]["request_id"], "user_hash": None, "experiment": None,
                "metric": "escalated", "value": 1.0, "episode_id": None}  # fmt: skip
        Store(engine, regeneration_window_s=W).write([late])
        assert day not in _plan(engine, T0, NOW).rolled  # the day is read live now
        live = _dataset(engine, T0, NOW)
        assert "escalated" not in before.request_feedback
        assert live.request_feedback["escalated"].den.sum() == 1
        assert rollup.build_due(engine, W, now=NOW) == [(EXPERIMENT, day)]  # only that day is rebuilt
        assert day in _plan(engine, T0, NOW).rolled
        _assert_same(_dataset(engine, T0, NOW), live)
        # A late request marks its day too.
        request = dict(answered[1], request_id=os.urandom(20).hex(), ts=answered[1]["ts"] + 1)
        Store(engine, regeneration_window_s=W).write([request])
        assert day not in _plan(engine, T0, NOW).rolled
        assert _dataset(engine, T0, NOW).requests_by_variant[request["variant"]] == (
            live.requests_by_variant[request["variant"]] + 1)
    finally:
        engine.dispose()


def test_a_regeneration_after_midnight_is_counted_on_the_day_before(store_url: str) -> None:
    """Its same prompt again 50 s later, past midnight: the first request was regenerated. Sent
    after the day before was built, the repeat marks that day, whose rebuild then counts it."""
    midnight = rollup.utc_day(T0 + 3 * DAY) * DAY
    base = {"experiment": EXPERIMENT, "variant": "control", "user_hash": "u-night", "rollout_percent": 20.0,
            "status": 200, "latency_ms": 500.0, "completion_tokens": 10, "endpoint": "chat.completions",
            "prompt_hash": "p-night"}  # fmt: skip
    engine = _store(store_url, [dict(base, request_id="a" * 40, ts=midnight - 20)])
    try:
        rollup.build_due(engine, W, now=NOW)
        day_before = rollup.utc_day(midnight - 20)
        assert _regenerated(engine, day_before) == 0
        Store(engine, regeneration_window_s=W).write([dict(base, request_id="b" * 40, ts=midnight + 30)])
        assert day_before not in _plan(engine, T0, NOW).rolled
        assert _dataset(engine, T0, NOW).requests["regenerated"].num.sum() == 1
        assert (EXPERIMENT, day_before) in rollup.build_due(engine, W, now=NOW)
        assert _regenerated(engine, day_before) == 1
        assert _dataset(engine, T0, NOW).requests["regenerated"].num.sum() == 1
    finally:
        engine.dispose()


def _regenerated(engine: Engine, day: int) -> int:
    with engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.sum(rollup_requests.c.regenerated)).where(rollup_requests.c.day == day))
        return int(total.scalar() or 0)


def test_the_latency_sample_is_the_lowest_keys_of_the_window(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a sample of 40 per variant: the 40 answered requests with the lowest keys over the
    whole window (computed here from the events), rolled up or not, crossovers then left out."""
    monkeypatch.setattr(rollup, "SAMPLE_SIZE", 40)
    events = _events()
    engine = _store(store_url, events)
    try:
        live = _dataset(engine, T0, NOW)
        rollup.build_due(engine, W, now=NOW)
        rolled = _dataset(engine, T0, NOW)
        requests = [e for e in events if "kind" not in e]
        first: dict[str, str] = {}
        for e in sorted(requests, key=lambda e: (e["ts"], e["request_id"])):
            first.setdefault(e["user_hash"], e["variant"])
        for variant in ("control", "treatment"):
            answered = sorted((e for e in requests if e["status"] == 200 and e["variant"] == variant),
                              key=lambda e: (e["request_id"][8:], e["request_id"]))[:40]  # fmt: skip
            expected = [e["latency_ms"] for e in answered if first[e["user_hash"]] == variant]
            assert 0 < len(expected) <= 40
            assert live.latency_ms[variant].tolist() == expected
            assert rolled.latency_ms[variant].tolist() == expected
    finally:
        engine.dispose()


def test_a_day_is_built_only_once_it_is_over(store_url: str) -> None:
    engine = _store(store_url, _events())
    try:
        today = rollup.utc_day(NOW)
        with engine.connect() as conn:
            due = rollup.due(conn, W, NOW, settle_s=0.0)
            assert due and all(day < today for _, day in due)
            # The day before today waits for the regeneration window and the settle time past midnight.
            assert all(day < rollup.utc_day(NOW - W - 3600) for _, day in rollup.due(conn, W, NOW, settle_s=3600))
        rollup.build_due(engine, W, now=NOW)
        with engine.connect() as conn:
            assert rollup.due(conn, W, NOW, settle_s=0.0) == []
            # Another regeneration window makes every built day due again.
            assert len(rollup.due(conn, 300.0, NOW, settle_s=0.0)) == len(due)
    finally:
        engine.dispose()


def test_the_cli_builds_the_due_days(store_url: str, tmp_path: Any) -> None:
    engine = _store(store_url, _events())
    config = tmp_path / "abproxy.yaml"
    config.write_text(
        "upstreams: {u: {base_url: 'http://127.0.0.1:9/v1'}}\n"
        "models: {base: {upstream: u, model: m}, finetuned: {upstream: u, model: 'ft:m'}}\n"
        f"experiments: {{{EXPERIMENT}: {{aliases: [{EXPERIMENT}], control: base, treatment: finetuned, salt: s}}}}\n"
    )
    try:
        done = subprocess.run([sys.executable, "-m", "proxy", "store", "rollup", "--config", str(config),
                               "--store", store_url, "--settle-s", "0"],
                              capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        with engine.connect() as conn:
            built = conn.execute(sa.select(sa.func.count()).where(rollup_days.c.built_gen == rollup_days.c.gen))
            n = int(built.scalar_one())
        assert n >= 9 and f"rollup: {n} day(s) built" in done.stdout
    finally:
        engine.dispose()


def test_days_loaded_around_the_writer_are_entered_by_a_scan(store_url: str) -> None:
    """Rows inserted without Store.write (a bulk load, a restore) mark no day: --scan enters them."""
    engine = _store(store_url, [])
    events = [e for e in _events() if "kind" not in e]
    try:
        with engine.begin() as conn:
            conn.execute(requests.insert(), [request_row(e) for e in events if request_row(e) is not None])
        with engine.connect() as conn:
            assert rollup.due(conn, W, NOW, settle_s=0.0) == []
        raw = _dataset(engine, T0, NOW)
        with engine.begin() as conn:
            entered = rollup.enter_stored_days(conn)
        with engine.begin() as conn:
            assert rollup.enter_stored_days(conn) == 0  # only what is missing
        stored = {rollup.utc_day(e["ts"]) for e in events}
        assert entered == len(stored)
        built = rollup.build_due(engine, W, now=NOW)
        assert {day for _, day in built} == {day for day in stored if day < rollup.utc_day(NOW - W)}
        assert _plan(engine, T0, NOW).rolled
        _assert_same(_dataset(engine, T0, NOW), raw)
    finally:
        engine.dispose()


def test_two_builds_of_one_day_at_once_count_it_once(store_url: str) -> None:
    """Two collectors building the same day together: one waits for the other, then finds it
    current and skips (or, forced, replaces its rows); never both sets of rows."""
    engine = _store(store_url, _events())
    try:
        raw = _dataset(engine, T0, NOW)
        day = rollup.utc_day(T0 + 4 * DAY)
        start = threading.Barrier(4)
        results: list[bool] = []

        def build(force: bool) -> None:
            start.wait()
            results.append(rollup.build_day(engine, EXPERIMENT, day, W, NOW, force=force))

        threads = [threading.Thread(target=build, args=(force,)) for force in (False, False, True, True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results.count(True) >= 2  # both forced builds ran; at most one unforced one did
        rollup.build_due(engine, W, now=NOW)
        with engine.connect() as conn:
            rows = conn.execute(sa.select(sa.func.sum(rollup_requests.c.requests)).where(rollup_requests.c.day == day))
            stored = conn.execute(sa.select(sa.func.count()).select_from(requests).where(
                requests.c.ts >= day * DAY, requests.c.ts < (day + 1) * DAY)).scalar_one()  # fmt: skip
        assert rows.scalar_one() == stored
        _assert_same(_dataset(engine, T0, NOW), raw)
    finally:
        engine.dispose()


def test_a_store_before_the_rollup_is_read_raw(store_url: str) -> None:
    """Code upgraded, store not yet migrated (no collector restarted): the report still reads it,
    from the raw rows, and gives what it gives after the migration and a build."""
    from alembic import command

    from proxy.store.db import _alembic_config

    events = [e for e in _events() if "kind" not in e]
    engine = engine_for(store_url)
    try:
        with engine.begin() as conn:
            command.upgrade(_alembic_config(conn), "0004")
        with engine.begin() as conn:
            conn.execute(requests.insert(), [row for row in map(request_row, events) if row is not None])
        before = _dataset(engine, T0, NOW)
        assert sum(before.requests_by_variant.values()) == len(events)
        migrate(engine)
        rollup.build_due(engine, W, now=NOW)
        assert _plan(engine, T0, NOW).rolled
        _assert_same(_dataset(engine, T0, NOW), before)
    finally:
        engine.dispose()


def test_an_in_memory_store_is_read_on_its_one_connection() -> None:
    """A report reads its episodes on a second connection, which would find another, empty
    in-memory database (no such table): in memory, all of it is read on the caller's."""
    engine = engine_for("sqlite://")
    migrate(engine)
    Store(engine).write([
        request_event(f"r{i}", user_hash=f"u{i % 3}", ts=T0 + i, variant="control", rollout_percent=50.0,
                      episode_id=f"e{i % 2}")
        for i in range(6)
    ])  # fmt: skip
    with engine.connect() as conn:
        data = load(conn, EXPERIMENT, Window(T0, T0 + 100), regeneration_window_s=W)
    turns = data.requests["turns_per_episode"]
    assert (turns.num.sum(), turns.den.sum()) == (6, 6)  # each user's 2 requests: one per episode


def test_user_level_feedback_is_read_through_its_partial_index(store_url: str) -> None:
    """The report's read of user-level feedback as it runs (bound parameters and all) takes
    ix_feedback_user_level (migration 0007), not a scan of every feedback row."""
    engine = _store(store_url, _events())
    try:
        with engine.begin() as conn:
            select = user_feedback_select(conn, EXPERIMENT, Window(T0, NOW))
            compiled = select.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
            if conn.dialect.name == "postgresql":  # its planner scans a table this small: say what it may use
                conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
                plan = conn.exec_driver_sql("EXPLAIN " + compiled.string, compiled.params).scalars().all()
            else:
                params = tuple(compiled.params[name] for name in compiled.positiontup or ())
                plan = [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + compiled.string, params)]
            assert any("ix_feedback_user_level" in line for line in plan), plan
            assert len(conn.execute(select).all()) > 0  # the events hold user-level feedback
    finally:
        engine.dispose()


@pytest.mark.parametrize("cpus", [{0}, {0, 1}])
def test_sqlite_is_read_at_once_only_with_a_second_cpu(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, cpus: set[int]
) -> None:
    """A large SQLite file is read by child processes (proxy/analysis/columnar.py): on one CPU one
    child reads the parts in turn (five would each load pyarrow and the driver on that core), with
    two each part has a child of its own. A small file is read by this process. The same data."""
    engine = _store(f"sqlite:///{tmp_path}/store.db", _events())
    try:
        rollup.build_due(engine, W, now=NOW)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
        reference = _dataset(engine, T0, NOW)
        children: list[object] = []
        real_init = columnar._SqliteReader.__init__

        def counting_init(self: Any, engine: Engine) -> None:
            children.append(engine)
            real_init(self, engine)

        monkeypatch.setattr(columnar._SqliteReader, "__init__", counting_init)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cpus)
        data = _dataset(engine, T0, NOW)
        assert len(children) == (1 if len(cpus) == 1 else 5)
        monkeypatch.setattr(columnar, "SQLITE_CHILD_MIN_BYTES", 1 << 40)  # a small file: no child
        _assert_same(_dataset(engine, T0, NOW), reference)
        assert len(children) == (1 if len(cpus) == 1 else 5)
        _assert_same(data, reference)
        assert data.requests["turns_per_episode"].den.sum() > 0 and data.request_feedback
    finally:
        engine.dispose()


def test_a_build_leaves_the_rollup_vacuumed_on_postgresql(postgres_server: PostgresServer) -> None:
    """A rebuilt day's old rows are dead until a vacuum, and the report's index-only read of the
    episodes would visit the table for every row: build_due vacuums what it rebuilt."""
    engine = _store(postgres_server.create_schema(f"t_{uuid.uuid4().hex[:16]}"), _events())
    try:
        rollup.build_due(engine, W, now=NOW)
        with engine.connect() as conn:
            day = conn.execute(sa.select(sa.func.min(rollup_days.c.day))).scalar_one()
        assert rollup.build_day(engine, EXPERIMENT, day, W, NOW, force=True)  # its rows deleted and inserted again
        rollup.tidy(engine)
        with engine.connect() as conn:
            vacuumed = conn.execute(sa.text(
                "SELECT relname, n_dead_tup, last_vacuum IS NOT NULL FROM pg_stat_user_tables "
                "WHERE schemaname = current_schema() AND relname LIKE :rollup ESCAPE '!'"
            ), {"rollup": "rollup!_%"}).all()  # fmt: skip
        assert len(vacuumed) == 6 and all(dead == 0 and done for _, dead, done in vacuumed), vacuumed
    finally:
        engine.dispose()


def test_the_episodes_of_past_days_are_read_per_user_and_day(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A window of rolled-up days reads its episodes from rollup_episode_days (users x days) and the
    fragments continuing an episode begun before the window, never regrouping fragments by episode
    (at 10M requests, 3.3M of them: 5.9 s of SQLite's report). The window starts after episodes
    that continue into it, so both parts are read and equal the raw rows' count."""
    engine = _store(store_url, _events())
    try:
        rollup.build_due(engine, W, now=NOW)
        since, until = WINDOWS["aligned"]
        assert since is not None and until is not None
        assert _plan(engine, since, until).live == []  # every day from the rollup
        with engine.connect() as conn:
            continued = conn.execute(sa.text(
                "SELECT count(*) FROM rollup_episodes WHERE prev_day < :first AND day >= :first"
            ), {"first": rollup.utc_day(since)}).scalar()  # fmt: skip
        assert continued and continued > 0
        reads: list[str] = []
        for reader in (columnar._SqliteReader, columnar._PostgresReader):
            real_table = reader.table

            def recording_table(self: Any, selects: Any, real: Any = real_table) -> Any:
                reads.extend(str(select) for select in selects)
                return real(self, selects)

            monkeypatch.setattr(reader, "table", recording_table)
        rolled = _dataset(engine, since, until)
        [days, continuing] = [read for read in reads if "rollup_episode" in read]
        assert "FROM rollup_episode_days" in days and "GROUP BY" not in days
        assert "prev_day" in continuing and "episode_id" not in continuing
        monkeypatch.undo()
        with engine.begin() as conn:  # the same window from the raw rows
            conn.execute(sa.update(rollup_days).values(built_gen=None))
        raw = _dataset(engine, since, until)
        assert _sums(rolled.requests["turns_per_episode"]) == _sums(raw.requests["turns_per_episode"])
    finally:
        engine.dispose()


def test_a_late_request_joining_an_episode_marks_the_days_it_continues_on(store_url: str) -> None:
    """An episode begun on day 5 and continued on day 6, both built. A late request of it on day 4
    moves its beginning: day 4 is rebuilt, and day 5, whose fragment now continues it, is marked
    not current in the same transaction (its episode is counted once, on day 4). A late request of
    an episode day 4 already holds marks no other day."""
    engine = _store(store_url, [])
    user = "u-late"
    base = rollup.utc_day(T0) * DAY + 4 * DAY
    stored = [dict(request_event(f"r{i}", ts=base + DAY * (1 + i // 2) + 3600 * (1 + i % 2)),
                   user_hash=user, episode_id="ep-1", experiment=EXPERIMENT) for i in range(4)]  # fmt: skip
    other = dict(request_event("r-other", ts=base + 7200), user_hash=user, episode_id="ep-0", experiment=EXPERIMENT)
    Store(engine, regeneration_window_s=W).write([*stored, other])
    try:
        rollup.build_due(engine, W, now=NOW)
        day4, day5 = rollup.utc_day(base), rollup.utc_day(base) + 1
        window = (base, base + 3 * DAY)
        before = _dataset(engine, *window).requests["turns_per_episode"]
        assert (before.num.sum(), before.den.sum()) == (5, 2)
        assert _sums(before)[0, 1, "den"] == 1  # ep-1 begins on day 5 (the window's day 1)
        Store(engine, regeneration_window_s=W).write(
            [dict(other, request_id="r-late", ts=base + 9000, episode_id="ep-1")])
        assert day4 not in _plan(engine, *window).rolled
        # day 5 is marked by day 4's build, and built in the same call; day 6 continues from day 5
        assert rollup.build_due(engine, W, now=NOW) == [(EXPERIMENT, day4), (EXPERIMENT, day5)]
        assert _plan(engine, *window).live == []
        after = _dataset(engine, *window).requests["turns_per_episode"]
        assert (after.num.sum(), after.den.sum()) == (6, 2)
        assert _sums(after)[0, 0, "den"] == 2 and _sums(after)[0, 1, "den"] == 0
        with engine.begin() as conn:  # the raw rows count the same
            conn.execute(sa.update(rollup_days).values(built_gen=None))
        assert _sums(_dataset(engine, *window).requests["turns_per_episode"]) == _sums(after)
        rollup.build_due(engine, W, now=NOW)
        Store(engine, regeneration_window_s=W).write(
            [dict(other, request_id="r-late-2", ts=base + 9500, episode_id="ep-1")])
        assert rollup.build_due(engine, W, now=NOW) == [(EXPERIMENT, day4)]
    finally:
        engine.dispose()
