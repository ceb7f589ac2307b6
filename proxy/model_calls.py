"""Asking a configured model one chat completion, outside the proxy's request path, with retries.

The offline evaluation and the automatic judge call models directly through their upstreams (the
upstream's own credentials, the pooled session of `proxy.upstream`), not through the proxy: they
are not user traffic and must not enter an experiment's figures.

A 429 or 5xx answer, or a transport failure, is retried up to `retries` times. The wait is the
answer's Retry-After when it gives one in seconds (capped, so a typo upstream cannot park a run for a
day), else exponential backoff from half a second.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.errors import UpstreamError
from proxy.upstream import RawHeaders, UpstreamPool

RETRIES = 3
RETRY_AFTER_MAX_S = 60.0
_BACKOFF_S = 0.5

Sleep = Callable[[float], Awaitable[Any]]


class ModelCallError(Exception):
    """No usable answer: the upstream failed after the retries, refused the request, or sent no completion."""


@dataclass(frozen=True, slots=True)
class ChatAnswer:
    text: str
    usage: dict[str, Any]  # the answer's `usage` object, {} when absent
    finish_reason: str | None
    latency_ms: float  # of the attempt that answered, waits between attempts excluded
    attempts: int  # 1 + retries


async def ask_chat(
    pool: UpstreamPool, upstream: str, body: bytes, *, sleep: Sleep, retries: int = RETRIES
) -> ChatAnswer:
    """POST `body` to the upstream's /chat/completions; ModelCallError when no answer comes."""
    for attempt in range(retries + 1):
        last = attempt == retries
        started = time.perf_counter()
        try:
            status, headers, payload = await pool.fetch(upstream, "/chat/completions", body, {})
        except UpstreamError as exc:
            if last:
                raise ModelCallError(f"{exc} (after {retries} retries)") from exc
            await sleep(_BACKOFF_S * 2**attempt)
            continue
        latency_ms = (time.perf_counter() - started) * 1000
        if status == 429 or status >= 500:
            if last:
                raise ModelCallError(f"upstream answered {status} after {retries} retries")
            delay = retry_after(headers)  # "0" means now, not "absent"
            await sleep(delay if delay is not None else _BACKOFF_S * 2**attempt)
            continue
        if status != 200:
            raise ModelCallError(f"upstream answered {status}: {payload[:160]!r}")
        return _answer(payload, latency_ms, attempt + 1)
    raise AssertionError("unreachable")


def _answer(payload: bytes, latency_ms: float, attempts: int) -> ChatAnswer:
    try:
        data = orjson.loads(payload)
        choice = data["choices"][0]
        text = choice["message"]["content"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        raise ModelCallError(f"not a chat completion: {payload[:80]!r}") from None
    usage = data.get("usage")
    finish = choice.get("finish_reason")
    return ChatAnswer(text=str(text or ""), usage=usage if isinstance(usage, dict) else {},
                      finish_reason=finish if isinstance(finish, str) else None, latency_ms=latency_ms,
                      attempts=attempts)  # fmt: skip


def retry_after(headers: RawHeaders) -> float | None:
    """Retry-After in seconds, clamped to [0, RETRY_AFTER_MAX_S]; None when absent or an HTTP date."""
    for name, value in headers:
        if name.lower() == b"retry-after":
            try:
                return min(max(float(value), 0.0), RETRY_AFTER_MAX_S)
            except ValueError:
                return None  # an HTTP date: fall back to the backoff
    return None


def usage_tokens(usage: dict[str, Any]) -> tuple[int, int]:
    """(prompt_tokens, completion_tokens) of a usage object, 0 for what it lacks."""
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
