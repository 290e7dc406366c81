"""The per-thread turn lock: one turn at a time per thread, across all pods.

A lease (``SET NX PX`` with a random owner token) held for the whole turn and
renewed while it runs, released by compare-and-delete. Each grant also takes
a fencing number (``INCR chat:{T}:fence``). The lease alone cannot guarantee a
single writer: a pod paused past its lease (GC, a stalled node, a Redis
failover that lost the key) still believes it owns the thread. So every write
of a turn carries its fencing number and the commit scripts refuse a stale
one: whatever the lease does, only the newest grant can write.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from app.chat import keys
from app.chat.keys import ThreadId
from app.chat.scripts import Scripts


@dataclass(frozen=True, slots=True)
class Lease:
    """A granted turn lock: the owner token and its fencing number."""

    token: str
    fence: int


class TurnLock:
    """Acquire, renew and release the turn lock of any thread."""

    def __init__(self, scripts: Scripts, ttl_ms: int) -> None:
        self._scripts = scripts
        self.ttl_ms = ttl_ms

    async def acquire(self, thread: ThreadId) -> Lease | None:
        """Take the lock, or None if another turn holds it (never waits)."""
        token = secrets.token_hex(16)
        fence = await self._scripts.acquire_lock(
            keys=[keys.lock(thread), keys.fence(thread)], args=[token, self.ttl_ms]
        )
        return None if fence is None else Lease(token, int(fence))

    async def renew(self, thread: ThreadId, lease: Lease) -> bool:
        """Extend the lease; False means it was lost and the turn must stop."""
        renewed = await self._scripts.renew_lock(
            keys=[keys.lock(thread)], args=[lease.token, self.ttl_ms]
        )
        return bool(renewed)

    async def release(self, thread: ThreadId, lease: Lease) -> bool:
        """Release the lock if it is still ours."""
        released = await self._scripts.release_lock(keys=[keys.lock(thread)], args=[lease.token])
        return bool(released)
