"""proxy.store: migrations, schema and idempotent batch writes, each case on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, select

from proxy.store.db import (
    SQLITE_WAL_CHECKPOINT_PAGES,
    Store,
    WriteResult,
    check_event,
    current_revision,
    engine_for,
    feedback_row,
    head_revision,
    migrate,
    normalise_url,
    request_row,
)
from proxy.store.schema import comparisons, exists_on, feedback, metadata, requests

T0 = 1_795_406_672.0


def request_event(request_id: str, **overrides: Any) -> dict[str, Any]:
    """A routed request's event with every key the proxy writes (prompts off)."""
    event: dict[str, Any] = {
        "ts": T0, "time": "2026-11-23T10:04:32+00:00", "schema_version": 1, "request_id": request_id,
        "experiment": "sales-companion", "variant": "treatment", "model": "finetuned",
        "upstream_model": "ft:gpt-4o-mini:acme:sales-v2:abc123", "user_hash": "9f2c" * 8, "bucket": 1234,
        "rollout_percent": 12.5, "episode_id": "conv-123", "endpoint": "chat.completions", "stream": True,
        "status": 200, "upstream_status": 200, "error": None, "finish_reason": "stop", "latency_ms": 412.3,
        "ttft_ms": 88.1, "prompt_tokens": 57, "completion_tokens": 212, "cost_usd": 0.0002715,
        "prompt_hash": "ab" * 16, "client_request_id": None,
    }  # fmt: skip
    event.update(overrides)
    return event


def feedback_event(metric: str, value: float, ts: float, **overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "kind": "feedback", "ts": ts, "time": "2026-11-23T10:05:00+00:00", "feedback_id": f"fb-{ts}",
        "level": "request", "request_id": "req-1", "user_hash": None, "experiment": "sales-companion",
        "metric": metric, "value": value, "episode_id": None,
    }  # fmt: skip
    event.update(overrides)
    return event


@pytest.fixture()
def engine(store_url: str) -> Iterator[Engine]:
    engine = engine_for(store_url)
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture()
def store(engine: Engine) -> Store:
    return Store(engine)


def stored_requests(engine: Engine) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        return {row["request_id"]: dict(row) for row in conn.execute(select(requests)).mappings()}


def stored_feedback(engine: Engine) -> dict[tuple[str, str], dict[str, Any]]:
    with engine.connect() as conn:
        return {(row["subject"], row["metric"]): dict(row) for row in conn.execute(select(feedback)).mappings()}


