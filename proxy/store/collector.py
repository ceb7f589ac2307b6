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
    3. new entries (XREADGROUP >, in the script below), waiting up to `block_ms` for them

Entry by entry:
    malformed (decode_entry refuses it, or the store could not hold the event)
                         logged, counted, acked: a poison entry must never block the group
    schema_version newer than this code
                         logged, left pending (unacked) for a newer collector to claim
    trimmed by MAXLEN while pending (no fields)
                         acked: nothing left to store; counted lost (reason trimmed_pending)

Lost to the stream's bound. The stream keeps `events.redis_stream.maxlen` entries (trimmed
approximately at each XADD); a collector down or slower than the proxy for longer than that
loses the oldest entries it has not read. Each read of new entries is a Lua script that first
compares the group's position with the stream's (XINFO GROUPS entries-read and last-delivered-id,
XINFO STREAM entries-added, length and first entry): when the group's last-delivered id lies
before the first retained entry, the entries between were trimmed unread, and they number
`entries-added - length - entries-read`. The script counts them, moves the group just before the
first retained entry with XGROUP SETID .. ENTRIESREAD (Redis 7.0 would otherwise go on counting
them as lag forever, and count the next gap wrong), then reads: one atomic step, so no trim and
no other consumer can come in between, and each lost entry is counted once, by one collector.
They are counted in `abproxy_collector_events_lost_total{reason="trimmed_unread"}` and logged
(`collector_events_lost`, a warning). A group this code created (at id 0) starts with a known
read counter, so even entries trimmed before the first collector ran are counted; a group whose
counter Redis does not know (created elsewhere, or moved by XGROUP SETID without ENTRIESREAD) may
have lost some, how many is not known: logged as `collector_events_lost_unknown`, and from then
on its counter is set and known.

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
from prometheus_client import CollectorRegistry, Counter
from redis.exceptions import RedisError, ResponseError
from sqlalchemy.exc import SQLAlchemyError

from proxy.event_stream import SCHEMA_VERSION, ConsumerGroupReader, RawEntry, decode_entry
from proxy.store import rollup
from proxy.store.db import ROLLUP_SETTLE_S, Prepared, Store, WriteResult, prepare

log = structlog.get_logger("abproxy")

MAX_BACKOFF_S = 5.0
MAX_CLAIM_PAUSE_S = 5.0
SUMMARY_INTERVAL_S = 30.0

# KEYS[1] the stream; ARGV group, consumer, count. Returns {lost, entries, cursor}: the entries
# trimmed before the group read them (-1: some, how many unknown), the new entries read (as
# XREADGROUP > returns them), and the group's last-delivered id after the read.
READ_NEW = """
local key, group = KEYS[1], ARGV[1]
local function get(reply, name)
  for i = 1, #reply, 2 do
    if reply[i] == name then return reply[i + 1] end
  end
  return nil
end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function before(a, b)
  local ams, aseq = parse(a)
  local bms, bseq = parse(b)
  return ams < bms or (ams == bms and aseq < bseq)
end
local function previous(id)
  local ms, seq = parse(id)
  if seq > 0 then return string.format('%d-%d', ms, seq - 1) end
  return string.format('%d-18446744073709551615', ms - 1)
end

local lost, cursor = 0, nil
local stream = redis.pcall('XINFO', 'STREAM', key)
local groups = redis.pcall('XINFO', 'GROUPS', key)
if stream.err == nil and groups.err == nil then
  for _, g in ipairs(groups) do
    if get(g, 'name') == group then
      cursor = get(g, 'last-delivered-id')
      local read = get(g, 'entries-read')
      local length, added = get(stream, 'length'), get(stream, 'entries-added')
      -- Every entry before `boundary` is gone, `gone` of them in all, and the group resumes at `resume`.
      local boundary, gone, resume = nil, nil, nil
      if length > 0 then
        local first = get(stream, 'first-entry')[1]
        -- An XDEL at or after the first entry: entries-added - length also counts entries after it.
        if before(get(stream, 'max-deleted-entry-id'), first) then
          boundary, gone, resume = first, added - length, previous(first)
        end
      elseif added > 0 then
        local last = get(stream, 'last-generated-id')
        boundary, gone, resume = last, added, last
        if cursor == last then boundary = nil end
      end
      if boundary ~= nil and before(cursor, boundary) then
        if read == false and cursor == '0-0' then read = 0 end
        if read == false then lost = -1 else lost = math.max(gone - read, 0) end
        if lost ~= 0 then
          redis.call('XGROUP', 'SETID', key, group, resume, 'ENTRIESREAD', gone)
          cursor = resume
        end
      end
    end
  end
end
local reply = redis.call('XREADGROUP', 'GROUP', group, ARGV[2], 'COUNT', ARGV[3], 'STREAMS', key, '>')
local entries = {}
if reply then
  entries = reply[1][2]
  cursor = entries[#entries][1]
end
return {lost, entries, cursor or '0-0'}
"""


