"""Scenario 7's stores: a PostgreSQL cluster started for the run, and realistic data to fill them.

`Postgres` is a cluster in a directory of its own, started through `Processes` (pinned, stopped
with the suite) as the `postgres` user when run as root, with PostgreSQL's defaults for
durability (fsync and synchronous_commit on): a collector's commit waits for the WAL flush, as it
would in production. `Requests` is a seeded, vectorised simulation of one experiment's traffic
(users with uneven activity over 14 days, a rollout raised from 10 % to 50 % on day 3 so some users
cross over, errors, client aborts, streaming, regenerations, episodes, request- and user-level
feedback), shaped like the proxy's own events (`proxy/routes_openai.py` `_record`). The same
arrays give the collector's stream entries and the rows bulk-loaded for `abproxy report`.
"""

from __future__ import annotations

import binascii
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import psycopg

from bench.procs import LOAD_CPU, Processes, free_port, log, proc_stats
from proxy.assignment import bucket
from proxy.event_stream import entry_fields

EXPERIMENT = "sales-companion"
SALT = "sales-v2"
DAY_S = 86_400.0
DAYS = 14
T0 = 1_767_225_600.0  # 2026-01-01 00:00 UTC: a fixed window, passed to the report as --since/--until
ROLLOUT = ((0.0, 10.0), (3.0, 50.0))  # (from day, treatment percent)
REQUESTS_PER_USER = 40  # mean over the window: 10M requests come from 250,000 users
# Bump when the data below changes: cached databases of an older version are rebuilt.
DATA_VERSION = "1"

PRICING = {"control": (0.15, 0.60), "treatment": (0.30, 1.20)}  # $ per 1M input, output tokens
MODELS = {"control": ("base", "gpt-4o-mini"), "treatment": ("finetuned", "ft:gpt-4o-mini:acme:sales-v2:abc123")}
REQUEST_COLUMNS = (
    "request_id", "ts", "experiment", "variant", "model", "upstream_model", "user_hash", "bucket",
    "rollout_percent", "episode_id", "endpoint", "stream", "status", "upstream_status", "error", "finish_reason",
    "latency_ms", "ttft_ms", "prompt_tokens", "completion_tokens", "cost_usd", "prompt_hash", "client_request_id",
    "prompt", "completion",
)  # fmt: skip
FEEDBACK_COLUMNS = ("subject", "metric", "level", "request_id", "user_hash", "experiment", "value", "episode_id",
                    "ts", "feedback_id")  # fmt: skip


# -- PostgreSQL ---------------------------------------------------------------------------------
def postgres_bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("PostgreSQL not found: apt-get install -y postgresql")
    return Path(initdb).parent


