"""One acting controller at a time: a Redis lease, checked again at every write.

Any number of controllers may run (one per replica). Each tick, each tries to take or renew the lease
`abproxy:controller:lock` (SET NX PX / PEXPIRE if it is the owner, one script). The one holding it
evaluates and acts; the others only watch. A leader that dies stops renewing and another takes over
when the lease runs out.

A lease alone is not enough: a leader paused past its lease (a long GC, a stalled disk, a partition)
would wake up still believing it leads. So the transition script itself checks, inside Redis and in
the same step as the write, that the writer is still the lock's owner: a deposed leader's write is
refused (`LostLock`), never applied. This is the fencing the lock needs; the storage that must refuse
a stale writer and the lock are the same Redis, so the check is atomic with the write (Kleppmann's
fencing tokens exist for storage that cannot see the lock).
"""

from __future__ import annotations

import os
import secrets
import socket

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.controller.state import LOCK_KEY

# Returns 1 when the caller holds the lease afterwards (taken or renewed), 0 when another does.
_ACQUIRE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""
# Gives the lease up only if it is still the caller's.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def new_owner_id() -> str:
    """host-pid-random: readable in `redis-cli GET abproxy:controller:lock`, unique across restarts."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


class ControllerLock:
    def __init__(self, redis: aioredis.Redis, owner: str, lease_s: float) -> None:
        self.owner = owner
        self._lease_ms = str(max(1, int(lease_s * 1000)))
        self._redis = redis
        self._acquire = redis.register_script(_ACQUIRE)
        self._release = redis.register_script(_RELEASE)

    async def hold(self) -> bool:
        """Take or renew the lease; False when another controller holds it or Redis cannot be reached."""
        try:
            return bool(await self._acquire(keys=[LOCK_KEY], args=[self.owner, self._lease_ms]))
        except (RedisError, OSError):
            return False  # unreachable: act as a follower; the transition would be refused anyway

    async def release(self) -> None:
        """On a clean shutdown: another controller need not wait for the lease to run out."""
        try:
            await self._release(keys=[LOCK_KEY], args=[self.owner])
        except (RedisError, OSError):
            pass

    async def holder(self) -> str | None:
        try:
            value = await self._redis.get(LOCK_KEY)
        except (RedisError, OSError):
            return None
        return value if isinstance(value, str) else None
