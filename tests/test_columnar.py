"""The report's column reader (proxy/analysis/columnar.py) on both back-ends: PostgreSQL through
its ADBC driver, SQLite through the store's own connection; one table per read whatever the
parts' values."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pytest
import sqlalchemy as sa

from proxy.analysis import columnar
from proxy.store.db import engine_for
from tests.harness import PostgresServer

metadata = sa.MetaData()
rows = sa.Table(
    "columnar_rows",
    metadata,
    sa.Column("part", sa.Integer, nullable=False),
    sa.Column("user_hash", sa.String(64), nullable=True),
    sa.Column("small", sa.Integer, nullable=False),
    sa.Column("value", sa.Float, nullable=True),
)


@pytest.fixture(params=["sqlite", "sqlite read by a child", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each back-end, and a SQLite file also as a large one is read: by a child process through
    SQLite's ADBC driver, whose column types come from its first rows (here 1,500 NULLs, then a float)."""
    if request.param == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        name = f"t_{uuid.uuid4().hex[:16]}"
        yield server.create_schema(name)
        server.drop_schema(name)
        return
    if request.param == "sqlite read by a child":
        monkeypatch.setattr(columnar, "SQLITE_CHILD_MIN_BYTES", 0)
    yield f"sqlite:///{tmp_path}/store.db"


@pytest.fixture
def engine(store_url: str) -> Iterator[sa.Engine]:
    engine = engine_for(store_url)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(rows), [
            # Part 1: no user (a live span's anonymous requests), no value.
            *({"part": 1, "user_hash": None, "small": i, "value": None} for i in range(1500)),
            {"part": 2, "user_hash": "00ff", "small": 7, "value": 2.5},
            {"part": 2, "user_hash": "ä-ü", "small": 8, "value": None},
        ])  # fmt: skip
    yield engine
    engine.dispose()


def _part(part: int) -> sa.Select[tuple[str | None, int, float | None]]:
    r = rows.c
    return sa.select(r.user_hash, r.small, r.value).where(r.part == part).order_by(r.small)


def test_parts_of_nulls_and_of_values_read_as_one_typed_table(engine: sa.Engine) -> None:
    counted = sa.select(rows.c.part, sa.func.count().label("small"), sa.func.sum(rows.c.value).label("value"))
    with engine.connect() as conn, columnar.reader(conn) as read:
        table = read.table([_part(1), _part(2)])
        totals = read.table([counted.group_by(rows.c.part).order_by(rows.c.part)])
    assert table.schema.types == [pa.string(), pa.int64(), pa.float64()]
    assert table.num_rows == 1502
    assert table["user_hash"].null_count == 1500
    assert table["user_hash"].to_pylist()[-2:] == ["00ff", "ä-ü"]  # non-ASCII text intact
    assert table["value"].to_pylist()[-2:] == [2.5, None]
    assert totals["small"].to_pylist() == [1500, 2]  # a count: int8 on PostgreSQL, typed as the select says
    assert totals["value"].to_pylist() == [None, 2.5]


