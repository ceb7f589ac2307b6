"""Rollout state: live percents held in Redis, mirrored in every process's memory.

Redis layout (one experiment = one hash, its history = one stream):
    abproxy:rollout:{experiment}   hash   percent, rev, updated_at, updated_by, reason
    abproxy:audit:{experiment}     stream from, to, by, at, reason      (capped ~10,000)
    abproxy:rollout                pub/sub channel, one JSON message per change

A write is one Lua script, so the value, its audit entry and the publish can never disagree.

The request path reads `RolloutCache.thresholds`, a plain dict replaced as a whole, so a
request never awaits Redis and never sees a half-applied update. One background task per
process subscribes to the channel, re-reads every hash in one MULTI as a safety net for a
lost message, and reconnects with backoff. While Redis is down the last known percents stay
in force (fail static); until Redis has been read once, the config's `rollout_percent` is
used and the process reports not ready.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, cast

import orjson
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.assignment import threshold
from proxy.background import cancel_and_wait
from proxy.errors import StateUnavailable

CHANNEL = "abproxy:rollout"
RESTORER = "abproxy:restore"  # `updated_by` of a state written back after Redis lost it
AUDIT_MAXLEN = 10_000

log = structlog.get_logger("abproxy.rollout")


def state_key(experiment: str) -> str:
    return f"abproxy:rollout:{experiment}"


def audit_key(experiment: str) -> str:
    return f"abproxy:audit:{experiment}"


# The one way a percent is written, shared by every script that writes one (this module's and the
# rollout controller's): the hash, its audit entry (with the evidence behind it, when there is some)
# and the publish happen together. `from` falls back to the config default: that was in force before
# the first write. restore_rev '' increments the revision; a number sets it (a restore).
WRITE_PERCENT_LUA = """
local function write_percent(state, audit, percent, at, by, reason, channel, experiment, default, restore_rev,
                             evidence)
  local from = redis.call('HGET', state, 'percent') or default
  local rev
  if restore_rev ~= '' then
    rev = tonumber(restore_rev)
    redis.call('HSET', state, 'rev', rev)
  else
    rev = redis.call('HINCRBY', state, 'rev', 1)
  end
  redis.call('HSET', state, 'percent', percent, 'updated_at', at, 'updated_by', by, 'reason', reason)
  if evidence ~= '' then
    redis.call('XADD', audit, 'MAXLEN', '~', AUDIT_MAXLEN, '*', 'from', from, 'to', percent, 'by', by, 'at', at,
               'reason', reason, 'evidence', evidence)
  else
    redis.call('XADD', audit, 'MAXLEN', '~', AUDIT_MAXLEN, '*', 'from', from, 'to', percent, 'by', by, 'at', at,
               'reason', reason)
  end
  redis.call('PUBLISH', channel, cjson.encode({experiment=experiment, percent=percent, rev=rev,
             updated_at=at, updated_by=by, reason=reason}))
  return {from, rev}
end
""".replace("AUDIT_MAXLEN", str(AUDIT_MAXLEN))

# KEYS: state hash, audit stream. ARGV: percent, at, by, reason, channel, experiment, default,
# restore_rev. With restore_rev set, the write happens only if the hash is gone (Redis lost its
# data), so several instances restoring at once write it once.
_SET_SCRIPT = (
    WRITE_PERCENT_LUA
    + """
