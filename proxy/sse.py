"""Server-sent-event pass-through that reads usage on the way and can hide the usage chunk.

The proxy asks every streaming upstream for `stream_options.include_usage` so it can count
tokens; when the client did not ask for it, the usage-only chunk (`"choices": []` with a
`usage` object) is dropped before it reaches the client. Bytes are released event by event:
only a partial event (no blank line yet) is held back, never the stream.
"""

from __future__ import annotations

from typing import Any

import orjson

_NULL_USAGE = (b'"usage":null', b'"usage": null')


class UsageTap:
    def __init__(self, *, drop_usage_chunk: bool) -> None:
        self._drop = drop_usage_chunk
        self._pending = b""
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> bytes:
        """Bytes of the complete events in `pending + chunk`, minus a dropped usage chunk."""
        data = self._pending + chunk if self._pending else chunk
        if b"\r" in data:  # SSE allows CRLF; normalise so events split on one separator
            data = data.replace(b"\r\n", b"\n")
        end = data.rfind(b"\n\n")
        if end < 0:
            self._pending = data
            return b""
        complete, self._pending = data[: end + 2], data[end + 2 :]
        if b'"usage"' not in complete and b'"error"' not in complete:
            return complete
        kept = [event for event in complete[:-2].split(b"\n\n") if self._keep(event)]
        return b"".join(event + b"\n\n" for event in kept)

    def finish(self) -> bytes:
        """Whatever the upstream sent after its last blank line (normally nothing)."""
        rest, self._pending = self._pending, b""
        return rest

    def _keep(self, event: bytes) -> bool:
        if (b'"usage"' not in event or any(n in event for n in _NULL_USAGE)) and b'"error"' not in event:
            return True
        payload = _data_of(event)
        if payload is None:
            return True
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(obj, dict):
            return True
        if isinstance(obj.get("error"), dict):
            self.error = obj["error"]
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
            return not (self._drop and obj.get("choices") == [])
        return True


def _data_of(event: bytes) -> bytes | None:
    lines = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None