def test_rows_read_in_chunks_make_one_typed_table(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite's rows become columns chunk by chunk: a chunk of NULLs only, then one of values."""
    monkeypatch.setattr(columnar, "_FETCH_ROWS", 1000)
    r = rows.c
    select = sa.select(r.user_hash, r.small, r.value).order_by(r.part, r.small)
    with engine.connect() as conn, columnar.reader(conn) as read:
        table = read.table([select, _part(9)])  # the second read: no rows
    assert table.schema.types == [pa.string(), pa.int64(), pa.float64()]
    assert table.num_rows == 1502 and table["small"].to_pylist()[998:1002] == [998, 999, 1000, 1001]
    assert table["user_hash"].to_pylist()[-3:] == [None, "00ff", "ä-ü"]
    assert table["value"].to_pylist()[-3:] == [None, 2.5, None]


def test_bound_values_reach_the_database(engine: sa.Engine) -> None:
    """Values, an expanding IN list among them: bound in the driver's style (?) or written into
    the SQL (PostgreSQL's reader)."""
    r = rows.c
    select = sa.select(r.small).where(r.part.in_([2, 3]), r.user_hash == "ä-ü", r.small > 1).order_by(r.small)
    with engine.connect() as conn, columnar.reader(conn) as read:
        assert read.table([select])["small"].to_pylist() == [8]


# Quotes, a percent sign, backslashes, a dollar-quote and non-ASCII: PostgreSQL's reader writes
# every value into the SQL it sends (so the driver streams with COPY), and each must arrive as is.
TRICKY = ["it's", "100%", "C:\\new\\table", "\\'; DROP TABLE columnar_rows; --", "$1 $$x$$", "ä\u2028ü"]


def test_values_written_into_the_sql_arrive_as_they_are(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.insert(rows), [{"part": 3, "user_hash": text, "small": i, "value": 0.1 * i}
                                       for i, text in enumerate(TRICKY)])  # fmt: skip
    r = rows.c
    selected = [sa.literal(text, sa.String).label(f"t{i}") for i, text in enumerate(TRICKY)]
    numbers = sa.select(*selected, sa.literal(1767225600.123456, sa.Float).label("ts"),
                        sa.literal(2**62 + 1, sa.BigInteger).label("big"), sa.literal(True).label("yes"))  # fmt: skip
    with engine.connect() as conn, columnar.reader(conn) as read:
        row = read.table([numbers]).to_pylist()[0]
        for i, text in enumerate(TRICKY):
            found = read.table([sa.select(r.small, r.value).where(r.user_hash == text, r.value >= 0.1 * i)])
            assert found.to_pylist() == [{"small": i, "value": 0.1 * i}], text
    assert [row[f"t{i}"] for i in range(len(TRICKY))] == TRICKY
    assert (row["ts"], row["big"], row["yes"]) == (1767225600.123456, 2**62 + 1, True)
    assert rows_count(engine) == 1508  # and nothing was dropped


def rows_count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(rows)).scalar_one())


def test_a_read_on_its_own_connection_sees_committed_rows(engine: sa.Engine) -> None:
    with columnar.engine_reader(engine) as read:
        assert read.table([_part(2)])["small"].to_pylist() == [7, 8]


def test_no_rows_keep_the_declared_types(engine: sa.Engine) -> None:
    with engine.connect() as conn, columnar.reader(conn) as read:
        table = read.table([_part(9)])
    assert table.num_rows == 0
    assert columnar.empty(_part(9)).schema.types == table.schema.types == [pa.string(), pa.int64(), pa.float64()]


def test_the_drivers_errors_are_sqlalchemys(postgres_server: PostgresServer) -> None:
    """What every caller of a report catches (the CLI, the report API, the rollout controller)."""
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    unreachable = sa.create_engine(f"postgresql+psycopg://u:pw@127.0.0.1:{closed}/none")
    with pytest.raises(sa.exc.OperationalError), columnar.engine_reader(unreachable):
        pass
    engine = engine_for(postgres_server.create_schema(f"t_{uuid.uuid4().hex[:16]}"))
    try:
        with pytest.raises(sa.exc.ProgrammingError, match="columnar_rows"), columnar.engine_reader(engine) as read:
            read.table([_part(1)])  # the table was never created in this schema
    finally:
        engine.dispose()


def test_the_sqlite_childs_errors_are_sqlalchemys(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed read in the child is the OperationalError every caller of a report handles, and
    the child goes on serving the next read."""
    monkeypatch.setattr(columnar, "SQLITE_CHILD_MIN_BYTES", 0)
    engine = engine_for(f"sqlite:///{tmp_path}/store.db")
    metadata.create_all(engine)
    missing = sa.select(sa.literal_column("no_such_column", sa.Integer).label("x")).select_from(rows)
    try:
        with columnar.engine_reader(engine) as read:
            with pytest.raises(sa.exc.OperationalError, match="no_such_column"):
                read.table([missing])
            assert read.table([sa.select(sa.literal(1, sa.Integer).label("one"))])["one"].to_pylist() == [1]
    finally:
        engine.dispose()
