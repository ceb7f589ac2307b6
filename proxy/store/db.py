"""Writing events to the store: the engine, the migrations, and idempotent batch writes.

Delivery from the event stream is at least once (a collector that dies before its ack leaves
the batch to be read again), so every write is idempotent:

- A request is stored once. `request_id` is unique; a redelivered or duplicated request event
  is ignored (INSERT .. ON CONFLICT (request_id) DO NOTHING). The first copy stored stays.
- Feedback keeps one value per (subject, metric), and the LAST VALUE WINS by the feedback's own
  `ts`, not by arrival: ON CONFLICT (subject, metric) DO UPDATE SET value, ts, episode_id,
  feedback_id WHERE excluded.ts >= feedback.ts. A redelivered older event never overwrites a
  newer value; an equal `ts` takes the later write. The subject is `req:<request_id>` for
  request-level feedback and `user:<experiment or *>:<user_hash>` for user-level feedback (`*`:
  about the user in every experiment).
- Requests the proxy rejected before routing (`experiment: null`) and events of an unknown
  `kind` are not stored (counted as skipped).

A batch is written in one transaction, one bulk statement per table. It is deduplicated first
(first copy of a request id; the highest `ts` per feedback subject and metric), because one
INSERT .. ON CONFLICT DO UPDATE may not touch the same row twice on PostgreSQL.

`request_row` and `feedback_row` raise ValueError for an event the tables cannot hold (a
required key missing, a wrong type, an over-long id): such an event could never be written, so
the collector acks it as malformed rather than let it block every later batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import (
    Boolean,
    Connection,
    Engine,
    Float,
    Integer,
    String,
    Table,
    Text,
    create_engine,
    event,
    make_url,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError

from proxy.config import CollectorConfig, FeedbackConfig
from proxy.store import rollup
from proxy.store.schema import comparisons, feedback, requests

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"
# The config's defaults, for a Store or Collector built without settings (tests, scripts).
REGENERATION_WINDOW_S: float = FeedbackConfig.model_fields["regeneration_window_s"].default
ROLLUP_SETTLE_S: float = CollectorConfig.model_fields["rollup_settle_s"].default
SQLITE_WAL_CHECKPOINT_PAGES = 10_000  # see _sqlite_pragmas
# Any constant: serialises concurrent `migrate` calls on one PostgreSQL database.
_MIGRATE_LOCK_ID = 0x61627078


def normalise_url(url: str) -> URL:
    """sqlite:///... as is; postgresql:// (or postgres://) always on the psycopg 3 driver."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise ValueError(f"cannot parse store URL {url!r}: {exc}") from None
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "sqlite" and driver in ("", "pysqlite"):
        return parsed
    if backend in ("postgresql", "postgres") and driver in ("", "psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    raise ValueError(f"unsupported store URL {parsed.render_as_string()!r}: use sqlite:/// or postgresql://")


def engine_for(url: str) -> Engine:
    parsed = normalise_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(parsed)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # Pre-ping: a collector outlives database restarts; a dead pooled connection is replaced, not used.
    return create_engine(parsed, pool_pre_ping=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL: `abproxy report` can read while the collector writes. busy_timeout: wait for the
    # other's lock instead of failing at once with "database is locked".
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    # 64 MiB of page cache (the default is 2 MiB): the requests table's indexes on random keys
    # (request_id, user hashes) touch pages all over their B-trees, and a page read back from
    # the OS on each insert cost the collector more CPU than the insert.
    cursor.execute("PRAGMA cache_size=-65536")
    # Checkpoint the WAL into the database every 10,000 pages (~40 MiB) instead of 1,000: a page
    # the collector rewrites in several batches is copied back once, not once per 4 MiB of log
    # (the kernel's part of a 300k-event SQLite drain: 11.5 -> 7.2 µs per event, same run).
    # Neither is a durability setting: every commit is still synced (synchronous=FULL).
    cursor.execute(f"PRAGMA wal_autocheckpoint={SQLITE_WAL_CHECKPOINT_PAGES}")
    cursor.close()


def _alembic_config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    config = Config()
    # configparser interpolates '%': a path holding one must be escaped.
    config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def migrate(engine: Engine) -> None:
    """Upgrade to the newest revision; a no-op when already there, so safe at every start."""
    from alembic import command

    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Two collectors starting together would both try to create the tables.
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATE_LOCK_ID})
        command.upgrade(_alembic_config(connection), "head")


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