class TestMigrate:
    def test_twice_is_a_noop(self, store_url: str) -> None:
        """A second migrate keeps the revision, the tables and their rows."""
        engine = engine_for(store_url)
        try:
            migrate(engine)
            Store(engine).write([request_event("r1")])
            migrate(engine)
            assert current_revision(engine) == head_revision() == "0008"
            assert set(stored_requests(engine)) == {"r1"}
            assert {"requests", "feedback", "alembic_version"} <= set(inspect(engine).get_table_names())
        finally:
            engine.dispose()

    def test_migrated_schema_equals_metadata(self, engine: Engine) -> None:
        """The hand-written revisions build exactly what schema.py describes (autogenerate finds nothing)."""
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"include_object": exists_on(conn.dialect.name)})
            diff = compare_metadata(context, metadata)
        assert diff == []

    def test_dropping_the_unused_request_indexes_is_reversible(self, engine: Engine) -> None:
        """Revision 0004 drops the episode and (user, prompt, ts) indexes, keeping the rows; a
        downgrade to 0003 builds them again, and upgrading once more drops them."""
        from alembic import command

        from proxy.store.db import _alembic_config

        def indexes() -> set[str]:
            return {str(ix["name"]) for ix in inspect(engine).get_indexes("requests")}

        Store(engine).write([request_event("r1", episode_id="ep-1")])
        unused = {"ix_requests_episode_id", "ix_requests_user_hash_prompt_hash_ts"}
        assert not unused & indexes()
        assert {"ix_requests_experiment_ts", "ix_requests_experiment_user_hash"} <= indexes()
        with engine.begin() as connection:
            command.downgrade(_alembic_config(connection), "0003")
        assert unused <= indexes()
        migrate(engine)
        assert not unused & indexes()
        assert set(stored_requests(engine)) == {"r1"}

    def test_sqlite_connections_are_set_up_for_a_writer_and_readers(self, tmp_path: Path) -> None:
        """Every SQLite connection: WAL (the report reads while the collector writes), commits synced,
        a 64 MiB page cache and the WAL checkpointed every SQLITE_WAL_CHECKPOINT_PAGES pages."""
        engine = engine_for(f"sqlite:///{tmp_path / 'pragmas.db'}")
        try:
            with engine.connect() as conn:
                def pragma(name: str) -> Any:
                    return conn.exec_driver_sql(f"PRAGMA {name}").scalar_one()

                assert pragma("journal_mode") == "wal"
                assert pragma("synchronous") == 2  # FULL
                assert pragma("cache_size") == -65536
                assert pragma("wal_autocheckpoint") == SQLITE_WAL_CHECKPOINT_PAGES
                assert pragma("busy_timeout") == 10000
        finally:
            engine.dispose()

    def test_postgresql_urls_use_psycopg(self) -> None:
        """postgresql:// is normalised to the psycopg 3 driver; other databases are refused."""
        assert normalise_url("postgresql://u:p@db:5432/abproxy").drivername == "postgresql+psycopg"
        assert normalise_url("postgresql+psycopg://u@db/abproxy").drivername == "postgresql+psycopg"
        assert normalise_url("sqlite:///abproxy.db").drivername == "sqlite"
        with pytest.raises(ValueError, match="unsupported store URL"):
            normalise_url("mysql://u@db/abproxy")
        with pytest.raises(ValueError, match="unsupported store URL"):
            normalise_url("postgresql+psycopg2://u@db/abproxy")


class TestRequests:
    def test_every_field_is_stored(self, store: Store, engine: Engine) -> None:
        """Each column holds the event's value of the same name."""
        event = request_event("r1", client_request_id="client-7", error="5xx", upstream_status=502, stream=False)
        assert store.write([event]) == WriteResult(requests_inserted=1)
        row = stored_requests(engine)["r1"]
        for column in requests.columns.keys():
            assert row[column] == event.get(column), column

    def test_stored_once_within_a_batch(self, store: Store, engine: Engine) -> None:
        """The same request id twice in one batch is one row; the first copy is kept."""
        result = store.write([request_event("r1", latency_ms=1.0), request_event("r1", latency_ms=2.0)])
        assert result == WriteResult(requests_inserted=1, requests_duplicate=1)
        assert stored_requests(engine)["r1"]["latency_ms"] == 1.0

    def test_stored_once_across_batches(self, store: Store, engine: Engine) -> None:
        """A redelivered request event is ignored; the row already stored stays as it was."""
        store.write([request_event("r1", latency_ms=1.0), request_event("r2")])
        result = store.write([request_event("r1", latency_ms=2.0), request_event("r3")])
        assert result == WriteResult(requests_inserted=1, requests_duplicate=1)
        rows = stored_requests(engine)
        assert set(rows) == {"r1", "r2", "r3"}
        assert rows["r1"]["latency_ms"] == 1.0

    def test_rejected_requests_are_skipped(self, store: Store, engine: Engine) -> None:
        """Events of requests refused before routing (experiment null) are counted, not stored."""
        rejected = {"ts": T0, "request_id": "bad", "experiment": None, "path": "/v1/chat/completions",
                    "status": 400, "error": "invalid_request_error", "latency_ms": 0.3}  # fmt: skip
        assert store.write([rejected, request_event("r1")]) == WriteResult(requests_inserted=1, skipped=1)
        assert set(stored_requests(engine)) == {"r1"}

    def test_unknown_keys_ignored_and_missing_keys_null(self, store: Store, engine: Engine) -> None:
        """Keys the schema lacks are dropped; optional keys the event lacks are NULL."""
        event = {"ts": T0, "request_id": "r1", "experiment": "e", "variant": "control", "new_field": {"x": 1}}
        store.write([event])
        row = stored_requests(engine)["r1"]
        assert row["variant"] == "control"
        assert all(row[key] is None for key in row if key not in ("ts", "request_id", "experiment", "variant"))

    def test_prompt_stored_only_when_present(self, store: Store, engine: Engine) -> None:
        """prompt (JSON-encoded) and completion are stored when the event carries them, else NULL."""
        messages = [{"role": "user", "content": "Hi \u00e9"}]
        store.write([
            request_event("with", prompt=messages, completion="Hello!"),
            request_event("text", prompt="Complete this", completion=None),
            request_event("without"),
        ])  # fmt: skip
        rows = stored_requests(engine)
        assert orjson.loads(rows["with"]["prompt"]) == messages
        assert rows["with"]["completion"] == "Hello!"
        assert orjson.loads(rows["text"]["prompt"]) == "Complete this"
        assert rows["text"]["completion"] is None
        assert rows["without"]["prompt"] is None and rows["without"]["completion"] is None

    def test_an_unusable_event_fails_the_batch_before_writing(self, store: Store, engine: Engine) -> None:
        """A batch holding an event the table cannot hold raises ValueError and writes nothing."""
        with pytest.raises(ValueError, match="variant"):
            store.write([request_event("r1"), request_event("r2", variant=None)])
        assert stored_requests(engine) == {}


