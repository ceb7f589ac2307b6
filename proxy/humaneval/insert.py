"""The dialect's INSERT, whose ON CONFLICT clauses make the human-evaluation writes idempotent.

SQLite's and PostgreSQL's INSERT constructs share the on_conflict_* API (as in `proxy.store.db.Store`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.dialects import postgresql, sqlite


def insert_for(conn: Connection) -> Callable[[Table], Any]:
    return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