@dataclass
class WriteResult:
    requests_inserted: int = 0
    requests_duplicate: int = 0  # already stored, or twice in the batch
    feedback_written: int = 0  # inserted, or replaced an older value
    skipped: int = 0  # rejected before routing, or of an unknown kind
    pairs_added: int = 0  # production pairs new to the comparisons table


Prepared = tuple[str, dict[str, Any] | None]
"""An event as `prepare` reads it: ("request" | "feedback" | "pair", its row), or ("skip", None)."""


def prepare(event: dict[str, Any]) -> Prepared:
    """The row `Store.write` stores for this event; raises ValueError if the tables cannot hold it.

    The collector prepares each entry of a batch on its own (a poison entry is one error, acked as
    malformed), then writes the prepared rows: each event is converted and checked once.
    """
    kind = event_kind(event)
    if kind == "request":
        row = request_row(event)
        return ("skip", None) if row is None else ("request", row)
    if kind == "feedback":
        return "feedback", feedback_row(event)
    if kind == "pair":
        return "pair", pair_row(event)
    return "skip", None


class Store:
    def __init__(self, engine: Engine, *, regeneration_window_s: float = REGENERATION_WINDOW_S) -> None:
        self.engine = engine
        # Which days a write changes (rollup.days_of_requests): the report's regeneration window.
        self.regeneration_window_s = regeneration_window_s
        # The two dialects' INSERT constructs share the on_conflict_* API.
        postgres = engine.dialect.name == "postgresql"
        self._insert: Callable[[Table], Any] = postgresql.insert if postgres else sqlite.insert
        self._bulk: Callable[[Connection, _Bulk, list[dict[str, Any]]], int] = (
            _bulk_postgresql if postgres else _bulk_sqlite
        )

    def write(self, events: Sequence[dict[str, Any]]) -> WriteResult:
        """Store a batch in one transaction; raises ValueError (before writing) for an unusable event."""
        return self.write_prepared([prepare(event) for event in events])

    def write_prepared(self, batch: Sequence[Prepared]) -> WriteResult:
        """Store events already read by `prepare`, in one transaction."""
        result = WriteResult()
        request_rows: dict[str, dict[str, Any]] = {}
        feedback_rows: dict[tuple[str, str], dict[str, Any]] = {}
        pair_rows: dict[str, dict[str, Any]] = {}
        request_events = 0
        for kind, row in batch:
            if row is None:
                result.skipped += 1
            elif kind == "request":
                request_events += 1
                request_rows.setdefault(row["request_id"], row)
            elif kind == "feedback":
                key = (row["subject"], row["metric"])
                kept = feedback_rows.get(key)
                if kept is None or row["ts"] >= kept["ts"]:
                    feedback_rows[key] = row
            elif kind == "pair":
                pair_rows.setdefault(row["content_hash"], row)
            else:
                result.skipped += 1
        with self.engine.begin() as connection:
            if request_rows:
                result.requests_inserted = self._bulk(connection, _REQUESTS, list(request_rows.values()))
            if feedback_rows:
                result.feedback_written = self._bulk(connection, _FEEDBACK, list(feedback_rows.values()))
            # The days these rows change are no longer current in the report's rollup.
            changed = rollup.days_of_requests(request_rows.values(), self.regeneration_window_s)
            # Feedback on a request of this batch needs no lookup: that request's day is marked.
            about = [row["request_id"] for row in feedback_rows.values()
                     if row["level"] == "request" and row["request_id"] not in request_rows]  # fmt: skip
            if about:
                changed |= rollup.days_of_feedback(connection, about)
            rollup.mark_written(connection, changed)
            if pair_rows:
                statement = self._insert(comparisons).on_conflict_do_nothing(index_elements=["content_hash"])
                result.pairs_added = _executemany(connection, statement, list(pair_rows.values()))
        result.requests_duplicate = request_events - result.requests_inserted
        return result


@dataclass(frozen=True)
class _Bulk:
    """One table's idempotent bulk write: its columns, and what a conflicting row does."""

    table: Table
    columns: tuple[str, ...]
    on_conflict: str  # the same clause on both back-ends

    def sqlite(self) -> str:
        names = ", ".join(self.columns)
        values = ", ".join(f":{name}" for name in self.columns)
        return f"INSERT INTO {self.table.name} ({names}) VALUES ({values}) {self.on_conflict}"

    def postgresql(self) -> str:
        names = ", ".join(self.columns)
        arrays = ", ".join(f"%b::{_PG_ARRAY[type(self.table.c[name].type)]}[]" for name in self.columns)
        return f"INSERT INTO {self.table.name} ({names}) SELECT * FROM unnest({arrays}) {self.on_conflict}"


