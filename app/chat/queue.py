"""A thread's prompt queue (``chat:{T}:queue``): prompts that wait for the
running turn, under prompt_policy ``queue`` or ``interrupt``.

The queue is a Redis Stream in the thread's own hash tag: one entry per
waiting prompt, its id the queue id (which is also the id of its ``queued``
timeline event), fields ``parent user_id content created_at
[client_msg_id]``. Writes are scripts (app.chat.scripts): ENQUEUE_PROMPT
adds one only while a turn holds the thread, UNQUEUE_PROMPT cancels one, and
BEGIN_TURN takes the head in the same step that starts it, so each queued
prompt starts exactly once, in order, on whichever pod frees the thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.chat import keys
from app.chat.errors import Forbidden, NotFound, QueueFull
from app.chat.keys import ThreadId
from app.chat.records import Message, Queued
from app.chat.redis_types import RedisClient
from app.chat.redis_types import entries as entries_of
from app.chat.scripts import Scripts
from app.chat.timeline import queued_event_data, unqueued_event_data


@dataclass(frozen=True, slots=True)
class Enqueued:
    """ENQUEUE_PROMPT's answer: the prompt waits; with ``running`` False the
    thread is free and its queue's head must be started by the caller."""

    queue_id: str
    running: bool


@dataclass(frozen=True, slots=True)
class Idle:
    """ENQUEUE_PROMPT's answer: nothing runs and nothing waits: begin the turn."""


@dataclass(frozen=True, slots=True)
class Seen:
    """ENQUEUE_PROMPT's answer for a client_msg_id seen before: nothing written."""

    event_id: str


@dataclass(frozen=True, slots=True)
class Head:
    """The prompt at the head of a queue, as BEGIN_TURN commits it."""

    message: Message
    anchor: str


class PromptQueue:
    """Enqueue, cancel and read a thread's waiting prompts."""

    def __init__(
        self, redis: RedisClient, scripts: Scripts, publish: str, retention: int,
        dedup_ttl_s: int, max_queued: int, members_only: bool = False,
    ) -> None:  # fmt: skip
        """``members_only``: only a member of the thread may queue (authentication on)."""
        self._redis = redis
        self._scripts = scripts
        self._publish = publish
        self._retention = retention
        self._dedup_ttl_s = dedup_ttl_s
        self._max = max_queued
        self._members_only = "1" if members_only else "0"

    async def enqueue(
        self, thread: ThreadId, message: Message, anchor: str
    ) -> Enqueued | Idle | Seen:
        """Queue ``message`` (a user prompt, to be committed under ``anchor``)
        behind the running turn. QueueFull at CHAT_MAX_QUEUED, NotFound for an
        anchor not of this thread or a thread that is gone, Forbidden when
        the sender is no longer a member (``members_only``)."""
        waiting = Queued("", message.user_id, message.content, message.client_msg_id)
        fields = ["user_id", message.user_id, "content", message.content,
                  "created_at", str(message.created_at)]  # fmt: skip
        if message.client_msg_id:
            fields += ["client_msg_id", message.client_msg_id]
        reply = await self._scripts.enqueue_prompt(
            keys=[
                keys.meta(thread), keys.events(thread), keys.live(thread), keys.queue(thread),
                keys.dedup(thread), keys.lock(thread), keys.history(thread),
                keys.tree(thread),
            ],
            args=[
                self._publish, self._retention, queued_event_data(thread, waiting),
                message.client_msg_id or "", self._dedup_ttl_s, self._max, anchor,
                self._members_only, *fields,
            ],
        )  # fmt: skip
        if reply[0] == "queued":
            return Enqueued(reply[1], bool(reply[2]))
        if reply[0] == "idle":
            return Idle()
        if reply[0] == "dup":
            return Seen(reply[1])
        if reply[0] == "full":
            raise QueueFull(f"{self._max} prompts already wait in this thread; try again later")
        if reply[0] == "gone":
            raise NotFound("this thread no longer exists")
        if reply[0] == "forbidden":
            raise Forbidden("you are not a member of this thread")
        raise NotFound("no such message in this thread")

    async def cancel(
        self, thread: ThreadId, queue_id: str, caller: str, sender_or_owner: bool,
        reason: str = "cancelled",
    ) -> None:  # fmt: skip
        """Take a waiting prompt out (its sender or the thread's owner, unless
        anyone may); every socket gets ``unqueued`` with ``reason``. NotFound
        when it no longer waits, Forbidden for anyone else."""
        result = await self._scripts.unqueue_prompt(
            keys=[keys.meta(thread), keys.events(thread), keys.live(thread), keys.queue(thread)],
            args=[
                self._publish, self._retention,
                unqueued_event_data(thread, queue_id, reason), queue_id, caller,
                "1" if sender_or_owner else "0",
            ],
        )  # fmt: skip
        if result == "not_found":
            raise NotFound("no such prompt waits in this thread")
        if result == "forbidden":
            raise Forbidden("only its sender or the thread's owner may cancel a queued prompt")

    async def waiting(self, thread: ThreadId) -> list[Queued]:
        """The waiting prompts, first to run first (``ready.queue``)."""
        return waiting_of(await self._redis.xrange(keys.queue(thread), "-", "+"))

    async def head(self, thread: ThreadId) -> Head | None:
        """The prompt to run next, as the message BEGIN_TURN commits."""
        entries = entries_of(await self._redis.xrange(keys.queue(thread), "-", "+", count=1))
        if not entries:
            return None
        entry_id, fields = entries[0]
        message = Message(
            id="", role="user", content=fields.get("content", ""),
            user_id=fields.get("user_id", ""), created_at=int(fields.get("created_at", 0)),
            status="complete", client_msg_id=fields.get("client_msg_id") or None,
            queue_id=entry_id,
        )  # fmt: skip
        return Head(message, fields.get("parent", ""))

    async def size(self, thread: ThreadId) -> int:
        return int(await self._redis.xlen(keys.queue(thread)))


def _queued(entry_id: str, fields: dict[str, str]) -> Queued:
    return Queued(
        entry_id, fields.get("user_id", ""), fields.get("content", ""),
        fields.get("client_msg_id") or None,
    )  # fmt: skip


def waiting_of(reply: Any) -> list[Queued]:
    """The waiting prompts from the queue's XRANGE (a connect's pipeline reads it)."""
    return [_queued(entry_id, fields) for entry_id, fields in entries_of(reply)]