class Postgres:
    """A cluster in `root`/data on 127.0.0.1, trust auth. initdb on first use; the data is kept
    (a cache directory serves the next run as it is)."""

    def __init__(self, procs: Processes, root: Path, *, cpu: str = LOAD_CPU, settings: dict[str, str] | None = None):
        self.procs, self.root, self.cpu = procs, root, cpu
        self.bindir = postgres_bindir()
        self.data = root / "data"
        self.port = 0
        self.settings = settings or {}
        self.as_postgres = os.geteuid() == 0  # PostgreSQL refuses to run as root

    def _user_argv(self) -> list[str]:
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"] if self.as_postgres else []

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.as_postgres:
            # The server must reach its directory: every parent traversable, the cluster its own.
            for parent in [self.root, *self.root.parents]:
                if parent == Path("/"):
                    break
                parent.chmod(parent.stat().st_mode | 0o111)
            shutil.chown(self.root, "postgres", "postgres")
        if not (self.data / "PG_VERSION").exists():
            argv = [*self._user_argv(), str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                    "--auth=trust", "-E", "UTF8", "--locale=C"]  # fmt: skip
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"initdb failed:\n{done.stdout}\n{done.stderr}")
        self.port = free_port()
        argv = [*self._user_argv(), str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}"]  # fmt: skip
        for name, value in self.settings.items():
            argv += ["-c", f"{name}={value}"]
        self.procs.start(f"postgres-{self.port}", argv, cpu=self.cpu)
        deadline = time.monotonic() + 60
        while True:
            self.procs.check_alive()
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    @property
    def pid(self) -> int:
        return self.procs.pid(f"postgres-{self.port}")

    def stop(self) -> None:
        """Fast shutdown (SIGINT): clients are cut off, the data is checkpointed and kept."""
        proc = next((p for n, p in self.procs.procs if n == f"postgres-{self.port}"), None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            log("postgres did not stop within 60 s; left to the suite's cleanup")
            return
        # Stopped on purpose: no longer one of the processes whose exit is an error.
        self.procs.procs = [(n, p) for n, p in self.procs.procs if p is not proc]

    def cpu_seconds(self) -> float:
        """CPU of the whole server so far: the postmaster, its live backends and workers, and those that
        exited (which the postmaster reaped: its children's times)."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid, fields in proc_stats():
            if int(fields[2]) == self.pid:  # its process group: the postmaster and everything it forked
                total += int(fields[11]) + int(fields[12])
                if pid == self.pid:
                    total += int(fields[13]) + int(fields[14])
        return total / tick

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def execute(self, statement: str, database: str = "postgres") -> None:
        with psycopg.connect(self.dsn(database), autocommit=True) as conn:
            conn.execute(statement.encode())

    def databases(self) -> set[str]:
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}

    def recreate(self, database: str) -> str:
        self.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        self.execute(f'CREATE DATABASE "{database}"')
        return self.url(database)


# -- the simulated traffic ----------------------------------------------------------------------
@dataclass
class Requests:
    """`n` requests of one experiment as columns (numpy arrays), in time order."""

    n: int
    users: int
    user_hash: npt.NDArray[Any]  # per user, 16 hex characters as the proxy's UserHasher gives
    user: npt.NDArray[np.int64]  # per request: index into user_hash
    cols: dict[str, npt.NDArray[Any]]


def simulate(n: int, seed: int = 7) -> Requests:
    """`n` requests: each user's in a span of 1-10 days from a random start; Pareto-like activity."""
    rng = np.random.default_rng(seed)
    users = max(n // REQUESTS_PER_USER, 10)
    user_hash = np.array([f"{h:016x}" for h in rng.integers(0, 2**63, users)], dtype=object)
    buckets = np.array([bucket(SALT, h) for h in user_hash], dtype=np.int64)
    # Heavy-tailed activity: a few users send many requests, most send a few.
    weight = rng.pareto(2.0, users) + 0.2
    user = np.sort(rng.choice(users, size=n, p=weight / weight.sum()))
    start = rng.uniform(0, DAYS - 0.5, users)
    span = np.minimum(rng.uniform(1, 10, users), DAYS - start)
    day = start[user] + rng.random(n) * span[user]
    order = np.argsort(day, kind="stable")
    user, day = user[order], day[order]
    ts = T0 + day * DAY_S
    percent = np.full(n, ROLLOUT[0][1])
    for from_day, value in ROLLOUT[1:]:
        percent[day >= from_day] = value
    treated = buckets[user] < np.round(percent * 100)
    variant = np.where(treated, "treatment", "control").astype(object)

    u = rng.random(n)
    status = np.where(u < 0.01, 502, np.where(u < 0.013, 499, np.where(u < 0.016, 429, 200)))
    ok = status == 200
    stream = rng.random(n) < 0.3
    latency = rng.lognormal(np.log(np.where(treated, 840.0, 800.0)), 0.45)
    latency = np.where(status == 499, latency * 0.5, latency)
    ttft = np.where(stream & ok, latency * rng.uniform(0.15, 0.4, n), np.nan)
    prompt_tokens = rng.integers(20, 1500, n)
    completion_tokens = np.where(ok, np.where(rng.random(n) < 0.005, 0, rng.integers(10, 400, n)), 0)
    price_in = np.where(treated, PRICING["treatment"][0], PRICING["control"][0])
    price_out = np.where(treated, PRICING["treatment"][1], PRICING["control"][1])
    cost = np.round((prompt_tokens * price_in + completion_tokens * price_out) / 1e6, 10)
    # A regeneration: the same prompt as the user's previous request, a few seconds later.
    prompt_hash = np.array([f"{h:016x}" for h in rng.integers(0, 2**63, n)], dtype=object)
    same_user = np.r_[False, user[1:] == user[:-1]]
    regen = same_user & (rng.random(n) < 0.04)
    prompt_hash[regen] = prompt_hash[np.flatnonzero(regen) - 1]
    # Conversations of four turns: each user's requests in time order, four to an episode.
    by_user = np.lexsort((np.arange(n), user))
    first_of_user = np.searchsorted(user[by_user], user[by_user])
    turn = np.empty(n, np.int64)
    turn[by_user] = np.arange(n) - first_of_user
    episode = np.array(
        [f"ep-{u:x}-{t // 4:x}" for u, t in zip(user.tolist(), turn.tolist(), strict=True)], dtype=object
    )
    raw_ids = rng.bytes(20 * n)
    request_id = np.array([binascii.hexlify(raw_ids[20 * i : 20 * i + 20]).decode() for i in range(n)], dtype=object)
    cols: dict[str, npt.NDArray[Any]] = {
        "request_id": request_id, "ts": ts, "variant": variant, "user_hash": user_hash[user],
        "bucket": buckets[user], "rollout_percent": percent, "episode_id": episode, "stream": stream,
        "status": status, "latency_ms": np.round(latency, 3), "ttft_ms": np.round(ttft, 3),
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "cost_usd": cost,
        "prompt_hash": prompt_hash,
    }  # fmt: skip
    return Requests(n, users, user_hash, user, cols)


def request_row(r: Requests, i: int) -> tuple[Any, ...]:
    """Row `i` in REQUEST_COLUMNS order, as the collector's `request_row` would store the event."""
    c = r.cols
    variant = c["variant"][i]
    status = int(c["status"][i])
    ttft = float(c["ttft_ms"][i])
    model, upstream_model = MODELS[variant]
    return (
        c["request_id"][i], float(c["ts"][i]), EXPERIMENT, variant, model, upstream_model, c["user_hash"][i],
        int(c["bucket"][i]), float(c["rollout_percent"][i]), c["episode_id"][i], "chat.completions",
        bool(c["stream"][i]), status, None if status == 499 else status, "5xx" if status == 502 else
        ("client_closed" if status == 499 else ("rate_limited" if status == 429 else None)),
        "stop" if status == 200 else None, float(c["latency_ms"][i]), None if ttft != ttft else ttft,
        int(c["prompt_tokens"][i]), int(c["completion_tokens"][i]), float(c["cost_usd"][i]), c["prompt_hash"][i],
        None, None, None,
    )  # fmt: skip


def request_rows(r: Requests, start: int = 0, stop: int | None = None) -> Iterator[tuple[Any, ...]]:
    for i in range(start, r.n if stop is None else stop):
        yield request_row(r, i)


def feedback_rows(r: Requests, seed: int = 11) -> Iterator[tuple[Any, ...]]:
    """Request-level feedback on a share of the answered requests (task_completed 30 %, csat 10 %,
    escalated 3 %), and one user-level `returned` per user: FEEDBACK_COLUMNS order."""
    rng = np.random.default_rng(seed)
    c = r.cols
    ok = np.flatnonzero(c["status"] == 200)
    treated = c["variant"] == "treatment"
    ids = binascii.hexlify(rng.bytes(8 * (len(ok) + r.users))).decode()
    k = 0
    for metric, share in (("task_completed", 0.30), ("csat", 0.10), ("escalated", 0.03)):
        chosen = ok[rng.random(len(ok)) < share]
        if metric == "task_completed":
            values = (rng.random(len(chosen)) < np.where(treated[chosen], 0.74, 0.70)).astype(float)
        elif metric == "csat":
            values = np.clip(np.round(rng.normal(np.where(treated[chosen], 4.0, 3.8), 0.9)), 1, 5)
        else:
            values = (rng.random(len(chosen)) < 0.05).astype(float)
        delay = rng.uniform(5, 600, len(chosen))
        for i, value, wait in zip(chosen.tolist(), values.tolist(), delay.tolist(), strict=True):
            rid = c["request_id"][i]
            yield (f"req:{rid}", metric, "request", rid, c["user_hash"][i], EXPERIMENT, value, c["episode_id"][i],
                   float(c["ts"][i]) + wait, "fb_" + ids[16 * k : 16 * k + 16])  # fmt: skip
            k = (k + 1) % (len(ok) + r.users)
    returned = rng.random(r.users) < 0.5
    for u in range(r.users):
        yield (f"user:{EXPERIMENT}:{r.user_hash[u]}", "returned", "user", None, r.user_hash[u], EXPERIMENT,
               float(returned[u]), None, T0 + DAYS * DAY_S - 1, "fb_" + ids[16 * k : 16 * k + 16])  # fmt: skip
        k = (k + 1) % (len(ok) + r.users)


# -- as stream entries --------------------------------------------------------------------------
def request_event(r: Requests, i: int) -> dict[str, Any]:
    """The event the proxy emits for request `i` (`routes_openai._record`), every key included."""
    row = dict(zip(REQUEST_COLUMNS, request_row(r, i), strict=True))
    del row["prompt"], row["completion"]
    row["time"] = datetime.fromtimestamp(row["ts"], UTC)
    row["retries"] = 0
    row["fallback"] = None
    return row


def feedback_event(row: tuple[Any, ...]) -> dict[str, Any]:
    """The event `POST /v1/feedback` appends (`proxy/feedback.py`) for a feedback row."""
    f = dict(zip(FEEDBACK_COLUMNS, row, strict=True))
    return {
        "kind": "feedback", "schema_version": 1, "ts": f["ts"], "time": datetime.fromtimestamp(f["ts"], UTC),
        "feedback_id": f["feedback_id"], "level": f["level"], "metric": f["metric"], "value": f["value"],
        "episode_id": f["episode_id"], "request_id": f["request_id"],
        "user_hash": None if f["level"] == "request" else f["user_hash"],
        "experiment": None if f["level"] == "request" else f["experiment"],
    }  # fmt: skip


def stream_entries(total: int, seed: int = 7) -> tuple[list[dict[Any, Any]], int, int]:
    """`total` stream entries as the proxy writes them (request events, then their feedback, in
    time order): (entries, request events, feedback events). About one feedback event per two
    requests, the share the simulated app sends."""
    requests_n = max(int(total / 1.45), 1)
    r = simulate(requests_n, seed)
    timed: list[tuple[float, str, bytes]] = []
    for i in range(r.n):
        event = request_event(r, i)
        timed.append((event["ts"], event["request_id"], orjson.dumps(event)))
    feedback_n = 0
    for row in feedback_rows(r, seed + 1):
        if len(timed) >= total:
            break
        event = feedback_event(row)
        timed.append((event["ts"], event["request_id"] or "", orjson.dumps(event)))
        feedback_n += 1
    timed.sort(key=lambda t: t[0])
    return [entry_fields(rid, payload) for _ts, rid, payload in timed], r.n, feedback_n


# -- bulk loads for `abproxy report`, cached ------------------------------------------------------
def cache_key(revision: str | None) -> str:
    """What a cached database depends on: the data's version and the schema's revision."""
    return f"data{DATA_VERSION}-rev{revision or 'none'}"


def _chunks(r: Requests, size: int = 200_000) -> Iterator[list[tuple[Any, ...]]]:
    for start in range(0, r.n, size):
        yield list(request_rows(r, start, min(start + size, r.n)))


def load_sqlite(path: Path, r: Requests) -> None:
    """The store at `path`, migrated, holding `r` and its feedback: one transaction, the secondary
    indexes built after the rows (as CREATE INDEX builds them sorted), sync off for the load only."""
    import sqlite3

    from proxy.store.db import engine_for, migrate

    tmp = path.with_name(path.name + ".loading")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    engine = engine_for(f"sqlite:///{tmp}")
    migrate(engine)
    engine.dispose()
    conn = sqlite3.connect(tmp, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-1048576")
    indexes = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL AND tbl_name IN "
        "('requests', 'feedback')"
    ).fetchall()
    conn.execute("BEGIN")
    for name, _sql in indexes:
        conn.execute(f"DROP INDEX {name}")
    marks = ", ".join("?" * len(REQUEST_COLUMNS))
    for rows in _chunks(r):
        conn.executemany(f"INSERT INTO requests ({', '.join(REQUEST_COLUMNS)}) VALUES ({marks})", rows)
    marks = ", ".join("?" * len(FEEDBACK_COLUMNS))
    conn.executemany(f"INSERT INTO feedback ({', '.join(FEEDBACK_COLUMNS)}) VALUES ({marks})", feedback_rows(r))
    for _name, sql in indexes:
        conn.execute(sql)
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    tmp.rename(path)


def load_postgres(pg: Postgres, database: str, r: Requests) -> None:
    """Database `database`, migrated, holding `r` and its feedback: COPY with the secondary indexes
    dropped and rebuilt after, then VACUUM ANALYZE (statistics, and the visibility map that lets
    PostgreSQL answer from an index alone). Loaded under a temporary name, renamed when complete."""
    from proxy.store.db import engine_for, migrate

    loading = f"{database}_loading"
    url = pg.recreate(loading)
    engine = engine_for(url)
    migrate(engine)
    engine.dispose()
    with psycopg.connect(pg.dsn(loading)) as conn:
        indexes = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename IN ('requests', 'feedback') "
            "AND indexname NOT IN (SELECT conname FROM pg_constraint)"
        ).fetchall()
        for name, _sql in indexes:
            conn.execute(f'DROP INDEX "{name}"'.encode())
        conn.execute("SET maintenance_work_mem = '1GB'")
        with conn.cursor().copy(f"COPY requests ({', '.join(REQUEST_COLUMNS)}) FROM STDIN".encode()) as copy:
            for rows in _chunks(r):
                for row in rows:
                    copy.write_row(row)
        with conn.cursor().copy(f"COPY feedback ({', '.join(FEEDBACK_COLUMNS)}) FROM STDIN".encode()) as copy:
            for row in feedback_rows(r):
                copy.write_row(row)
        for _name, sql in indexes:
            conn.execute(sql.encode())
        conn.commit()
    pg.execute("VACUUM ANALYZE", loading)
    pg.execute(f'ALTER DATABASE "{loading}" RENAME TO "{database}"')


# BENCH_OFFLINE_CACHE moves it (a faster disk, or a second checkout sharing one cache).
CACHE = Path(os.environ.get("BENCH_OFFLINE_CACHE") or Path(__file__).resolve().parent / "results/cache/offline")


def report_stores(
    pg: Postgres, sizes: list[int], revision: str | None, cache: Path = CACHE
) -> dict[int, dict[str, str]]:
    """For each size, the store URLs of a SQLite file and a PostgreSQL database holding that many
    simulated requests (and their feedback), loaded once and kept in `cache` (under bench/results,
    gitignored) by size, data version and schema revision: a rerun finds them and skips the load.
    `pg` must be the cluster of `postgres_cache_root(cache)`."""
    key = cache_key(revision)
    stores: dict[int, dict[str, str]] = {}
    (cache / key).mkdir(parents=True, exist_ok=True)
    _upgrade(pg, cache, key)
    _prune(pg, cache, key)
    existing = pg.databases()
    for n in sizes:
        sqlite_path = cache / key / f"requests-{n}.db"
        database = f"requests_{n}_{key}".replace("-", "_")
        if not sqlite_path.exists() or database not in existing:
            log(f"  offline: simulating {n:,} requests for the report (cached in {cache}/{key})")
            started = time.monotonic()
            r = simulate(n)
            if not sqlite_path.exists():
                load_sqlite(sqlite_path, r)
                log(f"  offline: SQLite store of {n:,} requests loaded ({time.monotonic() - started:.0f} s)")
            if database not in existing:
                load_postgres(pg, database, r)
                log(f"  offline: PostgreSQL store of {n:,} requests loaded ({time.monotonic() - started:.0f} s)")
            del r
        stores[n] = {"sqlite": f"sqlite:///{sqlite_path}", "postgresql": pg.url(database)}
    return stores


def _upgrade(pg: Postgres, cache: Path, key: str) -> None:
    """Bring every store of the same data at an older schema revision to this one, as production
    would (the store's migrations), instead of loading them again (10M requests: ~15 minutes)."""
    from proxy.store.db import engine_for, migrate

    older = [path for path in cache.glob(f"data{DATA_VERSION}-rev*") if path.is_dir() and path.name != key]
    existing = pg.databases()
    for old in older:
        sizes = {int(path.stem.split("-")[1]) for path in old.glob("requests-*.db")}
        sizes |= {int(name.split("_")[1]) for name in existing if name.endswith("_" + old.name.replace("-", "_"))}
        for n in sorted(sizes):
            source, target = old / f"requests-{n}.db", cache / key / f"requests-{n}.db"
            if source.exists() and not target.exists():
                log(f"  offline: migrating the SQLite store of {n:,} requests from {old.name} to {key}")
                engine = engine_for(f"sqlite:///{source}")
                migrate(engine)
                engine.dispose()
                source.rename(target)
            database, stale = (f"requests_{n}_{k}".replace("-", "_") for k in (key, old.name))
            if stale in existing and database not in existing:
                log(f"  offline: migrating the PostgreSQL store of {n:,} requests from {old.name} to {key}")
                engine = engine_for(pg.url(stale))
                migrate(engine)
                engine.dispose()
                pg.execute(f'ALTER DATABASE "{stale}" RENAME TO "{database}"')
                existing = pg.databases()


def _prune(pg: Postgres, cache: Path, key: str) -> None:
    """Drop the stores of other data versions or schema revisions: nothing reads them again, and the
    three sizes take ~17 GB on disk per key."""
    for stale in cache.glob("data*-rev*"):
        if stale.is_dir() and stale.name != key:
            log(f"  offline: removing the stale report stores {stale}")
            shutil.rmtree(stale, ignore_errors=True)
    suffix = "_" + key.replace("-", "_")
    for database in pg.databases():
        if database.startswith("requests_") and not database.endswith(suffix):
            log(f"  offline: dropping the stale report database {database}")
            pg.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def postgres_cache_root(cache: Path = CACHE) -> Path:
    return cache / f"postgres-{postgres_bindir().parts[-2]}"


# Production-like memory for a server that holds millions of rows (PostgreSQL's defaults are sized
# for a small shared machine); durability settings stay at their defaults.
PG_SETTINGS = {"shared_buffers": "2GB", "work_mem": "256MB", "maintenance_work_mem": "1GB", "max_wal_size": "4GB"}
