"""Alembic's entry point: runs the revisions on the connection `migrate` hands over.

`proxy.store.db.migrate` builds the Alembic config in code and passes an open connection through
`config.attributes["connection"]`, so no alembic.ini is needed at run time. To author a revision
with the alembic CLI, give it an ini whose `script_location` is this directory, and a URL:
`alembic -c dev.ini -x url=sqlite:///scratch.db revision --autogenerate -m "..."`.

The migrations directory has no __init__.py on purpose: importing this file runs it, so tools
that import every module of `proxy` must not find it (pyproject.toml ships it as package data).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from proxy.store.schema import exists_on, metadata


def _run(connection: Connection) -> None:
    # SQLite cannot ALTER most things in place; batch mode rebuilds the table instead.
    context.configure(
        connection=connection, target_metadata=metadata, render_as_batch=connection.dialect.name == "sqlite",
        include_object=exists_on(connection.dialect.name),
    )
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from proxy.store.db import engine_for

    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise RuntimeError("run migrations with `abproxy store migrate`, or pass -x url=... to the alembic CLI")
    engine = engine_for(url)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


_main()
