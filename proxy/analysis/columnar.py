"""A report's reads as Arrow columns, from PostgreSQL without one Python object per value.

At 10M stored requests a report reads about 6M aggregated rows (users x days). Through a DBAPI
cursor each value becomes a Python object first, 2-3 us a row, most of the report's time.
PostgreSQL's ADBC driver (Apache Arrow's database connectivity) fills Arrow arrays from the
wire directly. On the bench's 10M store: 1.1M request groups in 0.9 s against 3.5 s through
psycopg; a whole report's load 4.5-5.6 CPU-s of the report's process against 8.7-9.3, CPU the
proxy serving beside it keeps.

SQLite's ADBC driver reads 3-4 times faster than Python's sqlite3 (at 10M requests, the
request groups in 0.9 s against 3.1 s), but it links a second copy of SQLite, and two copies in
one process release each other's POSIX locks when either closes the file
(sqlite.org/howtocorrupt.html, 2.2.1; tried in this process, a report came back empty in a test).
So a large SQLite file is read by a child process (proxy/analysis/sqlite_child.py) that holds the
driver's copy alone and hands back Arrow IPC streams. A small one (`_large`), or an in-memory
database, seen by its one connection only, is read through a connection of this process, its
rows turned into the same columns.

Every select is SQLAlchemy's, compiled for the store's dialect, so the SQL is the one the
rollup's aggregations define (proxy/store/rollup.py) whichever way its result is read. An ADBC
reader has a connection of its own, so it reads committed data, as every read of a report does.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import adbc_driver_manager.dbapi
import adbc_driver_postgresql.dbapi
import orjson
import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine import Connection, Engine

from proxy.analysis import sqlite_child


class Reader(Protocol):
    def table(self, selects: Sequence[sa.Select[Any]]) -> pa.Table:
        """The rows of all `selects` (the same columns), as one table."""
        ...


def in_memory(engine: Engine) -> bool:
    return engine.url.get_backend_name() == "sqlite" and engine.url.database in (None, "", ":memory:")


@contextlib.contextmanager
def reader(conn: Connection) -> Iterator[Reader]:
    """A reader of `conn`'s database: an ADBC connection for PostgreSQL, a child process for a
    SQLite file, else `conn` itself."""
    if conn.dialect.name == "postgresql" or _large(conn.engine):
        with engine_reader(conn.engine) as read:
            yield read
        return
    yield _RowReader(conn)


@contextlib.contextmanager
def engine_reader(engine: Engine) -> Iterator[Reader]:
    """A reader on a connection of its own (not for an in-memory SQLite, which only `reader`'s
    connection sees)."""
    if engine.dialect.name == "postgresql":
        with _PostgresReader(engine) as adbc:
            yield adbc
    elif _large(engine):
        with _SqliteReader(engine) as child:
            yield child
    else:
        with engine.connect() as conn:
            yield _RowReader(conn)


def _large(engine: Engine) -> bool:
    """Whether a SQLite file is large enough to pay for a child's start (~0.4 s of CPU: Python,
    pyarrow and the driver loading). A report on a store of 100,000 requests (~70 MB) reads ~45,000
    rows, ~0.1 s through sqlite3; on 1M requests (~700 MB), ~400,000 rows, 1.0 s against 0.6.
    Never an in-memory database: a child would not see it."""
    if in_memory(engine):
        return False
    try:
        return os.path.getsize(str(engine.url.database)) >= SQLITE_CHILD_MIN_BYTES
    except OSError:
        return False


SQLITE_CHILD_MIN_BYTES = 256 << 20


def empty(select: sa.Select[Any]) -> pa.Table:
    """A table of `select`'s columns with no rows: what reading no part of a window gives."""
    return _conform(pa.table([pa.array([]) for _ in select.selected_columns],
                             names=[c.name for c in select.selected_columns]), select)  # fmt: skip


def _arrow_type(column: Any) -> pa.DataType | None:
    """The Arrow type of a selected column's SQL type; None: keep what was read."""
    sql_type = column.type
    if isinstance(sql_type, sa.Boolean):
        return pa.bool_()
    if isinstance(sql_type, sa.Integer):
        return pa.int64()
    if isinstance(sql_type, sa.Float):
        return pa.float64()
    if isinstance(sql_type, sa.String):
        return pa.string()
    return None


def _conform(table: pa.Table, select: sa.Select[Any]) -> pa.Table:
    """`table` in the types the select declares. What is read depends on the values: a count is
    int8 and a rolled-up one int4, and a column of NULLs only built from Python values has
    Arrow's null type. One schema for every part of a read."""
    columns = []
    for column, values in zip(select.selected_columns, table.columns, strict=True):
        wanted = _arrow_type(column)
        columns.append(values if wanted is None or values.type == wanted else values.cast(wanted))
    return pa.table(columns, names=[column.name for column in select.selected_columns])


def _concat(tables: list[pa.Table]) -> pa.Table:
    # An empty result's untyped columns hold nothing to keep and would only stop the concatenation.
    tables = [table for table in tables if table.num_rows] or tables[:1]
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


@contextlib.contextmanager
def _as_sqlalchemy_errors(statement: str | None, params: Sequence[Any] | None) -> Iterator[None]:
    """The driver's DBAPI errors as SQLAlchemy's (OperationalError, ProgrammingError, ...), which
    every caller of a report already handles: an unreachable store is one, however it is read."""
    try:
        yield
    except adbc_driver_manager.dbapi.Error as exc:
        raise sa.exc.DBAPIError.instance(
            statement, params, exc, adbc_driver_manager.dbapi.Error, hide_parameters=True
        ) from exc


