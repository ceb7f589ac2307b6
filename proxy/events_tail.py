"""`abproxy events tail`: follow the event stream in Redis, one readable line per request or feedback."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.event_stream import StreamEvent, tail


def matches(event: dict[str, Any], experiment: str | None, variant: str | None) -> bool:
    """Feedback names its request, not the experiment or variant: shown only when unfiltered."""
    return (experiment is None or event.get("experiment") == experiment) and (
        variant is None or event.get("variant") == variant
    )


def format_line(event: dict[str, Any]) -> str:
    """`time experiment variant model endpoint status latency ttft tokens cost finish request-id`."""
    time_ = str(event.get("time") or event.get("ts", ""))
    if event.get("kind") == "feedback":
        about = f"req={event.get('request_id')}" if event.get("level") == "request" else \
            f"user={event.get('user_hash')}" + (f" in {event['experiment']}" if event.get("experiment") else "")
        return f"{time_}  feedback  {event.get('metric')}={event.get('value')}  {about}"
    if event.get("experiment") is None:
        return f"{time_}  rejected  {event.get('path', '?')}  {event.get('status')}  {event.get('error')}  " \
               f"req={event.get('request_id')}"
    ttft = event.get("ttft_ms")
    parts = [
        time_,
        str(event["experiment"]),
        f"{event.get('variant', '?'):<9}",
        str(event.get("upstream_model") or event.get("model")),
        str(event.get("endpoint")) + (" stream" if event.get("stream") else ""),
        str(event.get("status")) + (f" {event['error']}" if event.get("error") else ""),
        f"{event.get('latency_ms', 0):.1f}ms",
        f"ttft {ttft:.1f}ms" if ttft is not None else "",
        f"{event.get('prompt_tokens', 0)}+{event.get('completion_tokens', 0)} tok",
        f"${event.get('cost_usd', 0):.6f}",
        str(event.get("finish_reason") or "-"),
        f"req={event.get('request_id')}",
    ]
    return "  ".join(p for p in parts if p)


async def follow(
    redis_url: str,
    key: str,
    on_event: Callable[[StreamEvent], None],
    on_problem: Callable[[str], None],
    *,
    last: int = 0,
) -> None:
    """Tail until cancelled; a lost connection is reported and retried, not fatal."""
    client = aioredis.from_url(redis_url, socket_connect_timeout=2)
    try:
        while True:
            try:
                async for entry in tail(client, key, last=last, on_malformed=on_problem):
                    on_event(entry)
            except (RedisError, OSError) as exc:
                on_problem(f"redis at {redis_url} unreachable ({exc}); retrying")
                last = 0  # after a gap, carry on from live events rather than replaying
                await asyncio.sleep(1)
    finally:
        await client.aclose()
