"""Blind human comparison: comparisons, studies, evaluators, tasks, votes and judge votes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "comparisons",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("source", sa.String(256), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("responses", sa.Text(), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("flagged", sa.String(256), nullable=True),
        sa.Column("experiment", sa.String(128), nullable=True),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_comparisons"),
        sa.UniqueConstraint("content_hash", name="uq_comparisons_content_hash"),
    )
    op.create_table(
        "studies",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("rubric", sa.Text(), nullable=True),
        sa.Column("settings", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_studies"),
    )
    op.create_table(
        "evaluators",
        sa.Column("study", sa.String(128), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("revoked_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("study", "name", name="pk_evaluators"),
        sa.UniqueConstraint("token_hash", name="uq_evaluators_token_hash"),
    )
    op.create_table(
        "tasks",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("study", sa.String(128), nullable=False),
        sa.Column("evaluator", sa.String(128), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("comparison_id", sa.String(40), nullable=False),
        sa.Column("model_a", sa.String(128), nullable=False),
        sa.Column("model_b", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tasks"),
        sa.UniqueConstraint("study", "evaluator", "comparison_id", name="uq_tasks_study_evaluator_comparison_id"),
        sa.UniqueConstraint("study", "evaluator", "position", name="uq_tasks_study_evaluator_position"),
    )
    op.create_table(
        "votes",
        sa.Column("task_id", sa.String(40), nullable=False),
        sa.Column("study", sa.String(128), nullable=False),
        sa.Column("evaluator", sa.String(128), nullable=False),
        sa.Column("comparison_id", sa.String(40), nullable=False),
        sa.Column("model_a", sa.String(128), nullable=False),
        sa.Column("model_b", sa.String(128), nullable=False),
        sa.Column("choice", sa.String(8), nullable=False),
        sa.Column("why", sa.Text(), nullable=True),
        sa.Column("rubric", sa.Text(), nullable=True),
        sa.Column("time_taken_ms", sa.Float(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("task_id", name="pk_votes"),
    )
    op.create_index("ix_votes_study_created_at", "votes", ["study", "created_at"])
    op.create_table(
        "judge_votes",
        sa.Column("study", sa.String(128), nullable=False),
        sa.Column("comparison_id", sa.String(40), nullable=False),
        sa.Column("judge", sa.String(128), nullable=False),
        sa.Column("sides", sa.String(2), nullable=False),
        sa.Column("model_a", sa.String(128), nullable=False),
        sa.Column("model_b", sa.String(128), nullable=False),
        sa.Column("choice", sa.String(8), nullable=False),
        sa.Column("rubric", sa.Text(), nullable=True),
        sa.Column("raw", sa.Text(), nullable=True),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("study", "comparison_id", "judge", "sides", name="pk_judge_votes"),
    )


def downgrade() -> None:
    for table in ("judge_votes", "votes", "tasks", "evaluators", "studies", "comparisons"):
        op.drop_table(table)