# Array element types for unnest: the columns' own types (varchar keeps no length: the column checks it).
_PG_ARRAY: dict[type, str] = {String: "varchar", Text: "text", Float: "float8", Integer: "int4", Boolean: "bool"}
_REQUESTS = _Bulk(requests, tuple(requests.c.keys()), "ON CONFLICT (request_id) DO NOTHING")
_FEEDBACK = _Bulk(
    feedback,
    tuple(name for name in feedback.c.keys() if name != "id"),
    # The later value wins, by the feedback's own ts; an equal ts takes the later write.
    "ON CONFLICT (subject, metric) DO UPDATE SET value = excluded.value, ts = excluded.ts, "
    "episode_id = excluded.episode_id, feedback_id = excluded.feedback_id WHERE excluded.ts >= feedback.ts",
)
_SQL = {(bulk.table.name, dialect): getattr(bulk, dialect)() for bulk in (_REQUESTS, _FEEDBACK)
        for dialect in ("sqlite", "postgresql")}  # fmt: skip


def _bulk_sqlite(connection: Connection, bulk: _Bulk, rows: list[dict[str, Any]]) -> int:
    """sqlite3's executemany of one statement, the rows bound by name straight from their dicts.

    Driver-level SQL rather than a compiled INSERT construct: SQLAlchemy's per-row parameter
    processing cost more than SQLite's insert itself, and these values need none (str, float, int,
    bool and None bind as they are). Errors still arrive as SQLAlchemy's (the collector retries
    those). sqlite3 sums the rows each execution changed: a conflicting row skipped by DO NOTHING,
    or by the DO UPDATE's WHERE, is not counted.
    """
    result = connection.exec_driver_sql(_SQL[bulk.table.name, "sqlite"], rows)
    return max(result.rowcount, 0)


def _bulk_postgresql(connection: Connection, bulk: _Bulk, rows: list[dict[str, Any]]) -> int:
    """ONE statement for the whole batch: INSERT .. SELECT * FROM unnest(<one array per column>).

    A column's values travel as one binary array parameter (%b: psycopg's text array dumper costs
    ~2 µs an element, the binary one a fifth of that), so the statement
    has as many parameters as the table has columns whatever the batch size, is prepared once per
    connection, and PostgreSQL inserts the batch in one execution: several times less client CPU
    than pipelining one INSERT per row. Its row count is the rows inserted or changed; a conflicting
    row skipped by DO NOTHING, or by the DO UPDATE's WHERE, is not counted.
    """
    columns = tuple([row[name] for row in rows] for name in bulk.columns)
    result = connection.exec_driver_sql(_SQL[bulk.table.name, "postgresql"], columns)
    return max(result.rowcount, 0)


def _executemany(connection: Connection, statement: Any, rows: list[dict[str, Any]]) -> int:
    """One prepared statement run for every row; returns the rows it inserted or changed.

    The driver's executemany (psycopg pipelines it) rather than one multi-row VALUES statement:
    psycopg parses a statement of 12,500 placeholders ~6x slower than it pipelines 500 rows, and
    SQLite binds one row at a time, so its bound-variable limit never applies. A conflicting row
    skipped by DO NOTHING, or by the DO UPDATE's WHERE, is not counted by either driver.
    """
    result = connection.execute(statement.execution_options(preserve_rowcount=True), rows)
    return max(result.rowcount, 0)


def check_event(event: dict[str, Any]) -> None:
    """Raise ValueError if `Store.write` could not store this event (the collector's poison check)."""
    prepare(event)


def event_kind(event: dict[str, Any]) -> str:
    """`request` (the default: request events carry no kind), `feedback`, or a kind unknown here."""
    kind = event.get("kind", "request")
    return kind if isinstance(kind, str) else "unknown"


