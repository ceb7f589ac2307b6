"""The store's tables: one row per routed request, one row per (subject, metric) of feedback.

This metadata is what the Alembic revisions must build; a test compares the migrated database
with it. Change a table here and in a new revision under `migrations/versions/`, never only here.

`requests.prompt` holds the prompt JSON-encoded (a messages list or a string), and with
`completion` is filled only for experiments that store prompts. `feedback.subject` is what the
feedback is about: `req:<request_id>` or `user:<experiment or *>:<user_hash>`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
    text,
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
    # Only what queries look up: a window of one experiment, and one experiment's users (the
    # report's tie-breaks). Every index is paid on every insert (revision 0004 dropped two unused).
    Index(None, "experiment", "ts"),
    Index(None, "experiment", "user_hash"),
)

_USER_LEVEL = text("level = 'user'")  # ix_feedback_user_level's rows

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
    # The report's read of user-level feedback, a few per cent of the rows: without it, a scan of
    # all feedback (migration 0007). Partial, so request-level feedback's writes never touch it.
    Index("ix_feedback_user_level", "experiment", "ts", "user_hash", "metric", "value",
          postgresql_where=_USER_LEVEL, sqlite_where=_USER_LEVEL),
)

# -- the report's rollup (proxy/store/rollup.py) ---------------------------------------------
# What `abproxy report` reads instead of the raw rows for a UTC day that is over: the day's
# requests aggregated per user, the fragments of its episodes, its request feedback, and a
# sample of its latencies. Each day is rebuilt from the raw rows as a whole (never patched), so
# these tables hold no fact of their own; `rollup_days` says which days are current.

rollup_days = Table(
    "rollup_days",
    metadata,
    Column("experiment", String(128), primary_key=True),
    Column("day", Integer, primary_key=True),  # floor(ts / 86400): the UTC day
    Column("gen", Integer, nullable=False),  # bumped by every write that touches the day
    Column("built_gen", Integer),  # gen as the last build read it; current when equal
    Column("built_window_s", Float),  # the regeneration window the build counted with
    Column("built_sample", Integer),  # the latency sample's size per variant
    Column("built_at", Float),
    Column("first_ts", Float),  # the day's earliest and latest request when built
    Column("last_ts", Float),
)

rollup_requests = Table(
    "rollup_requests",
    metadata,
    Column("experiment", String(128), nullable=False),
    Column("day", Integer, nullable=False),
    Column("user_hash", String(64)),
    Column("variant", String(16), nullable=False),
    Column("rollout_percent", Float),
    Column("first_ts", Float, nullable=False),
    Column("requests", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    Column("empty", Integer, nullable=False),
    Column("answered", Integer, nullable=False),
    Column("latency_ms", Float, nullable=False),  # sum over the answered
    Column("cost_usd", Float),  # sum; null when no request had a cost
    Column("regenerated", Integer, nullable=False),
    Index(None, "experiment", "day"),
)

_CONTINUED = text("prev_day IS NOT NULL")

rollup_episodes = Table(
    "rollup_episodes",
    metadata,
    Column("experiment", String(128), nullable=False),
    Column("day", Integer, nullable=False),
    Column("user_hash", String(64), nullable=False),
    Column("variant", String(16), nullable=False),
    Column("episode_id", String(256), nullable=False),
    Column("started", Float, nullable=False),  # the episode's first request that day
    Column("turns", Integer, nullable=False),
    # The latest earlier day holding a fragment of this episode (same user, variant and id) when
    # the day was built; NULL: none, the episode begins here (migration 0008).
    Column("prev_day", Integer),
    Index(None, "experiment", "day"),
    # Episode order: a build finds each fragment's prev_day through it, and a report with live
    # spans merges each episode's fragments as it reads them in order (migration 0006; 0008 on SQLite).
    Index("ix_rollup_episodes_by_episode", "experiment", "user_hash", "variant", "episode_id", "day", "started",
          "turns"),
    # The few fragments that continue an episode: a window that starts after the experiment did
    # counts those whose episode began before it (prev_day before the window) as beginning in it.
    Index(None, "experiment", "prev_day", postgresql_where=_CONTINUED, sqlite_where=_CONTINUED),
)

# Per (day, user, variant): the turns of the day's fragments and the episodes that begin that day
# (fragments without prev_day). What a report reads of rolled-up days: users x days, not fragments.
rollup_episode_days = Table(
    "rollup_episode_days",
    metadata,
    Column("experiment", String(128), nullable=False),
    Column("day", Integer, nullable=False),
    Column("user_hash", String(64), nullable=False),
    Column("variant", String(16), nullable=False),
    Column("turns", Integer, nullable=False),
    Column("episodes", Integer, nullable=False),
    Index(None, "experiment", "day"),
)

rollup_feedback = Table(
    "rollup_feedback",
    metadata,
    Column("experiment", String(128), nullable=False),
    Column("day", Integer, nullable=False),  # the day of the request the feedback is about
    Column("user_hash", String(64), nullable=False),
    Column("variant", String(16), nullable=False),
    Column("metric", String(64), nullable=False),
    Column("total", Float, nullable=False),
    Column("count", Integer, nullable=False),
    Index(None, "experiment", "day"),
)

rollup_latency = Table(
    "rollup_latency",
    metadata,
    Column("experiment", String(128), nullable=False),
    Column("variant", String(16), nullable=False),
    Column("day", Integer, nullable=False),
    # Ordered by code point on both back-ends (PostgreSQL: the "C" collation), see rollup.sample_key.
    Column("sample_key", String(128).with_variant(String(128, collation="C"), "postgresql"), nullable=False),
    Column("request_id", String(128), nullable=False),
    Column("user_hash", String(64)),
    Column("latency_ms", Float),
    Column("ttft_ms", Float),
    Index(None, "experiment", "variant", "sample_key", "request_id"),
    Index(None, "experiment", "day"),
)

# -- blind human comparison (proxy/humaneval) -------------------------------------------------
# A comparison is one prompt with two or more models' answers. A study hands comparisons to
# evaluators as tasks; a task fixes which model is shown as A (left) and which as B, and that
# mapping never leaves the server: pages and URLs carry only the task's random id.

comparisons = Table(
    "comparisons",
    metadata,
    Column("id", String(40), primary_key=True),  # "c_" + random hex
    Column("source", String(256), nullable=False),  # "import:<file>", "production:<experiment>", "eval:<run>"
    Column("prompt", Text, nullable=False),  # JSON: a string or a messages list
    Column("responses", Text, nullable=False),  # JSON: {model name: answer text}
    Column("content_hash", String(64), nullable=False),  # re-importing the same pair adds nothing
    Column("flagged", String(256)),  # why an answer may give its model away ("names 'fine-tuned'")
    Column("experiment", String(128)),
    Column("request_id", String(128)),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("content_hash"),
)

studies = Table(
    "studies",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("rubric", Text),  # JSON: the criteria with their kind and guidance
    Column("settings", Text, nullable=False),  # JSON: models, per_evaluator, overlap, seed, source
    Column("created_at", Float, nullable=False),
)

evaluators = Table(
    "evaluators",
    metadata,
    Column("study", String(128), primary_key=True),
    Column("name", String(128), primary_key=True),
    Column("token_hash", String(64), nullable=False),  # sha256 of the link's token; the token itself is never stored
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),
    UniqueConstraint("token_hash"),
)

tasks = Table(
    "tasks",
    metadata,
    Column("id", String(40), primary_key=True),  # "t_" + random hex: all a page or URL ever shows
    Column("study", String(128), nullable=False),
    Column("evaluator", String(128), nullable=False),
    Column("position", Integer, nullable=False),  # order in the evaluator's list, from 0
    Column("comparison_id", String(40), nullable=False),
    Column("model_a", String(128), nullable=False),  # shown on the left
    Column("model_b", String(128), nullable=False),  # shown on the right
    UniqueConstraint("study", "evaluator", "comparison_id"),
    UniqueConstraint("study", "evaluator", "position"),
)

votes = Table(
    "votes",
    metadata,
    Column("task_id", String(40), primary_key=True),  # one vote per task: a double submit changes nothing
    Column("study", String(128), nullable=False),
    Column("evaluator", String(128), nullable=False),
    Column("comparison_id", String(40), nullable=False),
    Column("model_a", String(128), nullable=False),
    Column("model_b", String(128), nullable=False),
    Column("choice", String(8), nullable=False),  # A | tie | B
    Column("why", Text),
    Column("rubric", Text),  # JSON: criterion -> A|tie|B, or "<criterion>.A"/".B" -> 1..5
    Column("time_taken_ms", Float),
    Column("created_at", Float, nullable=False),
    Index(None, "study", "created_at"),
)

judge_votes = Table(
    "judge_votes",
    metadata,
    Column("study", String(128), primary_key=True),
    Column("comparison_id", String(40), primary_key=True),
    Column("judge", String(128), primary_key=True),  # the config's model name
    Column("sides", String(2), primary_key=True),  # "ab" or "ba": both orders are asked
    Column("model_a", String(128), nullable=False),
    Column("model_b", String(128), nullable=False),
    Column("choice", String(8), nullable=False),
    Column("rubric", Text),
    Column("raw", Text),  # the judge's answer, for audit
    Column("cost_usd", Float),
    Column("created_at", Float, nullable=False),
)

# -- offline evaluation (proxy/offline_eval) --------------------------------------------------
# A run sends every example of a held-out test file to each of its models. Its identity is what
# the models were asked (test file, models, system prompt, max_tokens), so starting the same run
# again resumes it; how answers are scored (checks, case folding) may change and is re-applied.

eval_runs = Table(
    "eval_runs",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("test_file", String(1024), nullable=False),
    Column("test_sha256", String(64), nullable=False),
    Column("examples", Integer, nullable=False),
    Column("models", Text, nullable=False),  # JSON: [{"name", "upstream", "model"}], the baseline first
    Column("system_prompt", Text),
    Column("max_tokens", Integer, nullable=False),
    Column("scoring", Text, nullable=False),  # JSON: {"casefold": bool, "checks": [...], "checks_file": ...}
)

eval_examples = Table(
    "eval_examples",
    metadata,
    Column("run_id", String(128), primary_key=True),
    Column("example_id", String(64), primary_key=True),
    Column("position", Integer, nullable=False),  # 0-based order among the file's examples
    Column("line", Integer, nullable=False),  # 1-based line in the test file
    Column("prompt", Text, nullable=False),  # JSON: the messages sent (system prompt applied)
    Column("expected", Text, nullable=False),
)

eval_results = Table(
    "eval_results",
    metadata,
    Column("run_id", String(128), primary_key=True),
    Column("model", String(128), primary_key=True),  # the config's model name
    Column("example_id", String(64), primary_key=True),
    Column("prediction", Text, nullable=False),
    Column("finish_reason", String(32)),
    Column("exact", Boolean, nullable=False),
    Column("format_ok", Boolean),  # null when the run declares no format check
    Column("format_failures", Text),  # JSON: names of the checks that failed
    Column("similarity", Float, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("cost_usd", Float),
    Column("attempts", Integer, nullable=False),  # 1 + retries it took
    Column("created_at", Float, nullable=False),
)


def exists_on(dialect: str) -> Callable[[Any, str | None, str, bool, Any], bool]:
    """Alembic's include_object for comparing a `dialect` store with this metadata: an item whose
    info names its dialects (one back-end's index) is left out of the others' comparison."""

    def include(item: Any, _name: str | None, _type: str, _reflected: bool, _compare_to: Any) -> bool:
        dialects = getattr(item, "info", {}).get("dialects")
        return dialects is None or dialect in dialects

    return include
