"""A rollout plan's progress in Redis, and the one script that moves it.

    abproxy:plan:{experiment}        hash    phase, phase_name, status, entered_at, data_since, rev, updated_*
    abproxy:decisions:{experiment}   stream  every transition with its evidence (capped ~10,000)
    abproxy:controller:lock          string  the leading controller's owner id, with a lease (see lock.py)

Every transition (the controller's promote, rollback, halt; a person's pause, resume, promote, abort)
is one Lua script: it checks the plan's revision is the one the decision was made on (so whatever
happened in between, a person's abort above all, wins and the stale decision is refused), checks the
writer still holds the controller lock when it is the controller, writes the percent exactly as
`abproxy rollout set` does (hash, audit entry with the evidence, publish), updates the plan and
appends the decision, all at once. A crash between any two of those cannot happen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.errors import StateUnavailable
from proxy.rollout import CHANNEL, WRITE_PERCENT_LUA, audit_key, fmt_percent, state_key

Status = Literal["running", "paused", "halted", "rolled_back", "aborted", "completed"]
STATUSES: tuple[Status, ...] = get_args(Status)
DECISIONS_MAXLEN = 10_000


def plan_key(experiment: str) -> str:
    return f"abproxy:plan:{experiment}"


def decisions_key(experiment: str) -> str:
    return f"abproxy:decisions:{experiment}"


LOCK_KEY = "abproxy:controller:lock"

# KEYS: plan hash, decisions stream, rollout hash, audit stream, lock.
# ARGV: 1 expected plan rev (-1: no plan yet), 2 lock owner ('' for a person), 3 plan fields (JSON object of
# strings), 4 percent ('' to leave it), 5 at, 6 by, 7 reason, 8 channel, 9 experiment, 10 config default
# percent, 11 evidence JSON ('' for none), 12 decision JSON.
_TRANSITION = WRITE_PERCENT_LUA + """
if ARGV[2] ~= '' and redis.call('GET', KEYS[5]) ~= ARGV[2] then return {'lost_lock', ''} end
local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '-1')
if rev ~= tonumber(ARGV[1]) then return {'conflict', tostring(rev)} end
local before = redis.call('HGET', KEYS[3], 'percent') or ARGV[10]
local after = before
if ARGV[4] ~= '' and tonumber(ARGV[4]) ~= tonumber(before) then
  write_percent(KEYS[3], KEYS[4], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10], '', ARGV[11])
  after = ARGV[4]
end
local fields = cjson.decode(ARGV[3])
for name, value in pairs(fields) do redis.call('HSET', KEYS[1], name, value) end
redis.call('HSET', KEYS[1], 'rev', rev + 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', DECISIONS_MAXLEN, '*', 'decision', ARGV[12], 'percent_from', before,
           'percent_to', after, 'rev', rev + 1)
return {'ok', tostring(rev + 1)}
""".replace("DECISIONS_MAXLEN", str(DECISIONS_MAXLEN))

# A hold changes nothing, yet its record must obey the same rules as a transition's: a controller that lost the
# lease while its XADD was in flight (a partition, a stall) would otherwise append "holding in canary" after the
# new leader's promotion, a decision its writer no longer had the right to take.
# KEYS: plan hash, decisions stream, lock. ARGV: 1 plan rev the hold was decided on, 2 lock owner ('' for a
# person), 3 decision JSON, 4 percent.
_NOTE = """
if ARGV[2] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[2] then return {'lost_lock', ''} end
local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '-1')
if rev ~= tonumber(ARGV[1]) then return {'conflict', tostring(rev)} end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', DECISIONS_MAXLEN, '*', 'decision', ARGV[3], 'percent_from', ARGV[4],
           'percent_to', ARGV[4], 'rev', ARGV[1])
