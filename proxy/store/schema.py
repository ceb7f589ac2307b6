"""The store's tables: one row per routed request, one row per (subject, metric) of feedback.

This metadata is what the Alembic revisions must build; a test compares the migrated database
with it. Change a table here and in a new revision under `migrations/versions/`, never only here.

`requests.prompt` holds the prompt JSON-encoded (a messages list or a string), and with
`completion` is filled only for experiments that store prompts. `feedback.subject` is what the
feedback is about: `req:<request_id>` or `user:<experiment or *>:<user_hash>`.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

# Named constraints, so a later revision can drop or alter them by name on either back-end.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)

requests = Table(
    "requests",
    metadata,
    Column("request_id", String(128), primary_key=True),
    Column("ts", Float, nullable=False),  # unix seconds, when the request finished
    Column("experiment", String(128), nullable=False),
    Column("variant", String(16), nullable=False),
    Column("model", String(128)),
    Column("upstream_model", String(256)),
    Column("user_hash", String(64)),
    Column("bucket", Integer),
    Column("rollout_percent", Float),  # the treatment percent in force when it was routed
    Column("episode_id", String(256)),
    Column("endpoint", String(64)),
    Column("stream", Boolean),
    Column("status", Integer),
    Column("upstream_status", Integer),
    Column("error", String(64)),
    Column("finish_reason", String(64)),
    Column("latency_ms", Float),
    Column("ttft_ms", Float),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("cost_usd", Float),
    Column("prompt_hash", String(64)),
    Column("client_request_id", String(128)),
    Column("prompt", Text),
    Column("completion", Text),
    Index(None, "experiment", "ts"),
    Index(None, "experiment", "user_hash"),
    # Regeneration: the same user sending the same prompt again shortly after.
    Index(None, "user_hash", "prompt_hash", "ts"),
    Index(None, "episode_id"),
)

feedback = Table(
    "feedback",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("subject", String(256), nullable=False),
    Column("metric", String(64), nullable=False),
    Column("level", String(8)),
    Column("request_id", String(128)),
    Column("user_hash", String(64)),
    Column("experiment", String(128)),
    Column("value", Float, nullable=False),
    Column("episode_id", String(256)),
    Column("ts", Float, nullable=False),  # the feedback's own time: the later one wins
    Column("feedback_id", String(64)),
    UniqueConstraint("subject", "metric"),
    Index(None, "request_id"),
    Index(None, "user_hash"),
)
