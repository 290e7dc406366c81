"""The domain's errors: each names the protocol error code it becomes at the edge.

``DomainCode`` is every code a domain error may carry; app.protocol's error
codes are built from it, so an error whose code the protocol cannot carry
does not type-check.
"""

from __future__ import annotations

from typing import ClassVar, Literal

DomainCode = Literal[
    "bad_request",
    "thread_busy",
    "rate_limited",
    "budget_exceeded",
    "forbidden",
    "not_found",
    "queue_full",
    "conflict",
    "unavailable",
    "internal",
]


class ChatError(Exception):
    """Base of every error the chat domain raises on purpose."""

    code: ClassVar[DomainCode] = "internal"
    retryable = False
    # When the caller may usefully try again, if the domain knows (rate limits).
    retry_after_ms: int | None = None


class ThreadBusy(ChatError):
    """A turn is already running on this thread (on some pod)."""

    code = "thread_busy"
    retryable = True


class QueueFull(ChatError):
    """CHAT_MAX_QUEUED prompts already wait for this thread's running turn."""

    code = "queue_full"
    retryable = True


class Forbidden(ChatError):
    """The user may not read or write this thread."""

    code = "forbidden"


class NotFound(ChatError):
    """The thread or message does not exist."""

    code = "not_found"


class Conflict(ChatError):
    """The thing to create exists already (a thread id in use, or deleted recently)."""

    code = "conflict"


class InvalidRequest(ChatError):
    """A request the domain refuses as malformed (a bad cursor, a bad title)."""

    code = "bad_request"


class RateLimited(ChatError):
    """Too many prompts, sockets or threads for this user (or sockets for
    this pod). ``retry_after_ms`` says when trying again can succeed; a quota
    that only the user can free (threads) is not retryable."""

    code = "rate_limited"
    retryable = True

    def __init__(
        self, message: str, retry_after_ms: int | None = None, retryable: bool = True
    ) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms
        self.retryable = retryable


class BudgetExceeded(ChatError):
    """The user spent CHAT_USER_TOKENS_PER_DAY today (or their turns still
    running may spend what is left); ``retry_after_ms`` says when to retry."""

    code = "budget_exceeded"
    retryable = True

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class PodFull(RateLimited):
    """This pod holds CHAT_MAX_SOCKETS_PER_POD sockets; another pod may not."""


class LockLost(ChatError):
    """This turn's fencing number is stale: a newer grant owns the thread.

    Raised by every fenced write after the lease expired and someone else
    (another turn or the reaper) took the thread over; the turn must stop
    without writing anything more.
    """


class ClientGone(ChatError):
    """The socket's client left while its join waited its turn: the join is
    not run (in a reconnect storm, a client that timed out and retried would
    otherwise cost its pod two joins, the first for nobody)."""

    code = "unavailable"
    retryable = True


class Draining(ChatError):
    """This pod is shutting down and starts no new turns."""

    code = "unavailable"
    retryable = True


class StillRunning(ChatError):
    """A turn that must end first did not end in time (erasing a user waits
    for theirs); the caller may retry."""

    code = "unavailable"
    retryable = True