class _PostgresReader:
    """Each select with its values written into the SQL, so the driver streams the rows with COPY.

    The driver runs a query that has bind parameters through libpq's PQexecParams instead of
    COPY (COPY takes none): libpq holds the whole result in memory before the first row is
    converted, and the conversion waits for the last row. Inlined, PostgreSQL's work and this
    process's overlap: on the bench's 10M requests the five reads took 2.6 s in turn against
    4.2, and the request groups 25,000 page faults against 71,000. The values are the report's
    own (an experiment's and its metrics' names, days, timestamps), rendered by SQLAlchemy's
    literal processors; the session's standard_conforming_strings is set on, so a quote doubled
    is the whole escaping whatever the server's default.
    """

    # Not the engine's dialect: psycopg's paramstyle doubles every '%' in the SQL for the driver
    # to undo, and this driver would not.
    dialect = PGDialect_psycopg(paramstyle="numeric_dollar")  # type: ignore[no-untyped-call]

    def __init__(self, engine: Engine) -> None:
        uri = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        with _as_sqlalchemy_errors(None, None):
            self.connection: Any = adbc_driver_postgresql.dbapi.connect(uri, autocommit=True)
            with self.connection.cursor() as cursor:
                cursor.execute("SET standard_conforming_strings = on")

    def __enter__(self) -> _PostgresReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.connection.close()

    def table(self, selects: Sequence[sa.Select[Any]]) -> pa.Table:
        tables = []
        with self.connection.cursor() as cursor:
            for select in selects:
                sql = select.compile(dialect=self.dialect, compile_kwargs={"literal_binds": True}).string
                with _as_sqlalchemy_errors(sql, None):
                    cursor.execute(sql)
                    tables.append(_conform(cursor.fetch_arrow_table(), select))
        return _concat(tables)


class _SqliteReader:
    """A SQLite file's selects run by a child process through SQLite's ADBC driver (see above)."""

    def __init__(self, engine: Engine) -> None:
        self.dialect = engine.dialect
        self.child = subprocess.Popen(
            [sys.executable, "-m", sqlite_child.__name__, str(engine.url.database)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip

    def __enter__(self) -> _SqliteReader:
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.child.stdin is not None
        self.child.stdin.close()
        self.child.wait()

    def table(self, selects: Sequence[sa.Select[Any]]) -> pa.Table:
        return _concat([self._read(select) for select in selects])

    def _read(self, select: sa.Select[Any]) -> pa.Table:
        assert self.child.stdin is not None and self.child.stdout is not None
        compiled = select.compile(dialect=self.dialect, compile_kwargs={"render_postcompile": True})
        params = [compiled.params[name] for name in compiled.positiontup or ()]
        sql = self._typed(compiled.string, select)
        self.child.stdin.write(orjson.dumps({"sql": sql, "params": params}) + b"\n")
        self.child.stdin.flush()
        header = self.child.stdout.read(sqlite_child.FRAME.size)
        status, size = sqlite_child.FRAME.unpack(header) if len(header) == sqlite_child.FRAME.size else (None, 0)
        body = self.child.stdout.read(size)
        if status != sqlite_child.OK or len(body) != size:
            message = body.decode(errors="replace") if status == sqlite_child.FAILED else (
                f"the SQLite reader exited ({self.child.poll()})")  # fmt: skip
            raise sa.exc.OperationalError(sql, params, _ChildError(message))
        table = pa.ipc.open_stream(pa.py_buffer(body)).read_all()
        return _conform(table.slice(1), select)  # the anchor row left out

    def _typed(self, sql: str, select: sa.Select[Any]) -> str:
        """`sql` with every column cast to its declared type, after an anchor row of those types.

        The driver types each column from the values of its first batch: a column whose first
        rows are NULL becomes an integer column, and a float later on fails the read ("Type
        mismatch"). A first row holding a value of each column's type fixes the types; the
        casts make every later value fit them. Hand-written: the driver takes no schema.
        """
        quote = self.dialect.identifier_preparer.quote
        anchors, casts = [], []
        for column in select.selected_columns:
            name = quote(column.name)
            sql_type, anchor = _SQLITE_TYPES[_arrow_type(column)]
            anchors.append(f"{anchor} AS {name}")
            casts.append(f"CAST({name} AS {sql_type}) AS {name}")
        return f"SELECT {', '.join(anchors)} UNION ALL SELECT {', '.join(casts)} FROM ({sql})"


class _ChildError(Exception):
    pass


# A column's Arrow type (`_arrow_type`) -> the SQLite type it is cast to, and the anchor row's value.
_SQLITE_TYPES: dict[pa.DataType | None, tuple[str, str]] = {
    pa.bool_(): ("INTEGER", "0"),
    pa.int64(): ("INTEGER", "0"),
    pa.float64(): ("REAL", "0.0"),
    pa.string(): ("TEXT", "''"),
}


class _RowReader:
    """A connection's DBAPI rows as Arrow columns."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def table(self, selects: Sequence[sa.Select[Any]]) -> pa.Table:
        tables = []
        for select in selects:
            names = [column.name for column in select.selected_columns]
            tables.append(empty(select))
            result = self.conn.execute(select)
            try:  # the DBAPI cursor's tuples, not SQLAlchemy's Row objects: a million rows at 10M requests
                while rows := result.cursor.fetchmany(_FETCH_ROWS):
                    # Chunk by chunk, so the next chunk's Python objects reuse the memory of this
                    # one's: all at once, the 4M rows of 10M requests took ~2 GB from the kernel.
                    columns = [pa.array([row[k] for row in rows]) for k in range(len(names))]
                    tables.append(_conform(pa.table(columns, names=names), select))
            finally:
                result.close()
        return _concat(tables)


_FETCH_ROWS = 100_000
