"""A turn's records in Redis: begin, deltas, end, cancel, and the turn index.

Every write here is one fenced commit script (see app.chat.scripts), so each
is atomic and refused once a newer lock grant exists. The turn record
``chat:{T}:turn`` says which generation runs and where its events start; the
index ``chat:turns`` lets the reaper find turns whose pod died. The index is
written outside the scripts because on a Redis Cluster it lives on another
shard; that is safe because it is only a hint: the reaper trusts the turn
record and the lock, and drops index entries that point at neither.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis.exceptions import ResponseError

from app.chat import keys
from app.chat.errors import Forbidden, InvalidRequest, LockLost, NotFound, ThreadBusy
from app.chat.history import entry_fields
from app.chat.inbox import Notices
from app.chat.keys import ThreadId
from app.chat.lock import Lease
from app.chat.records import (
    Delta,
    Done,
    Loading,
    Message,
    ToolCallEvent,
    ToolResultEvent,
    ToolUse,
)
from app.chat.redis_types import RedisClient, texts
from app.chat.redis_types import entries as entries_of
from app.chat.redis_types import fields as hash_of
from app.chat.scripts import Scripts
from app.chat.timeline import (
    branch_event_data,
    done_event_data,
    event_data,
    message_event_parts,
)
from app.chat.usage import utc_day
from app.settings import Settings

# A turn closed for a dead pod: what it cost died with the pod.
UNKNOWN_USAGE = {"input_tokens": 0, "output_tokens": 0}


@dataclass(frozen=True, slots=True)
class TurnRecord:
    """The running turn of a thread, as stored in ``chat:{T}:turn``."""

    generation_id: str
    fence: int
    pod: str
    start_id: str
    user_message_id: str
    cancel_requested: bool
    user_id: str = ""


@dataclass(frozen=True, slots=True)
class Partial:
    """What a turn had published, rebuilt from the timeline: its text, how
    many deltas carried it, and the tool calls that finished."""

    text: str
    deltas: int
    tool_calls: tuple[ToolUse, ...]


@dataclass(frozen=True, slots=True)
class Begun:
    """BEGIN_TURN's answer: the turn is open; ``message_id`` is the user
    message it answers (committed just now, unless it is a regenerate);
    ``context_start`` where the thread's last context started (None: not
    known), and the thread's ``members``, read in the same step. ``parent``
    is the committed message's parent ('' for a root, a regenerate or a
    retried call), ``version`` the thread's history version and
    ``archived`` its archive watermark: what the pod's cached context is
    checked against (app.chat.contexts)."""

    message_id: str
    loading_id: str
    context_start: str | None = None
    members: tuple[str, ...] = ()
    parent: str = ""
    version: str = ""
    archived: str = ""


@dataclass(frozen=True, slots=True)
class Ended:
    """END_TURN's answer: the assistant message committed, and what the pod
    does next without reading it again: whether prompts wait in the queue,
    whether the thread still wants a title, and the thread's pending usage
    charges (generation id -> charge, as the outbox holds them)."""

    message_id: str
    queued: bool
    untitled: bool
    charges: dict[str, str]


@dataclass(frozen=True, slots=True)
class Orphaned:
    """BEGIN_TURN's answer when an earlier turn was left open by a dead pod."""


@dataclass(frozen=True, slots=True)
class Duplicate:
    """BEGIN_TURN's answer for a client_msg_id already seen: nothing was
    written. ``event_id`` is the first event it caused (the message, or a
    regenerate's ``loading``)."""

    event_id: str


@dataclass(frozen=True, slots=True)
class Waits:
    """BEGIN_TURN's answer when a prompt must queue instead: prompts wait in
    the queue (``queue_first``), or the queued prompt to start is no longer
    the head (``moved``: cancelled meanwhile). Nothing was written."""

    reason: str


def _fenced(exc: ResponseError) -> Exception:
    return LockLost("a newer turn owns this thread") if "STALE_FENCE" in str(exc) else exc


