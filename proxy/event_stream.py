"""The Redis Stream of per-request events: its entry layout and the two ways to read it.

Layout (one entry per request, appended by `events.RedisStreamSink`):

    XADD abproxy:events MAXLEN ~ <maxlen> * request_id <id> schema_version <n> event <json>

`event` is the same JSON object the stdout sink prints. The entry id is Redis's (time-ordered);
the stable id of the event is `request_id`, which a consumer uses to deduplicate, because a
batch may be retried by a reader after a crash. `schema_version` changes only when a field
changes meaning or disappears; new fields may appear within a version.

Readers:
    tail()             XREAD from the end: `abproxy events tail`, reads without consuming
    ConsumerGroupReader XREADGROUP/XACK/XAUTOCLAIM: the durable consumers (`abproxy collect`)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

SCHEMA_VERSION = 1
# An event's status when the client left before its answer ended (nginx's convention). The report
# counts it as the user's choice, not a failure of the model.
CLIENT_CLOSED = 499
DEFAULT_KEY = "abproxy:events"


def entry_fields(request_id: str, event: bytes) -> dict[Any, Any]:
    return {"request_id": request_id, "schema_version": SCHEMA_VERSION, "event": event}


@dataclass(frozen=True, slots=True)
class StreamEvent:
    entry_id: str
    request_id: str
    schema_version: int
    event: dict[str, Any]


def decode_entry(entry_id: bytes | str, fields: dict[bytes, bytes]) -> StreamEvent:
    """One XREAD/XREADGROUP entry; raises ValueError for an entry this layout doesn't describe."""
    try:
        event = orjson.loads(fields[b"event"])
        version = int(fields[b"schema_version"])
        request_id = fields[b"request_id"].decode()
    except (KeyError, ValueError, orjson.JSONDecodeError) as exc:
        raise ValueError(f"malformed event entry {entry_id!r}: {exc}") from None
    if not isinstance(event, dict):
        raise ValueError(f"malformed event entry {entry_id!r}: event is not an object")
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return StreamEvent(eid, request_id, version, event)


async def tail(
    redis: aioredis.Redis,
    key: str = DEFAULT_KEY,
    *,
    last: int = 0,
    block_ms: int = 1000,
    on_malformed: Callable[[str], None] | None = None,
) -> AsyncIterator[StreamEvent]:
    """Follow the stream live, after first replaying the `last` most recent events.

    Entries this layout doesn't describe are skipped (and reported), never fatal to the tail.
    """
    cursor: Any = "$"
    entries: list[Any] = []
    if last > 0:
        # redis-py types stream replies loosely; their shape is fixed by the commands.
        recent: Any = await redis.xrevrange(key, count=last)
        entries = list(reversed(recent))
        if recent:
            cursor = recent[0][0]
    while True:
        for entry_id, fields in entries:
            cursor = entry_id
            try:
                event = decode_entry(entry_id, fields)
            except ValueError as exc:
                if on_malformed is not None:
                    on_malformed(str(exc))
                continue
            yield event
        reply: Any = await redis.xread({key: cursor}, block=block_ms, count=500)
        entries = [entry for _stream, stream_entries in reply for entry in stream_entries]


RawEntry = tuple[bytes, dict[bytes, bytes]]


class ConsumerGroupReader:
    """At-least-once delivery to a named group: read, process, then ack.

    Entries come back raw, for the caller to decode one by one with `decode_entry`: a malformed
    entry is then one error to handle (log and ack it), never a whole batch that cannot be read.
    A consumer that died holding entries leaves them pending; `claim` hands them to a live
    consumer after `min_idle_ms`, so nothing is lost and nothing waits forever.
    """

    def __init__(self, redis: aioredis.Redis, group: str, consumer: str, key: str = DEFAULT_KEY) -> None:
        self.redis, self.group, self.consumer, self.key = redis, group, consumer, key

    async def ensure_group(self, start_id: str = "0") -> None:
        """Create the group (and the stream) if missing; '0' reads the retained history first."""
        try:
            await self.redis.xgroup_create(self.key, self.group, id=start_id, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, *, cursor: str = ">", count: int = 500, block_ms: int | None = None) -> list[RawEntry]:
        """New entries (cursor ">"), or this consumer's own pending ones from `cursor` (e.g. "0")."""
        reply: Any = await self.redis.xreadgroup(
            self.group, self.consumer, {self.key: cursor}, count=count, block=block_ms
        )
        return [(eid, fields) for _stream, entries in reply or [] for eid, fields in entries]

    async def ack(self, entry_ids: list[str]) -> int:
        if not entry_ids:
            return 0
        return int(await self.redis.xack(self.key, self.group, *entry_ids))

    async def claim(self, *, min_idle_ms: int, start_id: str = "0", count: int = 500) -> tuple[str, list[RawEntry]]:
        """Entries other consumers left idle: (the cursor to continue from, the entries).

        Entries trimmed by MAXLEN while pending come back with no fields: nothing left to process
        but the ack.
        """
        reply: Any = await self.redis.xautoclaim(
            self.key, self.group, self.consumer, min_idle_time=min_idle_ms, start_id=start_id, count=count
        )
        cursor = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        return cursor, [(eid, fields) for eid, fields in reply[1]]