return {'ok', ARGV[1]}
""".replace("DECISIONS_MAXLEN", str(DECISIONS_MAXLEN))


class Conflict(Exception):
    """The plan moved since the decision was made (a person acted, or another controller): nothing written."""


class LostLock(Exception):
    """The controller no longer holds the lock: another one leads now. Nothing written."""


@dataclass(frozen=True, slots=True)
class PlanState:
    experiment: str
    phase: int  # index into the plan
    phase_name: str
    status: Status
    entered_at: float  # controller clock: when the phase (or a resume) began, for min_duration
    data_since: float  # wall clock: where the phase's data window starts
    rev: int
    updated_at: float
    updated_by: str
    reason: str

    @classmethod
    def from_hash(cls, experiment: str, fields: dict[str, str]) -> PlanState:
        status = fields.get("status", "")
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        return cls(experiment, int(fields["phase"]), fields.get("phase_name", ""), status,
                   float(fields["entered_at"]), float(fields["data_since"]), int(fields["rev"]),
                   float(fields.get("updated_at", 0)), fields.get("updated_by", ""),
                   fields.get("reason", ""))  # fmt: skip


@dataclass(frozen=True, slots=True)
class Transition:
    """Where a decision moves the plan. `percent` None leaves the live percent as it is."""

    action: str  # start | promote | complete | rollback | halt | hold | pause | resume | abort
    phase: int
    phase_name: str
    status: Status
    entered_at: float
    data_since: float
    percent: float | None
    by: str
    reason: str
    evidence: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    id: str
    at: float
    by: str
    action: str
    phase_from: str | None
    phase_to: str
    status: str
    percent_from: float
    percent_to: float
    reason: str
    evidence: dict[str, Any] | None
    rev: int


class PlanStore:
    def __init__(self, redis: aioredis.Redis, defaults: dict[str, float]) -> None:
        self._redis = redis
        self._defaults = defaults  # experiment -> config rollout_percent (what holds before any write)
        self._transition = redis.register_script(_TRANSITION)
        self._note = redis.register_script(_NOTE)

    async def get(self, experiment: str) -> PlanState | None:
        try:
            fields = cast(dict[str, str], await self._redis.hgetall(plan_key(experiment)))
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"plan store unavailable: {exc}") from exc
        if not fields:
            return None
        try:
            return PlanState.from_hash(experiment, fields)
        except (KeyError, ValueError) as exc:
            raise StateUnavailable(f"plan state of {experiment} in Redis is malformed: {exc}") from exc

    async def apply(
        self, experiment: str, move: Transition, *, expected_rev: int, lock_owner: str | None,
        previous: PlanState | None,
    ) -> PlanState:  # fmt: skip
        """Write `move` if the plan is still at `expected_rev` (-1: absent) and, for the controller, it still
        holds the lock. Conflict / LostLock when not; StateUnavailable when Redis is."""
        at = time.time()
        fields = {"phase": str(move.phase), "phase_name": move.phase_name, "status": move.status,
                  "entered_at": repr(move.entered_at), "data_since": repr(move.data_since),
                  "updated_at": repr(at), "updated_by": move.by, "reason": move.reason}  # fmt: skip
        decision = {"at": at, "by": move.by, "action": move.action, "status": move.status,
                    "phase_from": previous.phase_name if previous else None, "phase_to": move.phase_name,
                    "reason": move.reason, "evidence": move.evidence}  # fmt: skip
        args = [
            str(expected_rev), lock_owner or "", orjson.dumps(fields).decode(),
            "" if move.percent is None else fmt_percent(move.percent), repr(at), move.by, move.reason, CHANNEL,
            experiment, fmt_percent(self._defaults[experiment]),
            orjson.dumps(move.evidence).decode() if move.evidence else "", orjson.dumps(decision).decode(),
        ]  # fmt: skip
        keys = [plan_key(experiment), decisions_key(experiment), state_key(experiment), audit_key(experiment),
                LOCK_KEY]  # fmt: skip
        try:
            outcome, detail = await self._transition(keys=keys, args=args)
        except (RedisTimeoutError, TimeoutError) as exc:
            # As in rollout.py: the script may have been sent and run, or may still run when a partition heals
            # and the queued bytes arrive (whole, and only if the lease and the revision still hold).
            raise StateUnavailable(
                f"plan store did not answer in time ({exc}): the transition may or may not have been applied; "
                "read the plan back before retrying"
            ) from exc
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"plan store unavailable, nothing changed: {exc}") from exc
        if outcome == "lost_lock":
            raise LostLock("this controller no longer holds the lock")
        if outcome == "conflict":
            raise Conflict(f"the plan moved (now at revision {detail}, decided on {expected_rev})")
        return PlanState(experiment, move.phase, move.phase_name, move.status, move.entered_at, move.data_since,
                         int(detail), at, move.by, move.reason)  # fmt: skip

    async def note(self, state: PlanState, *, action: str, by: str, reason: str, evidence: dict[str, Any] | None,
                   percent: float, lock_owner: str | None = None) -> None:  # fmt: skip
        """Record a decision that changes nothing (a hold) beside the transitions, at the plan's revision: only if
        the plan is still at `state.rev` and, for the controller, it still holds the lock (Conflict / LostLock)."""
        decision = {"at": time.time(), "by": by, "action": action, "status": state.status,
                    "phase_from": state.phase_name, "phase_to": state.phase_name, "reason": reason,
                    "evidence": evidence}  # fmt: skip
        keys = [plan_key(state.experiment), decisions_key(state.experiment), LOCK_KEY]
        args = [str(state.rev), lock_owner or "", orjson.dumps(decision).decode(), fmt_percent(percent)]
        try:
            outcome, detail = await self._note(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"plan store unavailable: {exc}") from exc
        if outcome == "lost_lock":
            raise LostLock("this controller no longer holds the lock")
        if outcome == "conflict":
            raise Conflict(f"the plan moved (now at revision {detail}, decided on {state.rev})")

    async def decisions(self, experiment: str, count: int = 100) -> list[DecisionRecord]:
        """Newest first."""
        try:
            raw = await self._redis.xrevrange(decisions_key(experiment), count=count)
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"plan store unavailable: {exc}") from exc
        records = []
        for entry_id, f in cast(list[tuple[str, dict[str, str]]], raw):
            d = orjson.loads(f["decision"])
            records.append(DecisionRecord(
                id=entry_id, at=float(d["at"]), by=d["by"], action=d["action"], phase_from=d.get("phase_from"),
                phase_to=d["phase_to"], status=d["status"], percent_from=float(f["percent_from"]),
                percent_to=float(f["percent_to"]), reason=d["reason"], evidence=d.get("evidence"), rev=int(f["rev"]),
            ))  # fmt: skip
        return records