if ARGV[8] ~= '' and redis.call('EXISTS', KEYS[1]) == 1 then return false end
return write_percent(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], '')
"""
)


@dataclass(frozen=True, slots=True)
class RolloutState:
    experiment: str
    percent: float
    source: Literal["redis", "config"]
    rev: int = 0
    updated_at: float | None = None
    updated_by: str | None = None
    reason: str | None = None

    @classmethod
    def from_hash(cls, experiment: str, fields: dict[str, str], default: float) -> RolloutState:
        if "percent" not in fields:
            return cls(experiment, default, "config")
        return cls(
            experiment,
            _valid_percent(fields["percent"]),
            "redis",
            int(fields.get("rev", 0)),
            float(fields["updated_at"]) if fields.get("updated_at") else None,
            fields.get("updated_by") or None,
            fields.get("reason") or None,
        )


def _valid_percent(raw: Any) -> float:
    # Whatever sits in Redis (a hand-edited hash, a stray publish) must never reach routing:
    # NaN or 250 would crash `threshold` in the follower task or treat everyone.
    percent = float(raw)
    if not 0 <= percent <= 100:  # also false for NaN
        raise ValueError(f"percent {raw!r} is not within 0..100")
    return percent


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: str
    from_percent: float
    to_percent: float
    by: str
    at: float
    reason: str | None


def fmt_percent(percent: float) -> str:
    return f"{percent:.2f}".rstrip("0").rstrip(".")


class RolloutStore:
    """Reads and writes the Redis side. Every redis error becomes `StateUnavailable` here."""

    def __init__(self, redis: aioredis.Redis, defaults: dict[str, float]) -> None:
        self._redis = redis
        self._defaults = defaults
        self._set = redis.register_script(_SET_SCRIPT)

    @property
    def experiments(self) -> Iterable[str]:
        return self._defaults.keys()

    def pubsub(self) -> aioredis.client.PubSub:
        return self._redis.pubsub(ignore_subscribe_messages=True)

    async def snapshot(self) -> dict[str, RolloutState]:
        """Every experiment's state, read in one MULTI so no half-updated view is possible."""
        names = list(self._defaults)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                for name in names:
                    pipe.hgetall(state_key(name))
                hashes: list[dict[str, str]] = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"rollout store unavailable: {exc}") from exc
        return {name: self._state(name, fields) for name, fields in zip(names, hashes, strict=True)}

    async def get(self, experiment: str) -> RolloutState:
        try:
            fields = cast(dict[str, str], await self._redis.hgetall(state_key(experiment)))
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"rollout store unavailable: {exc}") from exc
        return self._state(experiment, fields)

    def _state(self, experiment: str, fields: dict[str, str]) -> RolloutState:
        try:
            return RolloutState.from_hash(experiment, fields, self._defaults[experiment])
        except ValueError as exc:  # fail static on a corrupt hash, as on an outage
            raise StateUnavailable(f"rollout state in Redis is malformed: {exc}") from exc

    async def set_percent(
        self, experiment: str, percent: float, *, by: str, reason: str | None
    ) -> tuple[RolloutState, float | None]:
        """Write, audit and publish atomically. Returns the new state and the previous percent
        (None if what Redis held was not a percent)."""
        result = await self._write(experiment, percent, by, reason, restore_rev=None)
        assert result is not None  # only a restore can be refused
        return result

    async def restore(self, lost: RolloutState) -> bool:
        """Write back a state Redis lost (restarted empty, key deleted); False if it is back already."""
        reason = "Redis lost the rollout state; restored from the last value an instance served"
        result = await self._write(lost.experiment, lost.percent, RESTORER, reason, restore_rev=lost.rev + 1)
        return result is not None

    async def _write(
        self, experiment: str, percent: float, by: str, reason: str | None, *, restore_rev: int | None
    ) -> tuple[RolloutState, float | None] | None:
        now = time.time()
        args = [
            fmt_percent(percent),
            repr(now),
            by,
            reason or "",
            CHANNEL,
            experiment,
            fmt_percent(self._defaults[experiment]),
            "" if restore_rev is None else str(restore_rev),
        ]
        try:
            result = await self._set(keys=[state_key(experiment), audit_key(experiment)], args=args)
        except (RedisTimeoutError, TimeoutError) as exc:
            # The script may have been sent and run (or may still run, when a partition heals and the
            # queued bytes arrive): "nothing changed" would be a lie, so say what is known.
            raise StateUnavailable(
                f"rollout store did not answer in time ({exc}): the change may or may not have been applied; "
                "read the rollout back before retrying"
            ) from exc
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"rollout store unavailable, nothing changed: {exc}") from exc
        if result is None:
            return None
        previous, rev = result
        try:
            previous_percent: float | None = _valid_percent(previous)
        except ValueError:
            previous_percent = None  # a corrupt value was just overwritten: the write still stands
        return RolloutState(experiment, percent, "redis", int(rev), now, by, reason), previous_percent

    async def audit(self, experiment: str, count: int = 100) -> list[AuditEntry]:
        """Newest first."""
        try:
            raw = await self._redis.xrevrange(audit_key(experiment), count=count)
            rows = cast(list[tuple[str, dict[str, str]]], raw)
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"rollout store unavailable: {exc}") from exc
        return [
            AuditEntry(entry_id, float(f["from"]), float(f["to"]), f["by"], float(f["at"]), f.get("reason") or None)
            for entry_id, f in rows
        ]


Listener = Callable[[RolloutState], None]


