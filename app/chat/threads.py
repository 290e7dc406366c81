"""Threads as a whole: creation (and its epoch), membership, a user's thread list.

A thread comes into being the first time someone opens it: its creator owns
it and is its first member. Only members may read or write it.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from app.chat import keys
from app.chat.keys import ThreadId, UserId
from app.chat.scripts import Scripts


@dataclass(frozen=True, slots=True)
class ThreadInfo:
    """What a socket learns about a thread when it opens it."""

    epoch: str
    owner: str
    created: bool


class Threads:
    """Thread metadata, members and per-user thread lists."""

    def __init__(self, redis: Any, scripts: Scripts) -> None:
        self._redis = redis
        self._scripts = scripts

    async def open(self, thread: ThreadId, user: UserId) -> ThreadInfo:
        """Create the thread if it is new (``user`` owns it); return its info."""
        epoch, owner, created = await self._scripts.ensure_thread(
            keys=[keys.meta(thread), keys.members(thread)],
            args=[secrets.token_hex(8), user, int(time.time() * 1000)],
        )
        return ThreadInfo(epoch=epoch, owner=owner, created=bool(created))

    async def is_member(self, thread: ThreadId, user: UserId) -> bool:
        return bool(await self._redis.sismember(keys.members(thread), user))

    async def last_event_id(self, thread: ThreadId) -> str | None:
        last: str | None = await self._redis.hget(keys.meta(thread), "last_event_id")
        return last

    async def touch(self, user: UserId, thread: ThreadId) -> None:
        """Move the thread to the top of the user's list.

        A separate command, not part of the turn's commit: the user's list is
        hash-tagged by user, so on a Redis Cluster it lives on another shard
        than the thread. A crash in between only leaves the list a little
        stale; the thread's own data is already committed.
        """
        await self._redis.zadd(keys.user_threads(user), {thread: time.time()})

    async def of_user(self, user: UserId, limit: int = 100) -> list[str]:
        """The user's thread ids, most recently active first."""
        ids: list[str] = await self._redis.zrevrange(keys.user_threads(user), 0, limit - 1)
        return ids
