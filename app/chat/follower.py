"""One socket's subscription to a thread: a bounded queue fed by the pod's
fan-out hub, and the rule that keeps what the socket sends in order.

The rule: a timeline event is sent only if its id is greater than the last
one sent. Catch-up from the log (on connect or ``resume``) and live events
from the hub may overlap; this one comparison, made at send time, drops the
overlap, so the client sees each event once, in order. The hub and the
catch-up read make sure nothing is missing.
"""

from __future__ import annotations

import asyncio
from typing import Any

from app.chat.keys import ThreadId
from app.chat.timeline import TimelineEvent

TOO_SLOW = "too slow: resume with after"
THREAD_RESET = "thread data was reset: resume to learn the new epoch"
# A deleted thread or a removed member: reconnecting is then refused (1008).
THREAD_DELETED = "thread deleted"
ACCESS_REVOKED = "removed from the thread"


class Follower:
    """A hub sink with a bounded queue.

    When the socket must be closed so that its client resumes (it was too slow
    to drain the queue, or the thread's data was reset under it), ``closing``
    holds the reason and ``must_close`` is set: the socket's session watches
    it, since its writer may be stuck in a send to a client that stopped reading.
    """

    def __init__(self, thread: ThreadId, max_queue: int, user: str | None = None) -> None:
        self.thread = thread
        self.user = user
        self.queue: asyncio.Queue[TimelineEvent] = asyncio.Queue(maxsize=max_queue)
        self.closing: str | None = None
        self.must_close = asyncio.Event()
        self.sent: tuple[int, int] | None = None

    def deliver(self, event: TimelineEvent) -> None:
        if self.closing is not None:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            # Never block the hub (it feeds every socket of the pod): drop
            # this socket instead; it resumes from its last id elsewhere.
            self.close_for(TOO_SLOW)

    def control(self, message: dict[str, Any]) -> None:
        """A thread reset, its deletion, or its user's removal (from the hub)
        closes the socket; cancels are for turns."""
        kind = message.get("control")
        if kind == "reset":
            self.close_for(THREAD_RESET)
        elif kind == "deleted":
            self.close_for(THREAD_DELETED)
        elif kind == "revoke" and message.get("user_id") == self.user:
            self.close_for(ACCESS_REVOKED)

    def close_for(self, reason: str) -> None:
        if self.closing is None:
            self.closing = reason
            self.must_close.set()

    def claim(self, event: TimelineEvent) -> bool:
        """Whether ``event`` is next to send (and record it as sent)."""
        if self.sent is not None and event.key <= self.sent:
            return False
        self.sent = event.key
        return True

    def restart_from(self, key: tuple[int, int] | None) -> None:
        """Start over after ``key`` (a ``resume``): queued events are re-filtered."""
        self.sent = key
