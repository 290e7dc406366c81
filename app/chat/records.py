"""The chat domain's records: committed messages and the events of a turn.

They are plain domain types: how they are stored is the stores' business
(app.chat.history for messages, app.chat.timeline for the events stored and
published once), how a client sees them app.protocol's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["user", "assistant"]
MessageStatus = Literal["complete", "cancelled", "interrupted", "error"]


@dataclass(frozen=True, slots=True)
class Message:
    """A committed message of a thread's history (``id`` is its history entry
    id, empty until the commit script writes it). ``parent_id`` is the message
    it follows (None for a root); ``siblings``, in history pages only, the ids
    of the messages sharing its parent, oldest first, itself included."""

    id: str
    role: Role
    content: str
    user_id: str
    created_at: int
    status: MessageStatus
    client_msg_id: str | None = None
    parent_id: str | None = None
    siblings: tuple[str, ...] | None = None


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
class Done:
    """A turn ended with ``status``; its message id is given by the commit
    script that stores it (see app.chat.scripts)."""

    thread_id: str
    generation_id: str
    status: MessageStatus
    usage: dict[str, int] | None = None


@dataclass(frozen=True, slots=True)
class Joined:
    """Where a thread stands for a socket that just joined it (its ``ready``)."""

    thread_id: str
    epoch: str
    last_event_id: str | None
    generating: bool
    generation_id: str | None
    leaf_id: str | None = None
    recovered: bool | None = None
