"""The report's rollup: per UTC day, requests per user, episode fragments, request feedback and a
latency sample, built from the raw rows (proxy/store/rollup.py); and `rollup_days`, which days
are current. Every day already stored is entered as not built, so the next build covers it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rollup_days",
        sa.Column("experiment", sa.String(128), nullable=False),
        sa.Column("day", sa.Integer(), nullable=False),
        sa.Column("gen", sa.Integer(), nullable=False),
        sa.Column("built_gen", sa.Integer(), nullable=True),
        sa.Column("built_window_s", sa.Float(), nullable=True),
        sa.Column("built_sample", sa.Integer(), nullable=True),
        sa.Column("built_at", sa.Float(), nullable=True),
        sa.Column("first_ts", sa.Float(), nullable=True),
        sa.Column("last_ts", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("experiment", "day", name="pk_rollup_days"),
    )
    op.create_table(
        "rollup_requests",
        sa.Column("experiment", sa.String(128), nullable=False),
        sa.Column("day", sa.Integer(), nullable=False),
        sa.Column("user_hash", sa.String(64), nullable=True),
        sa.Column("variant", sa.String(16), nullable=False),
        sa.Column("rollout_percent", sa.Float(), nullable=True),
        sa.Column("first_ts", sa.Float(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("empty", sa.Integer(), nullable=False),
        sa.Column("answered", sa.Integer(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        sa.Column("regenerated", sa.Integer(), nullable=False),
    )
    op.create_index("ix_rollup_requests_experiment_day", "rollup_requests", ["experiment", "day"])
    op.create_table(
        "rollup_episodes",
        sa.Column("experiment", sa.String(128), nullable=False),
        sa.Column("day", sa.Integer(), nullable=False),
        sa.Column("user_hash", sa.String(64), nullable=False),
        sa.Column("variant", sa.String(16), nullable=False),
        sa.Column("episode_id", sa.String(256), nullable=False),
        sa.Column("started", sa.Float(), nullable=False),
        sa.Column("turns", sa.Integer(), nullable=False),
    )
    op.create_index("ix_rollup_episodes_experiment_day", "rollup_episodes", ["experiment", "day"])
    op.create_table(
        "rollup_feedback",
        sa.Column("experiment", sa.String(128), nullable=False),
        sa.Column("day", sa.Integer(), nullable=False),
        sa.Column("user_hash", sa.String(64), nullable=False),
        sa.Column("variant", sa.String(16), nullable=False),
        sa.Column("metric", sa.String(64), nullable=False),
        sa.Column("total", sa.Float(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
    )
    op.create_index("ix_rollup_feedback_experiment_day", "rollup_feedback", ["experiment", "day"])
    op.create_table(
        "rollup_latency",
        sa.Column("experiment", sa.String(128), nullable=False),
        sa.Column("variant", sa.String(16), nullable=False),
        sa.Column("day", sa.Integer(), nullable=False),
        sa.Column("sample_key", sa.String(128).with_variant(sa.String(128, collation="C"), "postgresql"),
                  nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("user_hash", sa.String(64), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("ttft_ms", sa.Float(), nullable=True),
    )
    op.create_index("ix_rollup_latency_experiment_variant_sample_key_request_id", "rollup_latency",
                    ["experiment", "variant", "sample_key", "request_id"])  # fmt: skip
    op.create_index("ix_rollup_latency_experiment_day", "rollup_latency", ["experiment", "day"])
    postgres = op.get_bind().dialect.name == "postgresql"
    day = "CAST(floor(ts / 86400) AS INTEGER)" if postgres else "CAST(ts / 86400 AS INTEGER)"
    op.execute(f"INSERT INTO rollup_days (experiment, day, gen) SELECT DISTINCT experiment, {day}, 1 FROM requests")


def downgrade() -> None:
    for table in ("rollup_latency", "rollup_feedback", "rollup_episodes", "rollup_requests", "rollup_days"):
        op.drop_table(table)
