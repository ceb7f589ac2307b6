"""The collector: the event stream, read through a consumer group, written to the store in batches.

Delivery is at least once: entries are acked only after the batch's transaction has committed,
so a collector killed at any point leaves its batch pending, and the store's writes are
idempotent (see `db.py`), so reading a batch again stores nothing twice. Each step reads one
batch, from the first source that has entries:

    1. its own pending entries (XREADGROUP from id 0): what this consumer name read and did not
       ack in a previous life, or before a failed write; paged through once at start and again
       after every failure, so a failed batch is retried at once, not after `claim_idle_ms`
    2. entries other consumers have held unacked for `claim_idle_ms` (XAUTOCLAIM): a dead
       collector's batch is taken over by a live one
    3. new entries (XREADGROUP >), waiting up to `block_ms` for them

Entry by entry:
    malformed (decode_entry refuses it, or the store could not hold the event)
                         logged, counted, acked: a poison entry must never block the group
    schema_version newer than this code
                         logged, left pending (unacked) for a newer collector to claim
    trimmed by MAXLEN while pending (no fields)
                         acked: nothing left to store

`run` never exits on a Redis or database error: it logs, backs off (up to 5 s) and tries again,
without acking. Only `stop` ends it, after the batch in hand.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError, ResponseError
from sqlalchemy.exc import SQLAlchemyError

from proxy.event_stream import SCHEMA_VERSION, ConsumerGroupReader, RawEntry, decode_entry
from proxy.store.db import Store, WriteResult, check_event

log = structlog.get_logger("abproxy")

# (entry id, fields) as redis-py returns them from a client without decode_responses

MAX_BACKOFF_S = 5.0
MAX_CLAIM_PAUSE_S = 5.0
SUMMARY_INTERVAL_S = 30.0


def default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Collector:
    """One consumer of the group. `redis` must return bytes (no decode_responses)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        store: Store,
        *,
        key: str,
        group: str,
        consumer: str,
        batch_size: int = 500,
        block_ms: int = 1000,
        claim_idle_ms: int = 60_000,
    ) -> None:
        self.redis, self.store = redis, store
        self.key, self.group, self.consumer = key, group, consumer
        self.batch_size, self.block_ms, self.claim_idle_ms = batch_size, block_ms, claim_idle_ms
        self.reader = ConsumerGroupReader(redis, group, consumer, key)
        self.processed = self.stored = self.duplicates = self.skipped = self.malformed = self.feedback = 0
        self.newer = 0  # entries of a newer schema version, left pending
        self.pairs = 0  # production pairs added as comparisons
        # Their ids: claimed or read again, they are neither logged nor counted twice, and a
        # claim that returns only these is no reason to skip reading new entries.
        self._deferred: set[bytes] = set()
        self._group_ready = False
        self._own_cursor: str | None = "0"  # paging through our own pending entries; None: done
        self._claim_cursor = "0-0"
        self._next_claim = 0.0  # monotonic time; a full XAUTOCLAIM scan that found nothing waits
        # A scan that found nothing idle enough need not be repeated before anything could be.
        self._claim_pause_s = min(claim_idle_ms / 1000, MAX_CLAIM_PAUSE_S)

    def counters(self) -> dict[str, int]:
        return {
            "processed": self.processed, "stored": self.stored, "duplicates": self.duplicates,
            "skipped": self.skipped, "malformed": self.malformed, "feedback": self.feedback, "newer": self.newer,
            "pairs": self.pairs,
        }  # fmt: skip

    async def step(self) -> int:
        """Read, store and ack one batch; returns the entries handled (0: nothing came within block_ms)."""
        return await self._step(self.block_ms)

    async def drain(self, stop: asyncio.Event | None = None) -> int:
        """Handle batches without waiting for new entries until none is left; raises on any error."""
        total = 0
        while stop is None or not stop.is_set():
            handled = await self._step(None)
            if not handled:
                break
            total += handled
        return total

    async def run(self, stop: asyncio.Event) -> None:
        """Step until `stop` is set; Redis and database errors are logged and retried, never fatal."""
        delay = 0.0
        last_summary, summarised = time.monotonic(), self.counters()
        while not stop.is_set():
            try:
                await self.step()
            except (RedisError, OSError, TimeoutError, SQLAlchemyError) as exc:
                delay = min(max(delay * 2, 0.1), MAX_BACKOFF_S)
                log.error("collector_error", error=error_line(exc), kind=type(exc).__name__, retry_in_s=delay)
                await _wait(stop, delay)
                continue
            if delay:
                delay = 0.0
                log.info("collector_recovered")
            if time.monotonic() - last_summary >= SUMMARY_INTERVAL_S:
                last_summary = time.monotonic()
                if self.counters() != summarised:
                    summarised = self.counters()
                    log.info("collector_progress", **summarised)

    async def _step(self, block_ms: int | None) -> int:
        try:
            entries = await self._next_batch(block_ms)
            if entries:
                await self._handle(entries)
        except BaseException:
            # Whatever we hold unacked is ours to retry first: page through it again next step.
            self._own_cursor = "0"
            raise
        return len(entries)

    async def _next_batch(self, block_ms: int | None) -> list[RawEntry]:
        if not self._group_ready:
            # Start id 0: a new group reads the history the stream still retains.
            await self.reader.ensure_group("0")
            self._group_ready = True
        try:
            if self._own_cursor is not None:
                own = await self._read(self._own_cursor, None)
                if own:
                    self._own_cursor = own[-1][0].decode()
                    return own
                self._own_cursor = None
            if time.monotonic() >= self._next_claim:
                claimed = await self._claim()
                if any(eid not in self._deferred for eid, _fields in claimed):
                    return claimed
                if claimed:
                    self._next_claim = time.monotonic() + self._claim_pause_s
            return await self._read(">", block_ms)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # the stream or group was deleted: recreate it next step
                self._group_ready = False
            raise

    async def _read(self, cursor: str, block_ms: int | None) -> list[RawEntry]:
        return await self.reader.read(cursor=cursor, count=self.batch_size, block_ms=block_ms)

    async def _claim(self) -> list[RawEntry]:
        cursor, claimed = await self.reader.claim(
            min_idle_ms=self.claim_idle_ms, start_id=self._claim_cursor, count=self.batch_size
        )
        self._claim_cursor = cursor
        if cursor == "0-0" and not claimed:
            self._next_claim = time.monotonic() + self._claim_pause_s
        fresh = sum(eid not in self._deferred for eid, _fields in claimed)
        if fresh:
            log.info("collector_claimed", entries=fresh, first=claimed[0][0].decode())
        return claimed

    async def _handle(self, entries: list[RawEntry]) -> None:
        events: list[dict[str, Any]] = []
        ack: list[str] = []
        malformed = newer = 0
        newer_first: str | None = None
        for raw_id, fields in entries:
            entry_id = raw_id.decode()
            if not fields:
                ack.append(entry_id)
                continue
            try:
                entry = decode_entry(raw_id, fields)
                if entry.schema_version > SCHEMA_VERSION:
                    if raw_id not in self._deferred:
                        self._deferred.add(raw_id)
                        newer += 1
                        newer_first = newer_first or entry_id
                    continue
                if entry.schema_version < 1:
                    raise ValueError(f"schema_version {entry.schema_version} is not a version")
                check_event(entry.event)
            except ValueError as exc:
                malformed += 1
                log.error("collector_malformed_entry", entry_id=entry_id, error=str(exc)[:500])
                ack.append(entry_id)
                continue
            events.append(entry.event)
            ack.append(entry_id)
        if newer:
            log.error(
                "collector_newer_schema", entries=newer, first=newer_first, supported=SCHEMA_VERSION,
                note="left pending for a collector that knows the newer schema",
            )  # fmt: skip
        # The driver is synchronous: the transaction runs in a worker thread, off the event loop.
        result = await asyncio.to_thread(self.store.write, events) if events else WriteResult()
        await self.reader.ack(ack)  # only now: the batch is committed
        self.processed += len(entries)
        self.stored += result.requests_inserted
        self.duplicates += result.requests_duplicate
        self.feedback += result.feedback_written
        self.pairs += result.pairs_added
        self.skipped += result.skipped
        self.malformed += malformed
        self.newer += newer
        log.debug(
            "collector_batch", entries=len(entries), stored=result.requests_inserted,
            duplicates=result.requests_duplicate, feedback=result.feedback_written, pairs=result.pairs_added,
            skipped=result.skipped,
            malformed=malformed, newer=newer,
        )  # fmt: skip


async def collect(collector: Collector, *, once: bool) -> None:
    """Run until SIGTERM or SIGINT (the batch in hand is finished first), or, with `once`, until drained."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("collector_started", key=collector.key, group=collector.group, consumer=collector.consumer, once=once)
    try:
        if once:
            await collector.drain(stop)
        else:
            await collector.run(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("collector_stopped", **collector.counters())


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


def error_line(exc: BaseException) -> str:
    # SQLAlchemy appends the statement and a help link on further lines; the first says what failed.
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc) or type(exc).__name__
    return text.strip().splitlines()[0]
