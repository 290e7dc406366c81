"""The chat domain's records: committed messages and the events of a turn.

They are plain domain types; what a client sees of them is the wire format
(app.protocol for frames sent one by one, app.chat.timeline for the events
stored and published once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

Role = Literal["user", "assistant"]
MessageStatus = Literal["complete", "cancelled", "interrupted", "error"]


class Message(BaseModel):
    """A committed message of a thread's history."""

    id: str
    role: Role
    content: str
    user_id: str
    created_at: int
    status: MessageStatus
    client_msg_id: str | None = None

    @classmethod
    def from_history_entry(cls, entry_id: str, fields: dict[str, str]) -> Message:
        return cls(
            id=entry_id,
            role=fields["role"],
            content=fields.get("content", ""),
            user_id=fields.get("user_id", ""),
            created_at=int(fields.get("created_at", entry_id.split("-")[0])),
            status=fields.get("status", "complete"),
            client_msg_id=fields.get("client_msg_id") or None,
        )

    def history_fields(self) -> list[str]:
        """The history stream entry, as flat (name, value) pairs for XADD."""
        pairs = [
            "role", self.role,
            "content", self.content,
            "user_id", self.user_id,
            "status", self.status,
            "created_at", str(self.created_at),
        ]  # fmt: skip
        if self.client_msg_id:
            pairs += ["client_msg_id", self.client_msg_id]
        return pairs


class Loading(BaseModel):
    type: Literal["loading"] = "loading"
    thread_id: str
    generation_id: str
    model: str


class Delta(BaseModel):
    type: Literal["delta"] = "delta"
    thread_id: str
    generation_id: str
    seq: int
    text: str


class Done(BaseModel):
    """``message_id`` is filled in by the commit script (see app.chat.scripts)."""

    type: Literal["done"] = "done"
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
    recovered: bool | None = None
