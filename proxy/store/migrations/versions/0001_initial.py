"""The requests and feedback tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "requests",
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("experiment", sa.String(128), nullable=False),
        sa.Column("variant", sa.String(16), nullable=False),
        sa.Column("model", sa.String(128), nullable=True),
        sa.Column("upstream_model", sa.String(256), nullable=True),
        sa.Column("user_hash", sa.String(64), nullable=True),
        sa.Column("bucket", sa.Integer(), nullable=True),
        sa.Column("rollout_percent", sa.Float(), nullable=True),
        sa.Column("episode_id", sa.String(256), nullable=True),
        sa.Column("endpoint", sa.String(64), nullable=True),
        sa.Column("stream", sa.Boolean(), nullable=True),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("upstream_status", sa.Integer(), nullable=True),
        sa.Column("error", sa.String(64), nullable=True),
        sa.Column("finish_reason", sa.String(64), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("ttft_ms", sa.Float(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        sa.Column("prompt_hash", sa.String(64), nullable=True),
        sa.Column("client_request_id", sa.String(128), nullable=True),
        sa.Column("prompt", sa.Text(), nullable=True),
        sa.Column("completion", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("request_id", name="pk_requests"),
    )
    op.create_index("ix_requests_experiment_ts", "requests", ["experiment", "ts"])
    op.create_index("ix_requests_experiment_user_hash", "requests", ["experiment", "user_hash"])
    op.create_index("ix_requests_user_hash_prompt_hash_ts", "requests", ["user_hash", "prompt_hash", "ts"])
    op.create_index("ix_requests_episode_id", "requests", ["episode_id"])

    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("subject", sa.String(256), nullable=False),
        sa.Column("metric", sa.String(64), nullable=False),
        sa.Column("level", sa.String(8), nullable=True),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("user_hash", sa.String(64), nullable=True),
        sa.Column("experiment", sa.String(128), nullable=True),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("episode_id", sa.String(256), nullable=True),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("feedback_id", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_feedback"),
        sa.UniqueConstraint("subject", "metric", name="uq_feedback_subject_metric"),
    )
    op.create_index("ix_feedback_request_id", "feedback", ["request_id"])
    op.create_index("ix_feedback_user_hash", "feedback", ["user_hash"])


def downgrade() -> None:
    op.drop_table("feedback")
    op.drop_table("requests")