def request_row(event: dict[str, Any]) -> dict[str, Any] | None:
    """The `requests` row of a request event; None for a request rejected before routing."""
    if event.get("experiment") is None:
        return None
    prompt = event.get("prompt")
    return {
        "request_id": _id(event, "request_id", 128, required=True),
        "ts": _float(event, "ts", required=True),
        "experiment": _id(event, "experiment", 128, required=True),
        "variant": _id(event, "variant", 16, required=True),
        "model": _text(event, "model", 128),
        "upstream_model": _text(event, "upstream_model", 256),
        "user_hash": _id(event, "user_hash", 64),
        "bucket": _int(event, "bucket"),
        "rollout_percent": _float(event, "rollout_percent"),
        "episode_id": _id(event, "episode_id", 256),
        "endpoint": _text(event, "endpoint", 64),
        "stream": _bool(event, "stream"),
        "status": _int(event, "status"),
        "upstream_status": _int(event, "upstream_status"),
        "error": _text(event, "error", 64),
        "finish_reason": _text(event, "finish_reason", 64),
        "latency_ms": _float(event, "latency_ms"),
        "ttft_ms": _float(event, "ttft_ms"),
        "prompt_tokens": _int(event, "prompt_tokens"),
        "completion_tokens": _int(event, "completion_tokens"),
        "cost_usd": _float(event, "cost_usd"),
        "prompt_hash": _id(event, "prompt_hash", 64),
        "client_request_id": _id(event, "client_request_id", 128),
        # Any JSON (a messages list or a string), kept as its JSON text.
        "prompt": None if prompt is None else orjson.dumps(prompt).decode(),
        "completion": _text(event, "completion"),
    }


def pair_row(event: dict[str, Any]) -> dict[str, Any]:
    """The `comparisons` row of a production pair (proxy/pair_sampling.py): a blind comparison to review."""
    from proxy.humaneval.importer import checked_pair, comparison_row

    experiment = _id(event, "experiment", 128, required=True)
    prompt, responses = checked_pair(event.get("prompt"), event.get("responses"))
    ts = _float(event, "ts", required=True)
    assert ts is not None  # required=True raised otherwise
    return comparison_row(
        prompt, responses, source=f"production:{experiment}", now=ts,
        experiment=experiment, request_id=_id(event, "request_id", 128),
    )


def feedback_row(event: dict[str, Any]) -> dict[str, Any]:
    """The `feedback` row of a feedback event, its subject named by `level`."""
    level = event.get("level")
    experiment = _id(event, "experiment", 128)
    if level == "request":
        request_id = _id(event, "request_id", 128, required=True)
        user_hash = _id(event, "user_hash", 64)
        subject = f"req:{request_id}"
    elif level == "user":
        request_id = _id(event, "request_id", 128)
        user_hash = _id(event, "user_hash", 64, required=True)
        subject = f"user:{experiment or '*'}:{user_hash}"
    else:
        raise ValueError(f"feedback level must be 'request' or 'user', got {level!r}")
    return {
        "subject": subject,
        "metric": _id(event, "metric", 64, required=True),
        "level": level,
        "request_id": request_id,
        "user_hash": user_hash,
        "experiment": experiment,
        "value": _float(event, "value", required=True),
        "episode_id": _id(event, "episode_id", 256),
        "ts": _float(event, "ts", required=True),
        "feedback_id": _id(event, "feedback_id", 64),
    }


# -- field checks: a value the column cannot hold would fail the whole batch, every retry ------
_INT_RANGE = range(-(2**31), 2**31)  # INTEGER on PostgreSQL


def _get(event: dict[str, Any], key: str, required: bool) -> Any:
    value = event.get(key)
    if value is None and required:
        raise ValueError(f"{key} is missing")
    return value


def _id(event: dict[str, Any], key: str, max_len: int, *, required: bool = False) -> str | None:
    """An identifier: refused when too long or holding NUL (cutting it would merge distinct ids)."""
    value = _get(event, key, required)
    if value is None:
        return None
    if not isinstance(value, str) or (required and not value):
        raise ValueError(f"{key} must be a non-empty string, got {value!r:.80}")
    if len(value) > max_len or "\x00" in value:
        raise ValueError(f"{key} is longer than {max_len} characters or holds NUL")
    return value


def _text(event: dict[str, Any], key: str, max_len: int | None = None) -> str | None:
    """Free text: cut to the column, NUL replaced (PostgreSQL text cannot hold it)."""
    value = event.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r:.80}")
    value = value.replace("\x00", "\ufffd")
    return value if max_len is None else value[:max_len]


def _float(event: dict[str, Any], key: str, *, required: bool = False) -> float | None:
    value = _get(event, key, required)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value!r:.80}")
    return float(value)


def _int(event: dict[str, Any], key: str) -> int | None:
    value = event.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value not in _INT_RANGE:
        raise ValueError(f"{key} must be a 32-bit integer, got {value!r:.80}")
    return value


def _bool(event: dict[str, Any], key: str) -> bool | None:
    value = event.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r:.80}")
    return value
