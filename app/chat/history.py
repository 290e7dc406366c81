"""Reads of a thread's committed messages (``chat:{T}:history``).

Messages are written only by the turn commit scripts (app.chat.turns); a
message's id is its history entry id, so paging is a plain XREVRANGE.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from app.chat import keys
from app.chat.keys import ThreadId
from app.chat.records import Message, MessageStatus, Role
from app.chat.redis_types import RedisClient
from app.chat.redis_types import entries as entries_of


def message_from_entry(entry_id: str, fields: dict[str, str]) -> Message:
    """A message as read back from its history stream entry."""
    return Message(
        id=entry_id,
        role=cast(Role, fields["role"]),
        content=fields.get("content", ""),
        user_id=fields.get("user_id", ""),
        created_at=int(fields.get("created_at", entry_id.split("-")[0])),
        status=cast(MessageStatus, fields.get("status", "complete")),
        client_msg_id=fields.get("client_msg_id") or None,
    )


def entry_fields(message: Message) -> list[str]:
    """A message's history stream entry, as flat (name, value) pairs for XADD."""
    pairs = [
        "role", message.role,
        "content", message.content,
        "user_id", message.user_id,
        "status", message.status,
        "created_at", str(message.created_at),
    ]  # fmt: skip
    if message.client_msg_id:
        pairs += ["client_msg_id", message.client_msg_id]
    return pairs


class HistoryReader:
    """Pages of a thread's messages, oldest first within a page."""

    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis

    async def page(
        self, thread: ThreadId, before: str | None, limit: int
    ) -> tuple[list[Message], bool]:
        """The ``limit`` messages just before ``before`` (or the latest), and
        whether older ones exist."""
        if before is not None and keys.event_id(before) == (0, 0):
            return [], False  # nothing is older (and Redis refuses "(0-0" as a bound)
        newest = f"({before}" if before else "+"
        entries = entries_of(
            await self._redis.xrevrange(keys.history(thread), newest, "-", count=limit + 1)
        )
        has_more = len(entries) > limit
        messages = [message_from_entry(i, f) for i, f in reversed(entries[:limit])]
        return messages, has_more

    async def all(self, thread: ThreadId) -> list[Message]:
        """The whole history, oldest first (the seed protocol's GET_HISTORY)."""
        entries = entries_of(await self._redis.xrange(keys.history(thread), "-", "+"))
        return [message_from_entry(i, f) for i, f in entries]

    async def latest(
        self, thread: ThreadId, budget: int, cost: Callable[[Message], int]
    ) -> list[Message]:
        """The newest messages whose ``cost`` (estimated tokens) fits in
        ``budget``, oldest first, and always the newest one: the context a
        model sees."""
        picked: list[Message] = []
        used = 0
        cursor = "+"
        # Pages that start small and double: a budget is often met by the last
        # few messages, and every entry read past it is Redis and pod time
        # spent on every turn.
        count = 8
        while True:
            entries = entries_of(
                await self._redis.xrevrange(keys.history(thread), cursor, "-", count=count)
            )
            count = min(count * 2, 256)
            if not entries:
                return picked[::-1]
            for entry_id, fields in entries:
                message = message_from_entry(entry_id, fields)
                used += cost(message)
                if used > budget and picked:
                    return picked[::-1]
                picked.append(message)
            cursor = f"({entries[-1][0]}"
