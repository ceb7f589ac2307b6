"""Drop the two request indexes no query uses.

The report reads a window of requests in full (each statement a sequential scan with a hash
aggregate or a sort, on both back-ends: EXPLAIN on PostgreSQL, and the same report time on SQLite
with and without them), and nothing else looks requests up by episode or by (user, prompt): yet
every insert paid for both, a random-key B-tree each. The collector's SQLite write went from 36 to
~20 µs of CPU per request without them (README, "The benchmark suite").

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_requests_user_hash_prompt_hash_ts", table_name="requests")
    op.drop_index("ix_requests_episode_id", table_name="requests")


def downgrade() -> None:
    op.create_index("ix_requests_user_hash_prompt_hash_ts", "requests", ["user_hash", "prompt_hash", "ts"])
    op.create_index("ix_requests_episode_id", "requests", ["episode_id"])