class RolloutCache:
    """The in-memory mirror the hot path reads. Only the background task writes it."""

    def __init__(
        self,
        store: RolloutStore,
        defaults: dict[str, float],
        *,
        resync_interval_s: float = 5.0,
        on_change: Listener | None = None,
    ) -> None:
        self._store = store
        self._resync_interval_s = resync_interval_s
        self._on_change = on_change
        self.states: dict[str, RolloutState] = {
            name: RolloutState(name, percent, "config") for name, percent in defaults.items()
        }
        # What the hot path reads: experiment -> treatment threshold in buckets.
        self.thresholds: dict[str, int] = {name: threshold(p) for name, p in defaults.items()}
        self.loaded = False
        self.connected: bool | None = None
        self.last_sync_monotonic: float | None = None
        self._changed_at: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        for state in self.states.values():
            self._notify(state)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self, initial_timeout_s: float = 2.0) -> None:
        """Start following Redis; wait briefly for a first read so we start ready if we can."""
        self._task = asyncio.create_task(self._follow(), name="rollout-follow")
        deadline = time.monotonic() + initial_timeout_s
        while not self.loaded and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    # -- updates ---------------------------------------------------------------------------
    def apply(self, state: RolloutState, *, received_at: float | None = None) -> None:
        """Install one experiment's state (copy-on-write, so readers see old or new, never mixed)."""
        if state.experiment not in self.states:
            return
        self._changed_at[state.experiment] = time.monotonic() if received_at is None else received_at
        self._install({**self.states, state.experiment: state})
        self._notify(state)

    def apply_own_write(self, state: RolloutState) -> None:
        """A write this process just made; skipped if pub/sub already brought a newer one."""
        current = self.states.get(state.experiment)
        if current is not None and current.source == "redis" and current.rev >= state.rev:
            return
        self.apply(state)

    def _install(self, states: dict[str, RolloutState]) -> None:
        self.states = states
        self.thresholds = {name: threshold(s.percent) for name, s in states.items()}

    def _notify(self, state: RolloutState) -> None:
        if self._on_change is not None:
            self._on_change(state)

    def _apply_snapshot(self, snapshot: dict[str, RolloutState], started_at: float) -> None:
        merged = dict(self.states)
        changed = []
        for name, state in snapshot.items():
            # A pub/sub message that arrived while the snapshot was in flight is newer.
            if self._changed_at.get(name, -1.0) > started_at:
                continue
            if merged.get(name) != state:
                changed.append(state)
            merged[name] = state
        self._install(merged)
        for state in changed:
            self._notify(state)
        self.loaded = True
        self.last_sync_monotonic = time.monotonic()

    def _apply_message(self, data: str | bytes) -> None:
        try:
            msg: dict[str, Any] = orjson.loads(data)
            state = RolloutState(
                msg["experiment"],
                _valid_percent(msg["percent"]),
                "redis",
                int(msg["rev"]),
                float(msg["updated_at"]),
                msg.get("updated_by") or None,
                msg.get("reason") or None,
            )
        except (ValueError, KeyError, TypeError):
            log.warning("rollout_message_ignored", reason="malformed")
            return
        self.apply(state)
        self.last_sync_monotonic = time.monotonic()

    async def resync(self) -> None:
        started_at = time.monotonic()
        snapshot = await self._store.snapshot()
        for name, state in snapshot.items():
            known = self.states[name]
            if state.source == "config" and known.source == "redis" and known.percent != state.percent:
                # Redis came back empty (no persistence) or the key was deleted. Falling back to
                # a different config default would silently move users between arms, and only on
                # the instances that noticed: write the last served value back instead.
                restored = await self._store.restore(known)
                log.warning(
                    "rollout_state_restored" if restored else "rollout_state_restored_elsewhere",
                    experiment=name,
                    percent=known.percent,
                )
                snapshot[name] = await self._store.get(name)
        self._apply_snapshot(snapshot, started_at)

    # -- the background task ---------------------------------------------------------------
    def _set_connected(self, connected: bool, error: BaseException | None = None) -> None:
        if connected == self.connected:
            return
        self.connected = connected
        if connected:
            log.info("rollout_store_connected")
        else:
            log.warning("rollout_store_unavailable", error=str(error), serving="last known percents")

    async def _follow(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._subscribe_and_follow()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, StateUnavailable) as exc:
                if self.connected:
                    backoff = 0.1  # a fresh outage: retry fast, then back off to 1 s
                self._set_connected(False, exc)
            except Exception:
                # A bug here must not freeze routing updates for the life of the process.
                log.exception("rollout_follow_failed")
                self._set_connected(False)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _subscribe_and_follow(self) -> None:
        pubsub = self._store.pubsub()
        try:
            await pubsub.subscribe(CHANNEL)
            # Subscribe first, then read: a change made in between is seen by one or the other.
            await self.resync()
            self._set_connected(True)
            next_resync = time.monotonic() + self._resync_interval_s
            while True:
                wait = max(0.0, next_resync - time.monotonic())
                message = await pubsub.get_message(timeout=wait)
                if message is not None and message.get("type") == "message":
                    self._apply_message(message["data"])
                if time.monotonic() >= next_resync:
                    await self.resync()
                    next_resync = time.monotonic() + self._resync_interval_s
        finally:
            try:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            except (RedisError, OSError):
                pass
