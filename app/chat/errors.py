"""The domain's errors: each names the protocol error code it becomes at the edge."""

from __future__ import annotations


class ChatError(Exception):
    """Base of every error the chat domain raises on purpose."""

    code = "internal"
    retryable = False


class ThreadBusy(ChatError):
    """A turn is already running on this thread (on some pod)."""

    code = "thread_busy"
    retryable = True


class Forbidden(ChatError):
    """The user may not read or write this thread."""

    code = "forbidden"


class NotFound(ChatError):
    """The thread or message does not exist."""

    code = "not_found"


class LockLost(ChatError):
    """This turn's fencing number is stale: a newer grant owns the thread.

    Raised by every fenced write after the lease expired and someone else
    (another turn or the reaper) took the thread over; the turn must stop
    without writing anything more.
    """


class Draining(ChatError):
    """This pod is shutting down and starts no new turns."""

    code = "unavailable"
    retryable = True
