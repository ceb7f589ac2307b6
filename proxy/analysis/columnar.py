"""A report's reads as Arrow columns, from PostgreSQL without one Python object per value.

At 10M stored requests a report reads about 6M aggregated rows (users x days). Through a DBAPI
cursor each value becomes a Python object first, 2-3 us a row, most of the report's time.
PostgreSQL's ADBC driver (Apache Arrow's database connectivity) fills Arrow arrays from the
wire directly. On the bench's 10M store: 1.1M request groups in 0.9 s against 3.5 s through
psycopg; a whole report's load 4.5-5.6 CPU-s of the report's process against 8.7-9.3, CPU the
proxy serving beside it keeps.

SQLite's rows come through the store's own connection and are turned into the same columns.
Its ADBC driver reads them several times faster, but it links a second copy of SQLite into
the process. Two copies in one process release each other's POSIX locks when either closes the
file (sqlite.org/howtocorrupt.html, 2.2.1). Tried here, a report read through it came back
empty in a test where the store's own connections read the rows.

Every select is SQLAlchemy's, compiled for the store's dialect, so the SQL is the one the
rollup's aggregations define (proxy/store/rollup.py) whichever way its result is read. An ADBC
reader has a connection of its own, so it reads committed data, as every read of a report does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import adbc_driver_manager.dbapi
import adbc_driver_postgresql.dbapi
import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine import Connection, Engine


class Reader(Protocol):
    def table(self, selects: Sequence[sa.Select[Any]], *, settings: Mapping[str, str] | None = None) -> pa.Table:
        """The rows of all `selects` (the same columns), as one table. `settings`: PostgreSQL's
        planner settings for these reads (SQLite has none)."""
        ...


def in_memory(engine: Engine) -> bool:
    return engine.url.get_backend_name() == "sqlite" and engine.url.database in (None, "", ":memory:")


@contextlib.contextmanager
def reader(conn: Connection) -> Iterator[Reader]:
    """A reader of `conn`'s database: an ADBC connection for PostgreSQL, else `conn` itself."""
    if conn.dialect.name != "postgresql":
        yield _RowReader(conn)
        return
    with _PostgresReader(conn.engine) as adbc:
        yield adbc


@contextlib.contextmanager
def engine_reader(engine: Engine) -> Iterator[Reader]:
    """A reader on a connection of its own (not for an in-memory SQLite, which only `reader`'s
    connection sees)."""
    if engine.dialect.name == "postgresql":
        with _PostgresReader(engine) as adbc:
            yield adbc
    else:
        with engine.connect() as conn:
            yield _RowReader(conn)


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
    # The driver binds $1, $2, ...: the psycopg dialect, in numeric_dollar style.
    dialect = PGDialect_psycopg(paramstyle="numeric_dollar")  # type: ignore[no-untyped-call]

    def __init__(self, engine: Engine) -> None:
        uri = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        with _as_sqlalchemy_errors(None, None):
            self.connection: Any = adbc_driver_postgresql.dbapi.connect(uri, autocommit=True)

    def __enter__(self) -> _PostgresReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.connection.close()

    def table(self, selects: Sequence[sa.Select[Any]], *, settings: Mapping[str, str] | None = None) -> pa.Table:
        tables = []
        with self.connection.cursor() as cursor:
            for name, value in (settings or {}).items():  # for this connection's session: its own
                cursor.execute("SELECT set_config($1, $2, false)", [name, value])
                cursor.fetchall()
            for select in selects:
                compiled = select.compile(dialect=self.dialect, compile_kwargs={"render_postcompile": True})
                params = [compiled.params[name] for name in compiled.positiontup or ()]
                with _as_sqlalchemy_errors(compiled.string, params):
                    cursor.execute(compiled.string, params or None)
                    tables.append(_conform(cursor.fetch_arrow_table(), select))
            if settings:
                cursor.execute("RESET ALL")
        return _concat(tables)


class _RowReader:
    """A connection's DBAPI rows as Arrow columns."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def table(self, selects: Sequence[sa.Select[Any]], *, settings: Mapping[str, str] | None = None) -> pa.Table:
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