class TurnStore:
    """Fenced writes of turns and the records the reaper reads."""

    def __init__(
        self, redis: RedisClient, scripts: Scripts, publish: str, retention: int,
        dedup_ttl_s: int, members_only: bool = False,
    ) -> None:  # fmt: skip
        """``members_only``: a turn begins only for a member of the thread
        (authentication on), checked in the commit itself."""
        self._redis = redis
        self._scripts = scripts
        self._publish = publish
        self._retention = retention
        self._dedup_ttl_s = dedup_ttl_s
        self._members_only = "1" if members_only else "0"
        self._notices = Notices(redis, scripts, publish)

    @classmethod
    def configured(
        cls, redis: RedisClient, scripts: Scripts, publish: str, settings: Settings
    ) -> TurnStore:
        """The store as pods and the standalone reaper use it (CHAT_EVENT_RETENTION,
        CHAT_DEDUP_TTL_S)."""
        return cls(
            redis, scripts, publish, settings.chat_event_retention, settings.chat_dedup_ttl_s,
            members_only=settings.auth_enabled,
        )  # fmt: skip

    async def begin(
        self, thread: ThreadId, lease: Lease, message: Message | None, loading: Loading,
        pod: str, anchor: str = "", client_msg_id: str | None = None, charge_to: str = "",
        answers: str = "",
    ) -> Begun | Duplicate | Orphaned | Waits:  # fmt: skip
        """Commit the user's ``message`` under ``anchor`` ('' = the active
        leaf, '-' = as a new root, else a message id) and open the turn; or,
        with no ``message`` (a regenerate), open a turn that answers the
        message ``anchor`` again. Or find it was asked for before
        (``client_msg_id``, default the message's), or that a dead pod's turn
        must be closed first. NotFound when the thread is gone (deleted under
        an open socket) or ``anchor`` is not one of its messages; Forbidden
        when the message's user is no longer a member (``members_only``);
        InvalidRequest when a regenerated reply would answer no user message.
        A regenerate's ``answers``: the user message it answers as found in
        both tiers (app.chat.history), for when Redis no longer holds it.
        The turn's tokens are charged to the message's user, or ``charge_to``.
        A ``message`` with a ``queue_id`` is a queued prompt: the queue's head,
        taken from the queue in the same step."""
        if message is not None and client_msg_id is None:
            client_msg_id = message.client_msg_id
        kind = "regenerate" if message is None else "queued" if message.queue_id else "prompt"
        try:
            reply = await self._scripts.begin_turn(
                keys=[
                    keys.fence(thread), keys.meta(thread), keys.events(thread),
                    keys.live(thread), keys.history(thread), keys.dedup(thread),
                    keys.turn(thread), keys.tree(thread), keys.queue(thread),
                    keys.context_start(thread),
                ],
                args=[
                    lease.fence, self._publish, self._retention,
                    *(message_event_parts(thread, message) if message else ("", "")),
                    event_data(loading),
                    client_msg_id or "", self._dedup_ttl_s, loading.generation_id, pod, kind,
                    anchor, (message.queue_id or "") if message else answers,
                    self._members_only,
                    *(entry_fields(message) if message else ("user_id", charge_to)),
                ],
            )  # fmt: skip
        except ResponseError as exc:
            raise _fenced(exc) from exc
        if reply[0] == "dup":
            return Duplicate(reply[1])
        if reply[0] == "orphan":
            return Orphaned()
        if reply[0] == "gone":
            raise NotFound("this thread no longer exists")
        if reply[0] == "not_found":
            raise NotFound("no such message in this thread")
        if reply[0] == "forbidden":
            raise Forbidden("you are not a member of this thread")
        if reply[0] == "not_user":
            raise InvalidRequest("that message answers no user message")
        if reply[0] in ("queue_first", "moved"):
            return Waits(reply[0])
        await self._notices.changed(thread)
        return Begun(
            reply[1], reply[2], reply[3] or None, tuple(reply[7:]), reply[4], reply[5], reply[6]
        )

    async def switch(self, thread: ThreadId, lease: Lease, message_id: str) -> str:
        """Make the newest leaf under ``message_id`` the active leaf and tell
        every socket (``branch``); returns the leaf. NotFound for a message
        not of this thread, ThreadBusy while a turn is open."""
        try:
            reply = await self._scripts.switch_branch(
                keys=[
                    keys.fence(thread), keys.meta(thread), keys.events(thread),
                    keys.live(thread), keys.history(thread), keys.tree(thread),
                    keys.turn(thread),
                ],
                args=[
                    lease.fence, self._publish, self._retention, branch_event_data(thread),
                    message_id,
                ],
            )  # fmt: skip
        except ResponseError as exc:
            raise _fenced(exc) from exc
        if reply[0] == "not_found":
            raise NotFound("no such message in this thread")
        if reply[0] == "busy":
            raise ThreadBusy("a reply is being generated in this thread")
        leaf: str = reply[1]
        await self._notices.changed(thread)
        return leaf

    async def append_deltas(self, thread: ThreadId, lease: Lease, deltas: Sequence[Delta]) -> bool:
        """Publish deltas of consecutive seqs, in one call; True when a cancel
        of the turn was asked for."""
        try:
            cancel = await self._scripts.append_delta(
                keys=[
                    keys.fence(thread), keys.meta(thread), keys.events(thread),
                    keys.live(thread), keys.turn(thread),
                ],
                args=[lease.fence, self._publish, deltas[0].seq, *map(event_data, deltas)],
            )  # fmt: skip
        except ResponseError as exc:
            raise _fenced(exc) from exc
        return cancel is not None

    async def append_once(
        self, thread: ThreadId, lease: Lease, event: ToolCallEvent | ToolResultEvent
    ) -> bool:
        """Publish a tool event once per call (a retry appends nothing); True
        when a cancel of the turn was asked for."""
        once = f"{'tc' if isinstance(event, ToolCallEvent) else 'tr'}:{event.call_id}"
        try:
            cancel = await self._scripts.append_once(
                keys=[
                    keys.fence(thread), keys.meta(thread), keys.events(thread),
                    keys.live(thread), keys.turn(thread),
                ],
                args=[lease.fence, self._publish, event_data(event), once],
            )  # fmt: skip
        except ResponseError as exc:
            raise _fenced(exc) from exc
        return cancel is not None

    async def end(
        self, thread: ThreadId, lease: Lease, assistant: Message, done: Done,
        deltas: Sequence[Delta] = (),
    ) -> Ended | None:  # fmt: skip
        """Publish the turn's last ``deltas`` (consecutive seqs), commit the
        assistant's message, publish ``done``, free the thread, add the
        turn's tokens (``done.usage``) to the thread's totals and put the
        user's charge in the thread's usage outbox (app.chat.usage).

        None when this generation was already closed (a retried call)."""
        usage = done.usage or {}
        try:
            reply = await self._scripts.end_turn(
                keys=[
                    keys.fence(thread), keys.meta(thread), keys.events(thread),
                    keys.live(thread), keys.history(thread), keys.turn(thread),
                    keys.lock(thread), keys.tree(thread), keys.usage_outbox(thread),
                    keys.queue(thread),
                ],
                args=[
                    lease.fence, self._publish, self._retention,
                    *message_event_parts(thread, assistant), done_event_data(done),
                    lease.token, done.generation_id,
                    usage.get("input_tokens", 0), usage.get("output_tokens", 0), utc_day(),
                    deltas[0].seq if deltas else 0, len(deltas), *map(event_data, deltas),
                    *entry_fields(assistant),
                ],
            )  # fmt: skip
        except ResponseError as exc:
            raise _fenced(exc) from exc
        if reply is None:
            return None
        await self._notices.changed(thread)
        message_id, waiting, untitled, *outbox = reply
        charges = dict(zip(outbox[::2], outbox[1::2], strict=True))
        return Ended(message_id, bool(waiting), bool(untitled), charges)

    async def request_cancel(self, thread: ThreadId, generation_id: str | None) -> str | None:
        """Flag the running turn (if it matches) and tell every pod; its id or None."""
        control = orjson.dumps({"control": "cancel", "generation_id": generation_id}).decode()
        cancelled: str | None = await self._scripts.request_cancel(
            keys=[keys.turn(thread), keys.live(thread)],
            args=[generation_id or "", self._publish, control],
        )
        return cancelled

    async def record(self, thread: ThreadId) -> TurnRecord | None:
        """The running turn of a thread, or None when it is idle."""
        return turn_record(await self._redis.hgetall(keys.turn(thread)))

    async def partial(self, thread: ThreadId, record: TurnRecord) -> Partial:
        """What a turn had published, rebuilt from its timeline events.

        The log is never trimmed while a turn runs (trimming happens only at
        the start and end of turns), so every event of the turn is there. A
        tool call counts as finished once its ``tool_result`` is there; its
        offset is the text published before its ``tool_call``, as the turn
        itself counts it (text is always flushed before a tool_call).
        """
        entries = entries_of(await self._redis.xrange(keys.events(thread), record.start_id, "+"))
        pieces: list[str] = []
        length = 0
        calls: dict[str, tuple[str, Any, int]] = {}
        finished: list[ToolUse] = []
        for _entry_id, fields in entries:
            event = orjson.loads(fields["data"])
            if event.get("generation_id") != record.generation_id:
                continue
            kind = event.get("type")
            if kind == "delta":
                pieces.append(event["text"])
                length += len(event["text"])
            elif kind == "tool_call":
                calls[event["call_id"]] = (event["name"], event.get("input"), length)
            elif kind == "tool_result" and event["call_id"] in calls:
                name, value, offset = calls[event["call_id"]]
                finished.append(
                    ToolUse(
                        event["call_id"], name, value, event["output"], event["is_error"], offset
                    )
                )
        return Partial("".join(pieces), len(pieces), tuple(finished))

    async def close_orphan(
        self, thread: ThreadId, lease: Lease, record: TurnRecord
    ) -> Ended | None:
        """Close a turn whose pod died: its published text and finished tool
        calls become an ``interrupted`` assistant message, then ``done``.
        ``lease`` is a fresh grant of the thread's lock, so the dead turn can
        never write again. The tokens it used died with its pod: ``done``
        says 0. The caller settles the usage outbox, then drops the thread
        from the turn index."""
        partial = await self.partial(thread, record)
        assistant = Message(
            id="", role="assistant", content=partial.text, user_id="assistant",
            created_at=int(time.time() * 1000), status="interrupted",
            tool_calls=partial.tool_calls, usage=UNKNOWN_USAGE,
        )  # fmt: skip
        done = Done(
            thread_id=thread, generation_id=record.generation_id, status="interrupted",
            usage=UNKNOWN_USAGE,
        )  # fmt: skip
        return await self.end(thread, lease, assistant, done)

    async def index_add(self, thread: ThreadId) -> None:
        await self._redis.zadd(keys.TURN_INDEX, {thread: int(time.time() * 1000)})

    async def index_remove(self, thread: ThreadId, queued: bool | None = None) -> None:
        """Drop the thread from the reaper's index, unless prompts wait in its
        queue (``queued``, read here when not known): the reaper also starts
        those when no pod does (a drained or dead pod's thread)."""
        if queued is None:
            queued = bool(await self._redis.xlen(keys.queue(thread)))
        if not queued:
            await self._redis.zrem(keys.TURN_INDEX, thread)

    async def index_threads(self, limit: int = 1000) -> list[ThreadId]:
        """Threads that may have a running turn, oldest first."""
        members = texts(await self._redis.zrange(keys.TURN_INDEX, 0, limit - 1))
        threads = []
        for member in members:
            try:
                threads.append(keys.thread_id(member))
            except keys.InvalidId:
                await self._redis.zrem(keys.TURN_INDEX, member)  # not ours: drop it
        return threads


def turn_record(reply: object) -> TurnRecord | None:
    """A thread's running turn from its record's HGETALL (None when idle);
    a connect reads it in its pipeline (app.chat.service)."""
    fields = hash_of(reply)
    if not fields.get("generation_id"):
        return None
    return TurnRecord(
        generation_id=fields["generation_id"],
        fence=int(fields.get("fence", 0)),
        pod=fields.get("pod", ""),
        start_id=fields.get("start_id", "0-0"),
        user_message_id=fields.get("user_message_id", ""),
        cancel_requested=bool(fields.get("cancel")),
        user_id=fields.get("user_id", ""),
    )
