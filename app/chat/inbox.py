"""A user's inbox: thread cards (summaries with unread counts) as a snapshot
and as they change, and read markers.

The cards are made in Lua (``notice`` in app.chat.scripts' _INBOX helpers),
by the very scripts that change a thread, and published on each member's
channel ``chat:user:{U}:inbox``. On one Redis that happens inside those
scripts; on a Redis Cluster a user's channel lives on the user's slot, which
a script running on the thread's slot cannot publish to, so ``Notices``
publishes them right after the change instead (one script call to build them
and one SPUBLISH per member, sent concurrently). Either way a card carries
the thread's ``rev``, so a socket can drop a card older than one it sent.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from redis.exceptions import RedisError

from app.chat import keys
from app.chat.errors import Forbidden, NotFound
from app.chat.keys import ThreadId, UserId
from app.chat.records import LastMessage, ThreadCard, ThreadGone
from app.chat.redis_types import RedisClient
from app.chat.scripts import Scripts, run_many

log = logging.getLogger(__name__)

PREVIEW_CHARS = 200


def parse_notice(raw: str | bytes, prompt_policy: str, active_at: int | None = None) -> Any:
    """A card or a removal from its raw form (as the scripts publish it).
    ``prompt_policy`` is the deployment's default, for threads without one."""
    data = orjson.loads(raw)
    if "removed" in data:
        return ThreadGone(thread_id=str(data["id"]), reason=str(data["removed"]))
    last = data.get("last_message")
    usage = data.get("usage") or {}
    updated = int(data.get("updated_at") or 0)
    return ThreadCard(
        id=str(data["id"]), title=str(data.get("title") or ""), owner=str(data.get("owner") or ""),
        role=str(data.get("role") or "member"),
        prompt_policy=str(data.get("prompt_policy") or prompt_policy),
        generating=bool(data.get("generating")), unread=int(data.get("unread") or 0),
        updated_at=updated, active_at=active_at if active_at is not None else updated,
        last_message=LastMessage(
            id=str(last["id"]), role=str(last.get("role") or ""),
            user_id=str(last.get("user_id") or ""),
            preview=str(last.get("preview") or "")[:PREVIEW_CHARS],
            created_at=int(last.get("created_at") or 0),
        ) if last else None,
        rev=int(data.get("rev") or 0),
        input_tokens=int(usage.get("input_tokens") or 0),
        output_tokens=int(usage.get("output_tokens") or 0),
    )  # fmt: skip


class Notices:
    """What the scripts could not publish themselves: on a Cluster (SPUBLISH)
    every inbox card of a change is published here, after it. With PUBLISH
    (one Redis) the scripts did it in the same step and this does nothing.
    Its calls never fail the change they follow, which is committed: a lost
    card leaves an inbox stale until the thread's next change or a reconnect."""

    def __init__(self, redis: RedisClient, scripts: Scripts, publish: str) -> None:
        self._redis = redis
        self._scripts = scripts
        self._publish = publish

    async def changed(self, thread: ThreadId, users: list[UserId] | None = None) -> None:
        """Publish the thread's card to ``users`` (default: every member)."""
        if self._publish == "PUBLISH":
            return
        try:
            reply = await self._scripts.inbox_summaries(
                keys=[keys.meta(thread), keys.history(thread), keys.members(thread)],
                args=list(users or []),
            )
            await self._send([(u, card) for u, card in zip(reply[::2], reply[1::2], strict=True)])
        except (RedisError, OSError) as exc:
            log.warning("inbox cards of thread %s not published: %s", thread, exc)

    async def _send(self, cards: list[tuple[str, str]]) -> None:
        await asyncio.gather(
            *(
                self._redis.execute_command(self._publish, keys.user_inbox(UserId(u)), card)
                for u, card in cards
            )
        )

    async def removed(self, thread: ThreadId, users: list[str], reason: str) -> None:
        """Tell ``users`` the thread left their inbox."""
        if self._publish == "PUBLISH" or not users:
            return
        gone = orjson.dumps({"id": thread, "removed": reason}).decode()
        try:
            await self._send([(u, gone) for u in users])
        except (RedisError, OSError) as exc:
            log.warning("removal of thread %s not published: %s", thread, exc)


class Inbox:
    """Snapshots of a user's threads and their read markers."""

    def __init__(
        self, redis: RedisClient, scripts: Scripts, publish: str, prompt_policy: str,
        open_access: bool,
    ) -> None:  # fmt: skip
        self._redis = redis
        self._scripts = scripts
        self._publish = publish
        self._policy = prompt_policy
        self._open = "1" if open_access else "0"
        self._notices = Notices(redis, scripts, publish)

    async def cards(self, user: UserId, threads: list[tuple[ThreadId, int]]) -> list[ThreadCard]:
        """The cards of ``threads`` (id, activity in ms) for ``user``, in one
        round trip however many (a pipeline of one script call each); threads
        gone or no longer the user's are left out."""
        replies = await run_many(
            self._redis, self._scripts.inbox_summaries,
            [([keys.meta(t), keys.history(t), keys.members(t)], [user]) for t, _ in threads],
        )  # fmt: skip
        cards = []
        for (_, active), reply in zip(threads, replies, strict=True):
            if reply:
                card = parse_notice(reply[1], self._policy, active)
                if isinstance(card, ThreadCard):
                    cards.append(card)
        return cards

    async def read(self, thread: ThreadId, user: UserId, message_id: str) -> None:
        """Move ``user``'s read marker forward to ``message_id``; every socket
        of theirs hears the new count."""
        result = await self._scripts.read_marker(
            keys=[keys.meta(thread), keys.history(thread), keys.members(thread)],
            args=[user, message_id, self._publish, self._open],
        )
        if result == "forbidden":
            raise Forbidden("you are not a member of this thread")
        if result == "not_found":
            raise NotFound("no such message in this thread")
        await self._notices.changed(thread, [user])
