"""The chat domain's records: committed messages and the events of a turn.

They are plain domain types: how they are stored is the stores' business
(app.chat.history for messages, app.chat.timeline for the events stored and
published once), how a client sees them app.protocol's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Role = Literal["user", "assistant"]
PromptPolicy = Literal["reject", "queue", "interrupt"]
MessageStatus = Literal["complete", "cancelled", "interrupted", "error"]


@dataclass(frozen=True, slots=True)
class ToolUse:
    """A tool the model called during a reply, and what it answered.

    ``input`` is the JSON value the model sent (its raw text when that did not
    parse); ``offset`` is how much of the reply's ``content`` had been written
    when the model asked, so the reply can be given back to the model as the
    rounds it was (text, calls, results, more text).
    """

    call_id: str
    name: str
    input: Any
    output: str
    is_error: bool
    offset: int


@dataclass(frozen=True, slots=True)
class Message:
    """A committed message of a thread's history (``id`` is its history entry
    id, empty until the commit script writes it). ``parent_id`` is the message
    it follows (None for a root); ``siblings``, in history pages only, the ids
    of the messages sharing its parent, oldest first, itself included;
    ``queue_id`` the queued prompt it was. An assistant message keeps the
    tools it called and the tokens its turn used."""

    id: str
    role: Role
    content: str
    user_id: str
    created_at: int
    status: MessageStatus
    client_msg_id: str | None = None
    parent_id: str | None = None
    siblings: tuple[str, ...] | None = None
    tool_calls: tuple[ToolUse, ...] = ()
    usage: Mapping[str, int] | None = None
    queue_id: str | None = None


@dataclass(frozen=True, slots=True)
class Loading:
    """A turn began: ``model`` is generating the reply ``generation_id``."""

    thread_id: str
    generation_id: str
    model: str


@dataclass(frozen=True, slots=True)
class Delta:
    """The next piece (number ``seq``) of a reply's text."""

    thread_id: str
    generation_id: str
    seq: int
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallEvent:
    """The model asked for tool ``name`` (a timeline event, before it runs)."""

    thread_id: str
    generation_id: str
    call_id: str
    name: str
    input: Any


@dataclass(frozen=True, slots=True)
class ToolResultEvent:
    """What the tool of ``call_id`` answered (a timeline event)."""

    thread_id: str
    generation_id: str
    call_id: str
    output: str
    is_error: bool


@dataclass(frozen=True, slots=True)
class TurnError:
    """Why a turn ended ``error`` (the model failed), safe to show a user."""

    message: str
    retryable: bool
    code: Literal["llm_error"] = "llm_error"


@dataclass(frozen=True, slots=True)
class Done:
    """A turn ended with ``status``; its message id is given by the commit
    script that stores it (see app.chat.scripts)."""

    thread_id: str
    generation_id: str
    status: MessageStatus
    usage: dict[str, int] | None = None
    error: TurnError | None = None


@dataclass(frozen=True, slots=True)
class Queued:
    """A prompt waiting in a thread's queue for the running turn to end."""

    queue_id: str
    user_id: str
    content: str
    client_msg_id: str | None = None


@dataclass(frozen=True, slots=True)
class Joined:
    """Where a thread stands for a socket that just joined it (its ``ready``)."""

    thread_id: str
    epoch: str
    last_event_id: str | None
    generating: bool
    generation_id: str | None
    leaf_id: str | None = None
    queue: tuple[Queued, ...] = ()
    recovered: bool | None = None


@dataclass(frozen=True, slots=True)
class LastMessage:
    """The newest message of a thread's active branch, as an inbox shows it."""

    id: str
    role: str
    user_id: str
    preview: str
    created_at: int


@dataclass(frozen=True, slots=True)
class ThreadCard:
    """A thread as one member's inbox shows it. ``rev`` orders the cards of
    one thread (a later change has a larger one); times are ms."""

    id: str
    title: str
    owner: str
    role: str
    prompt_policy: str
    generating: bool
    unread: int
    updated_at: int
    active_at: int
    last_message: LastMessage | None
    rev: int
    # The tokens every turn of the thread used.
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ThreadGone:
    """A thread left a member's inbox: ``deleted``, ``revoked`` or ``left``."""

    thread_id: str
    reason: str