class TestFeedback:
    def test_last_value_wins_within_a_batch(self, store: Store, engine: Engine) -> None:
        """Two values for one subject and metric in a batch: the later ts wins, whatever the order."""
        result = store.write([feedback_event("thumbs", 1.0, T0 + 2), feedback_event("thumbs", 0.0, T0 + 1)])
        assert result == WriteResult(feedback_written=1)
        row = stored_feedback(engine)[("req:req-1", "thumbs")]
        assert (row["value"], row["ts"], row["feedback_id"]) == (1.0, T0 + 2, f"fb-{T0 + 2}")

    def test_newer_value_replaces_and_older_redelivery_does_not(self, store: Store, engine: Engine) -> None:
        """A newer event replaces the value; an older one redelivered afterwards changes nothing."""
        store.write([feedback_event("thumbs", 0.0, T0 + 1)])
        assert store.write([feedback_event("thumbs", 1.0, T0 + 3, episode_id="ep")]) == WriteResult(feedback_written=1)
        assert store.write([feedback_event("thumbs", 0.0, T0 + 1)]) == WriteResult(feedback_written=0)
        assert store.write([feedback_event("thumbs", 0.5, T0 + 2)]) == WriteResult(feedback_written=0)
        rows = stored_feedback(engine)
        assert len(rows) == 1
        row = rows[("req:req-1", "thumbs")]
        assert (row["value"], row["ts"], row["episode_id"]) == (1.0, T0 + 3, "ep")

    def test_one_row_per_subject_and_metric(self, store: Store, engine: Engine) -> None:
        """Metrics and subjects are independent: each (subject, metric) pair holds its own value."""
        store.write([
            feedback_event("thumbs", 1.0, T0),
            feedback_event("rating", 4.0, T0),
            feedback_event("thumbs", 0.0, T0, request_id="req-2"),
        ])  # fmt: skip
        assert {key: row["value"] for key, row in stored_feedback(engine).items()} == {
            ("req:req-1", "thumbs"): 1.0, ("req:req-1", "rating"): 4.0, ("req:req-2", "thumbs"): 0.0,
        }  # fmt: skip

    def test_user_level_subjects(self, store: Store, engine: Engine) -> None:
        """User-level feedback is keyed by experiment (or * for all experiments) and user hash."""
        user = {"level": "user", "request_id": None, "user_hash": "u1"}
        store.write([
            feedback_event("retained", 1.0, T0, **user),
            feedback_event("retained", 0.0, T0, **{**user, "experiment": None}),
            feedback_event("retained", 1.0, T0, **{**user, "experiment": "other"}),
        ])  # fmt: skip
        rows = stored_feedback(engine)
        assert set(rows) == {
            ("user:sales-companion:u1", "retained"), ("user:*:u1", "retained"), ("user:other:u1", "retained"),
        }  # fmt: skip
        assert rows[("user:*:u1", "retained")]["experiment"] is None
        assert rows[("user:*:u1", "retained")]["level"] == "user"
        assert rows[("user:*:u1", "retained")]["user_hash"] == "u1"

    def test_unknown_kind_is_skipped(self, store: Store, engine: Engine) -> None:
        """An event of a kind this collector does not know is counted as skipped."""
        assert store.write([{"kind": "rating-v9", "ts": T0}]) == WriteResult(skipped=1)
        assert stored_feedback(engine) == {} and stored_requests(engine) == {}