class CollectorMetrics:
    """The collector's Prometheus metrics (`abproxy collect --metrics-port`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.events_lost = Counter(
            "abproxy_collector_events_lost",
            "Stream entries deleted before the store got them: trimmed by the stream's MAXLEN before the "
            "group read them (trimmed_unread), or while read and not yet stored (trimmed_pending).",
            ["reason"], registry=self.registry,
        )  # fmt: skip
        self.lost_unread = self.events_lost.labels("trimmed_unread")
        self.lost_pending = self.events_lost.labels("trimmed_pending")


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
        metrics: CollectorMetrics | None = None,
        rollup_interval_s: float = 0.0,
        rollup_settle_s: float = ROLLUP_SETTLE_S,
    ) -> None:
        self.redis, self.store = redis, store
        self.metrics = metrics if metrics is not None else CollectorMetrics()
        self.key, self.group, self.consumer = key, group, consumer
        self.batch_size, self.block_ms, self.claim_idle_ms = batch_size, block_ms, claim_idle_ms
        self.reader = ConsumerGroupReader(redis, group, consumer, key)
        self.processed = self.stored = self.duplicates = self.skipped = self.malformed = self.feedback = 0
        self.newer = 0  # entries of a newer schema version, left pending
        self.pairs = 0  # production pairs added as comparisons
        self.lost = 0  # entries the stream trimmed before they were stored (both reasons)
        self._read_new = redis.register_script(READ_NEW)
        self._new_cursor = "0-0"  # the group's last-delivered id, as the last read left it
        # Their ids: claimed or read again, they are neither logged nor counted twice, and a
        # claim that returns only these is no reason to skip reading new entries.
        self._deferred: set[bytes] = set()
        self._group_ready = False
        self._own_cursor: str | None = "0"  # paging through our own pending entries; None: done
        self._claim_cursor = "0-0"
        self._next_claim = 0.0  # monotonic time; a full XAUTOCLAIM scan that found nothing waits
        # A scan that found nothing idle enough need not be repeated before anything could be.
        self._claim_pause_s = min(claim_idle_ms / 1000, MAX_CLAIM_PAUSE_S)
        self.rollup_interval_s, self.rollup_settle_s = rollup_interval_s, rollup_settle_s
        self._next_rollup = 0.0  # monotonic time of the next build; the first comes at once

    def counters(self) -> dict[str, int]:
        return {
            "processed": self.processed, "stored": self.stored, "duplicates": self.duplicates,
            "skipped": self.skipped, "malformed": self.malformed, "feedback": self.feedback, "newer": self.newer,
            "pairs": self.pairs, "lost": self.lost,
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
            if self.rollup_interval_s and time.monotonic() >= self._next_rollup:
                self._next_rollup = time.monotonic() + self.rollup_interval_s
                await self.build_rollup()
            if time.monotonic() - last_summary >= SUMMARY_INTERVAL_S:
                last_summary = time.monotonic()
                if self.counters() != summarised:
                    summarised = self.counters()
                    log.info("collector_progress", **summarised)

    async def build_rollup(self) -> None:
        """Build the days that are due, between batches and in a worker thread; a failure is
        logged and tried again next interval (the report reads those days live meanwhile)."""
        started = time.monotonic()
        try:
            built = await asyncio.to_thread(
                rollup.build_due, self.store.engine, self.store.regeneration_window_s, settle_s=self.rollup_settle_s
            )
        except (OSError, SQLAlchemyError) as exc:
            log.error("collector_rollup_failed", error=error_line(exc), kind=type(exc).__name__)
            return
        if built:
            log.info("collector_rollup_built", days=len(built), first=f"{built[0][0]} day {built[0][1]}",
                     seconds=round(time.monotonic() - started, 3))  # fmt: skip

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
            return await self._read_new_entries(block_ms)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # the stream or group was deleted: recreate it next step
                self._group_ready = False
            raise

    async def _read(self, cursor: str, block_ms: int | None) -> list[RawEntry]:
        return await self.reader.read(cursor=cursor, count=self.batch_size, block_ms=block_ms)

    async def _read_new_entries(self, block_ms: int | None) -> list[RawEntry]:
        """New entries (XREADGROUP >) through READ_NEW, counting those trimmed unread first.

        The script cannot block: with nothing new, XREAD (which consumes nothing) waits up to
        `block_ms` for an entry after the group's position, and the script runs once more.
        """
        entries = await self._read_new_once()
        if entries or not block_ms:
            return entries
        woken: Any = await self.redis.xread({self.key: self._new_cursor}, count=1, block=block_ms)
        return await self._read_new_once() if woken else []

    async def _read_new_once(self) -> list[RawEntry]:
        # redis-py types script replies loosely; READ_NEW's shape is fixed above.
        reply: Any = await self._read_new(keys=[self.key], args=[self.group, self.consumer, self.batch_size])
        lost, raw_entries, cursor = int(reply[0]), reply[1], reply[2]
        self._new_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        entries: list[RawEntry] = [(eid, dict(zip(flat[::2], flat[1::2], strict=True))) for eid, flat in raw_entries]
        if lost > 0:
            self.lost += lost
            self.metrics.lost_unread.inc(lost)
            log.warning(
                "collector_events_lost", entries=lost, reason="trimmed_unread", lost_total=self.lost,
                resumed_at=entries[0][0].decode() if entries else self._new_cursor,
                note="the stream's maxlen was reached before the collector read them; "
                "raise events.redis_stream.maxlen or keep the collector up",
            )  # fmt: skip
        elif lost < 0:
            log.warning(
                "collector_events_lost_unknown", reason="trimmed_unread",
                note="the group's read counter was unknown: entries may have been trimmed unread, how many is unknown",
            )  # fmt: skip
        return entries

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
        rows: list[Prepared] = []
        ack: list[str] = []
        malformed = newer = trimmed = 0
        newer_first: str | None = None
        for raw_id, fields in entries:
            entry_id = raw_id.decode()
            if not fields:
                trimmed += 1
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
                # Converted and checked once here; the store writes the rows as they are.
                row = prepare(entry.event)
            except ValueError as exc:
                malformed += 1
                log.error("collector_malformed_entry", entry_id=entry_id, error=str(exc)[:500])
                ack.append(entry_id)
                continue
            rows.append(row)
            ack.append(entry_id)
        if newer:
            log.error(
                "collector_newer_schema", entries=newer, first=newer_first, supported=SCHEMA_VERSION,
                note="left pending for a collector that knows the newer schema",
            )  # fmt: skip
        # The driver is synchronous: the transaction runs in a worker thread, off the event loop.
        result = await asyncio.to_thread(self.store.write_prepared, rows) if rows else WriteResult()
        await self.reader.ack(ack)  # only now: the batch is committed
        self.processed += len(entries)
        self.stored += result.requests_inserted
        self.duplicates += result.requests_duplicate
        self.feedback += result.feedback_written
        self.pairs += result.pairs_added
        self.skipped += result.skipped
        self.malformed += malformed
        self.newer += newer
        if trimmed:
            self.lost += trimmed
            self.metrics.lost_pending.inc(trimmed)
            log.warning(
                "collector_events_lost", entries=trimmed, reason="trimmed_pending", lost_total=self.lost,
                note="read but not stored before the stream's maxlen trimmed them",
            )  # fmt: skip
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
