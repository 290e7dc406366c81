"""The one small interface every model provider implements."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from app.chat.records import Message


class LLMError(Exception):
    """The model failed; ``message`` is safe to show to the user."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


class ChatModel(Protocol):
    """Streams a reply to a conversation as text pieces."""

    @property
    def name(self) -> str:
        """The model id reported in ``loading`` events."""
        ...

    def stream(self, messages: Sequence[Message], usage: dict[str, int]) -> AsyncIterator[str]:
        """Yield the reply's text pieces in order; fill ``usage`` (token counts)
        when the provider reports them. Raise ``LLMError`` on failure."""
        ...

    async def aclose(self) -> None:
        """Release the provider's connections."""
        ...
