"""Who may call the admin API: the admin token (read and write), an optional read-only token,
and a per-caller rate limit, so a leaked token or a password-guessing loop is slowed to a trickle.

The limiter is `limits`' moving window held in this process's memory: each proxy instance
limits on its own (an instance is what an attacker reaches), and the admin path never waits on
Redis for it.
"""

from __future__ import annotations

import hmac
import math
import time
from typing import Literal

from limits import RateLimitItemPerMinute, storage, strategies

from proxy.errors import AdminDisabled, AuthenticationFailed, ReadOnlyToken, TooManyRequests

Role = Literal["admin", "read"]
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class AdminAuth:
    def __init__(self, token: str | None, read_token: str | None, *, per_minute: int) -> None:
        self._token = token.encode() if token else None
        self._read_token = read_token.encode() if read_token else None
        self._limit = RateLimitItemPerMinute(per_minute) if per_minute > 0 else None
        self._limiter = strategies.MovingWindowRateLimiter(storage.MemoryStorage())

    def check(self, authorization: str | None, method: str, client: str) -> Role:
        """The caller's role, or the error to answer. Both tokens are always compared, in
        constant time, so timing tells nothing about which one a guess was close to."""
        if self._token is None:
            raise AdminDisabled("the admin API is disabled: set ABPROXY_ADMIN_TOKEN to enable it")
        scheme, _, given = (authorization or "").partition(" ")
        presented = given.strip().encode() if scheme.lower() == "bearer" else b""
        is_admin = hmac.compare_digest(presented, self._token)
        is_reader = self._read_token is not None and hmac.compare_digest(presented, self._read_token)
        role: Role | None = "admin" if is_admin else "read" if is_reader else None
        # Failed attempts are limited per client address, so guessing is as slow as using.
        self._count(role or f"unauthenticated:{client}")
        if role is None:
            raise AuthenticationFailed("missing or invalid admin token (Authorization: Bearer ...)")
        if role == "read" and method not in READ_METHODS:
            raise ReadOnlyToken("the read-only admin token cannot change anything: use the admin token")
        return role

    def _count(self, key: str) -> None:
        if self._limit is None or self._limiter.hit(self._limit, key):
            return
        reset = self._limiter.get_window_stats(self._limit, key).reset_time
        wait = max(1, math.ceil(reset - time.time()))
        raise TooManyRequests(f"too many admin requests: at most {self._limit.amount} a minute",
                              code="admin_rate_limited", retry_after_s=wait)  # fmt: skip