class TestRows:
    def test_request_row_refuses_what_the_table_cannot_hold(self) -> None:
        """Missing required keys, wrong types and over-long ids raise ValueError."""
        for bad in (
            {"variant": None}, {"ts": None}, {"ts": "yesterday"}, {"status": True}, {"bucket": 2**40},
            {"stream": 1}, {"request_id": "x" * 129}, {"user_hash": "ab\x00cd"}, {"request_id": ""},
        ):  # fmt: skip
            with pytest.raises(ValueError):
                request_row({**request_event("r1"), **bad})

    def test_request_row_cuts_free_text_and_replaces_nul(self) -> None:
        """Over-long free text is cut to its column; NUL (which PostgreSQL refuses) is replaced."""
        row = request_row(request_event("r1", finish_reason="x" * 100, completion="a\x00b"))
        assert row is not None
        assert row["finish_reason"] == "x" * 64
        assert row["completion"] == "a\ufffdb"

    def test_feedback_row_needs_its_subject(self) -> None:
        """Request-level feedback needs a request id, user-level a user hash, and the level must be known."""
        with pytest.raises(ValueError, match="request_id"):
            feedback_row(feedback_event("thumbs", 1.0, T0, request_id=None))
        with pytest.raises(ValueError, match="user_hash"):
            feedback_row(feedback_event("thumbs", 1.0, T0, level="user"))
        with pytest.raises(ValueError, match="level"):
            feedback_row(feedback_event("thumbs", 1.0, T0, level="session"))
        with pytest.raises(ValueError, match="value"):
            feedback_row(feedback_event("thumbs", True, T0))  # booleans arrive as 1.0/0.0


def pair_event(request_id: str, ft_answer: str = "Happy to help: here is the plan.") -> dict[str, Any]:
    return {"kind": "pair", "ts": 1_800_000_000.0, "request_id": request_id, "experiment": "sales-companion",
            "prompt": [{"role": "user", "content": "pitch me"}], "responses": {"base": "Sure.", "finetuned": ft_answer},
            "cost_usd": 0.0001}


class TestPairs:
    """Production pairs (proxy/pair_sampling.py) become comparisons, once each, flagged like imports."""

    def test_stored_once_as_a_production_comparison(self, engine: Engine, store: Store) -> None:
        result = store.write([pair_event("r1"), pair_event("r1")])
        assert result.pairs_added == 1
        assert store.write([pair_event("r1")]).pairs_added == 0  # redelivered
        store.write([pair_event("r2", "As a fine-tuned model, I suggest this.")])
        with engine.connect() as conn:
            rows = {r.request_id: r for r in conn.execute(select(comparisons)).all()}
        assert rows["r1"].source == "production:sales-companion" and rows["r1"].experiment == "sales-companion"
        assert rows["r1"].flagged is None and "fine-tuned" in (rows["r2"].flagged or "")

    def test_a_pair_with_one_answer_is_refused(self, store: Store) -> None:
        bad = {**pair_event("r3"), "responses": {"base": "only one"}}
        with pytest.raises(ValueError):
            check_event(bad)
