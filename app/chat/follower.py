"""One socket's subscription to a thread: a bounded queue fed by the pod's
fan-out hub, and the rule that keeps what the socket sends in order.

A pod holds thousands of mostly idle followers, so an idle one holds no
buffer and no task: its queue exists only while events wait in it, and the
futures it is awaited through only while someone awaits them.

An edge may take over the writing (``on_ready``): then a queue that was empty
and gets an event calls it instead of waking the socket's writer, and the
edge drains the queue itself (``take``), waking the writer (``wake``) for
what it cannot write (app.ws: one frame written for every socket of a pod).

The rule: a timeline event is sent only if its id is greater than the last
one sent. Catch-up from the log (on connect or ``resume``) and live events
from the hub may overlap; this one comparison, made at send time, drops the
overlap, so the client sees each event once, in order. The hub and the
catch-up read make sure nothing is missing.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from app.chat import keys
from app.chat.keys import ThreadId
from app.chat.timeline import TimelineEvent, ephemeral

TOO_SLOW = "too slow: resume with after"
THREAD_RESET = "thread data was reset: resume to learn the new epoch"
SERVER_DEAF = "this server cannot hear Redis: resume on another"
# A deleted thread, a removed member or an erased user: reconnecting is then
# refused (1008).
THREAD_DELETED = "thread deleted"
ACCESS_REVOKED = "removed from the thread"
USER_ERASED = "user data erased"


class Follower:
    """A hub sink with a bounded queue.

    When the socket must be closed so that its client resumes (it was too slow
    to drain the queue, or the thread's data was reset under it), ``closing``
    holds the reason and ``must_close`` is resolved: the socket's session
    waits on it, since its writer may be stuck in a send to a client that
    stopped reading.
    """

    __slots__ = (
        "_closed", "_head", "_queued", "_wakeup", "closing", "max_queue", "on_ready", "sent",
        "thread", "user",
    )  # fmt: skip

    def __init__(self, thread: ThreadId, max_queue: int, user: str | None = None) -> None:
        self.thread = thread
        self.user = user
        self.max_queue = max_queue
        self.closing: str | None = None
        self.sent: tuple[int, int] | None = None
        # The next event to send, and those after it. Not an asyncio.Queue:
        # that is four deques (~3 KiB) even when empty. One event waiting,
        # the usual case, holds no deque: a big room's frame is handed to ten
        # thousand followers at once, and a deque each was ten thousand
        # objects a frame for the young garbage collections to scan.
        self._head: TimelineEvent | None = None
        self._queued: deque[TimelineEvent] | None = None
        self._wakeup: asyncio.Future[None] | None = None  # while next_event() waits
        self._closed: asyncio.Future[None] | None = None  # once must_close is asked for
        # Called (instead of waking the writer) when the empty queue gets an event.
        self.on_ready: Callable[[], None] | None = None

    @property
    def queued(self) -> int:
        """How many events wait to be sent."""
        if self._head is None:
            return 0
        return 1 + (len(self._queued) if self._queued is not None else 0)

    @property
    def must_close(self) -> asyncio.Future[None]:
        """Resolved once the socket must be closed (see ``closing``); a plain
        future, to be awaited with others in ``asyncio.wait`` (no task)."""
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_future()
            if self.closing is not None:
                self._closed.set_result(None)
        return self._closed

    async def next_event(self) -> TimelineEvent:
        """The next queued event, waiting for one if there is none."""
        while self._head is None:
            self._wakeup = asyncio.get_running_loop().create_future()
            try:
                await self._wakeup
            finally:
                self._wakeup = None
        event = self.take()
        assert event is not None
        return event

    def take(self) -> TimelineEvent | None:
        """The next queued event, or None when none waits (no waiting)."""
        event, queued = self._head, self._queued
        if queued is None:
            self._head = None
            return event
        self._head = queued.popleft()
        if not queued:
            self._queued = None  # drained: give the buffer back while idle
        return event

    def put_back(self, event: TimelineEvent) -> None:
        """Return a ``take``n event to the head of the queue (not sent after all)."""
        if self._head is not None:
            if self._queued is None:
                self._queued = deque()
            self._queued.appendleft(self._head)
        self._head = event

    def wake(self) -> None:
        """Wake the writer waiting in ``next_event`` (if it waits)."""
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def deliver(self, event: TimelineEvent) -> None:
        if self.closing is not None:
            return
        if self._head is None:
            self._head = event
            if self.on_ready is not None:
                self.on_ready()
            else:
                self.wake()
            return
        if self.queued >= self.max_queue:
            # Never block the hub (it feeds every socket of the pod): drop
            # this socket instead; it resumes from its last id elsewhere.
            self.close_for(TOO_SLOW)
            return
        if self._queued is None:
            self._queued = deque()
        self._queued.append(event)
        if self.on_ready is None:
            self.wake()

    def control(self, message: dict[str, Any]) -> None:
        """A thread reset, its deletion, its user's removal or erasure, or a
        pod that cannot hear Redis (all from the hub) closes the socket;
        cancels are for turns."""
        kind = message.get("control")
        if kind == "reset":
            self.close_for(THREAD_RESET)
        elif kind == "move":
            self.close_for(SERVER_DEAF)
        elif kind == "deleted":
            self.close_for(THREAD_DELETED)
        elif kind == "revoke" and message.get("user_id") == self.user:
            self.close_for(ACCESS_REVOKED)
        elif kind == "erased" and self._digest() in message["user_digests"]:
            self.close_for(USER_ERASED)
        elif kind == "typing" and message.get("user_id") != self.user:
            typing = {"type": "typing", "thread_id": self.thread, "user_id": message.get("user_id")}
            self.deliver(ephemeral(orjson.dumps(typing).decode()))

    def _digest(self) -> str | None:
        """The user's erasure digest (keys.ERASURES), worked out only when an
        erasure is announced (rare): never for most sockets."""
        return None if self.user is None else keys.erasure_digest(self.user)

    def close_for(self, reason: str) -> None:
        if self.closing is None:
            self.closing = reason
            if self._closed is not None and not self._closed.done():
                self._closed.set_result(None)

    def claim(self, event: TimelineEvent) -> bool:
        """Whether ``event`` is next to send (and record it as sent)."""
        if event.n < 0:  # presence and typing: outside the timeline's order
            return True
        if self.sent is not None and event.key <= self.sent:
            return False
        self.sent = event.key
        return True

    def restart_from(self, key: tuple[int, int] | None) -> None:
        """Start over after ``key`` (a ``resume``): queued events are re-filtered."""
        self.sent = key


class InboxFollower(Follower):
    """A user socket's inbox: the raw thread cards published on the user's
    channel, through the same bounded queue (a slow socket is closed, as a
    thread socket is). An empty frame asks for a fresh snapshot: the pod's
    subscriber was lost, and cards may have been with it."""

    __slots__ = ()

    def notice(self, raw: str) -> None:
        self.deliver(ephemeral(raw))

    def resync(self) -> None:
        self.deliver(ephemeral(""))
