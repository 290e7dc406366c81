"""The thread timeline: the events every client of a thread sees, in one order.

A timeline event is stored once in ``chat:{T}:events`` (fields ``n`` and
``data``) and published once on ``chat:{T}:live`` as its finished wire frame
``{"id":"<id>","n":<n>,...}``; the events one script appends (a turn's start,
its deltas, its end) are published together, as one message: ``BATCH`` (a
newline), then their frames separated by newlines. This module owns that
format: building event JSON for the commit scripts, turning stored entries
back into frames for resume, and reading a frame's id and number without
decoding the rest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import orjson

from app.chat import keys
from app.chat.history import tool_use_json
from app.chat.keys import ThreadId
from app.chat.records import (
    Delta,
    Done,
    Loading,
    Message,
    Queued,
    ToolCallEvent,
    ToolResultEvent,
)
from app.chat.redis_types import RedisClient
from app.chat.redis_types import entries as entries_of

# Stands where a commit script writes an id it decides (see app.chat.scripts:
# orjson never emits a raw control byte).
MESSAGE_ID_PLACEHOLDER = "\x01"

_HEAD = '{"id":"'
# Starts a published message holding several frames, and separates them. No
# frame holds a raw newline: event JSON comes from orjson, which escapes every
# control character in strings, and the scripts add only ids and numbers.
# (A pod of an earlier version drops such a message as of unknown shape, and
# reads its events from the log when the next frame shows the gap.)
BATCH = "\n"
_TYPE = ',"type":"'


@dataclass(frozen=True, slots=True)
class TimelineEvent:
    """One timeline event as delivered: its id, its contiguous number, its frame."""

    id: str
    key: tuple[int, int]
    n: int
    frame: str


def message_json(message: Message) -> dict[str, object]:
    """A message as clients see it, in ``message`` events and ``history`` pages
    (``parent_id`` always: null marks a root)."""
    data: dict[str, object] = {
        "id": message.id,
        "parent_id": message.parent_id,
        "role": message.role,
        "content": message.content,
        "user_id": message.user_id,
        "created_at": message.created_at,
        "status": message.status,
    }
    if message.client_msg_id is not None:
        data["client_msg_id"] = message.client_msg_id
    if message.queue_id is not None:
        data["queue_id"] = message.queue_id
    if message.siblings is not None:
        data["siblings"] = list(message.siblings)
    if message.tool_calls:
        data["tool_calls"] = [tool_use_json(c) for c in message.tool_calls]
    if message.usage is not None:
        data["usage"] = dict(message.usage)
    return data


def message_event_parts(thread_id: ThreadId, message: Message) -> tuple[str, str]:
    """The ``message`` event of a message about to be committed, in the two
    parts its commit script joins around the message's id and parent id,
    which the script decides: ``head`` ends where the id goes, ``tail``
    starts after the parent id. The text is in ``tail``, which the script
    joins once and neither searches nor copies again to build the frame (a
    full-speed reply is 12 KB, and Redis hashes every string Lua makes)."""
    fields = message_json(message)
    del fields["id"], fields["parent_id"]
    head = '{"type":"message","thread_id":' + orjson.dumps(thread_id).decode()
    return head + ',"message":{"id":"', "," + orjson.dumps(fields).decode()[1:] + "}"


def message_event_data(thread_id: ThreadId, message: Message) -> str:
    """The ``message`` event of a committed message (its id and parent set)."""
    head, tail = message_event_parts(thread_id, message)
    return f'{head}{message.id}","parent_id":{orjson.dumps(message.parent_id).decode()}{tail}'


def queued_json(queued: Queued) -> dict[str, str]:
    """A waiting prompt as clients see it, in ``queued`` events and ``ready.queue``."""
    data = {"queue_id": queued.queue_id, "user_id": queued.user_id, "content": queued.content}
    if queued.client_msg_id is not None:
        data["client_msg_id"] = queued.client_msg_id
    return data


def queued_event_data(thread_id: ThreadId, queued: Queued) -> str:
    """The ``queued`` event, whose ``queue_id`` (its own event id) the enqueue
    script fills in."""
    fields = queued_json(queued)
    del fields["queue_id"]
    return (
        '{"type":"queued","thread_id":'
        + orjson.dumps(thread_id).decode()
        + f',"queue_id":"{MESSAGE_ID_PLACEHOLDER}",'
        + orjson.dumps(fields).decode()[1:]
    )


def unqueued_event_data(thread_id: ThreadId, queue_id: str, reason: str) -> str:
    """The ``unqueued`` event: a waiting prompt left the queue without running."""
    return orjson.dumps(
        {"type": "unqueued", "thread_id": thread_id, "queue_id": queue_id, "reason": reason}
    ).decode()


def branch_event_data(thread_id: ThreadId) -> str:
    """The ``branch`` event (the active leaf changed), whose ``leaf_id`` the
    switch script fills in."""
    return (
        '{"type":"branch","thread_id":'
        + orjson.dumps(thread_id).decode()
        + f',"leaf_id":"{MESSAGE_ID_PLACEHOLDER}"}}'
    )


def done_event_data(done: Done) -> str:
    """The ``done`` event, whose ``message_id`` the commit script fills in."""
    data: dict[str, object] = {
        "type": "done",
        "thread_id": done.thread_id,
        "generation_id": done.generation_id,
        "status": done.status,
    }
    if done.usage is not None:
        data["usage"] = done.usage
    if done.error is not None:
        data["error"] = dataclasses.asdict(done.error)
    body = orjson.dumps(data).decode()
    return body[:-1] + f',"message_id":"{MESSAGE_ID_PLACEHOLDER}"}}'


def event_data(event: Loading | Delta | ToolCallEvent | ToolResultEvent) -> str:
    """Any other timeline event (``loading``, ``delta``, ``tool_call``,
    ``tool_result``) as stored JSON."""
    if isinstance(event, ToolCallEvent | ToolResultEvent):
        body = dataclasses.asdict(event)
        kind = "tool_call" if isinstance(event, ToolCallEvent) else "tool_result"
        return orjson.dumps({"type": kind, **body}).decode()
    if isinstance(event, Delta):
        return orjson.dumps(
            {
                "type": "delta",
                "thread_id": event.thread_id,
                "generation_id": event.generation_id,
                "seq": event.seq,
                "text": event.text,
            }
        ).decode()
    return orjson.dumps(
        {
            "type": "loading",
            "thread_id": event.thread_id,
            "generation_id": event.generation_id,
            "model": event.model,
        }
    ).decode()


def frame_from_entry(entry_id: str, fields: dict[str, str]) -> TimelineEvent:
    """Rebuild the published frame of a stored event (resume, gap fill)."""
    n = int(fields["n"])
    frame = f'{_HEAD}{entry_id}","n":{n},{fields["data"][1:]}'
    return TimelineEvent(entry_id, keys.event_id(entry_id), n, frame)


def ephemeral(frame: str) -> TimelineEvent:
    """A frame that is not a timeline event (``presence``, ``typing``) but
    travels the same per-socket queue: number -1, never stored, never replayed,
    never filtered by the send-order rule."""
    return TimelineEvent("", (0, 0), -1, frame)


def parse_frame(frame: str) -> TimelineEvent | None:
    """Read id and number from a published frame; None if it is not a timeline frame."""
    if not frame.startswith(_HEAD):
        return None
    end = frame.index('"', len(_HEAD))
    event_id = frame[len(_HEAD) : end]
    n_start = end + len('","n":')
    n_end = frame.index(",", n_start)
    return TimelineEvent(event_id, keys.event_id(event_id), int(frame[n_start:n_end]), frame)


def parse_message(message: str) -> list[TimelineEvent | None]:
    """The frames of one published message, each read as ``parse_frame`` does:
    one, or several for a ``BATCH``."""
    if message.startswith(BATCH):
        return [parse_frame(frame) for frame in message[1:].split(BATCH)]
    return [parse_frame(message)]


def event_type(event: TimelineEvent) -> str:
    """A timeline event's ``type`` (every stored event's data starts with it;
    "" for a frame without one, which is forwarded all the same)."""
    start = event.frame.find(_TYPE)
    if start < 0:
        return ""
    start += len(_TYPE)
    end = event.frame.find('"', start)
    return event.frame[start:end] if end >= 0 else ""


class Timeline:
    """Reads of a thread's event log (writes go through the commit scripts)."""

    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis

    async def read_after(
        self, thread: ThreadId, after: str, until: str = "+", count: int | None = None
    ) -> list[TimelineEvent]:
        """Events strictly after ``after`` (and up to ``until``), oldest first."""
        entries = entries_of(
            await self._redis.xrange(keys.events(thread), f"({after}", until, count=count)
        )
        return [frame_from_entry(entry_id, fields) for entry_id, fields in entries]

    async def read_from(self, thread: ThreadId, start: str) -> list[TimelineEvent]:
        """Events from ``start`` inclusive: the running turn's replay."""
        entries = entries_of(await self._redis.xrange(keys.events(thread), start, "+"))
        return [frame_from_entry(entry_id, fields) for entry_id, fields in entries]

    async def covers(self, thread: ThreadId, after: str, last_event_id: str | None) -> bool:
        """Whether every event after ``after`` is still in the log.

        True when ``after`` is the newest event, or when the log's oldest
        retained event is at or before ``after`` (nothing after it was
        trimmed). An ``after`` beyond the newest event cannot be ours.
        """
        after_key = keys.event_id(after)
        if last_event_id is None or after_key > keys.event_id(last_event_id):
            return False
        if after_key == keys.event_id(last_event_id):
            return True
        oldest = entries_of(await self._redis.xrange(keys.events(thread), "-", "+", count=1))
        return bool(oldest) and keys.event_id(oldest[0][0]) <= after_key
