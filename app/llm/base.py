"""The one small interface every model provider implements, and what flows through it.

A provider streams one model call: text pieces, then the tools the model asks
for (``ToolCall``), while it fills a ``Usage``. The turn runner owns the loop
around it (run the tools, call again with their results).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

from app.chat.records import Message


class LLMError(Exception):
    """The model failed; ``message`` is safe to show to the user."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool the model may call: its name, what it does, its input's JSON Schema."""

    name: str
    description: str
    input_schema: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """The model asks to run a tool. ``arguments`` is the JSON text exactly as
    the model sent it: it may not parse, and the runner says so to the model."""

    call_id: str
    name: str
    arguments: str


@dataclass(slots=True)
class Usage:
    """Token counts of one model call (or, summed, of a turn).

    ``input_tokens`` counts every input token the model read, cached or not,
    so budgets compare alike across providers; ``cache_read_tokens`` and
    ``cache_write_tokens`` say how many of them came from or went into the
    provider's prompt cache. ``model`` is the model that answered (the
    fallback, when the primary was overloaded).
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    model: str = ""

    def add(self, other: Usage) -> None:
        """Add another call's counts (the model of the latest call wins)."""
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_read_tokens += other.cache_read_tokens
        self.cache_write_tokens += other.cache_write_tokens
        self.model = other.model or self.model

    @property
    def total(self) -> int:
        """What a turn costs against a budget: tokens read plus tokens written."""
        return self.input_tokens + self.output_tokens

    def wire(self) -> dict[str, int]:
        """``done.usage``: input and output always, cache counts when there were any."""
        counts = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        return {k: v for k, v in counts.items() if v or not k.startswith("cache_")}


class ChatModel(Protocol):
    """Streams one reply (text pieces, then tool calls) to a conversation."""

    @property
    def name(self) -> str:
        """The model id reported in ``loading`` events."""
        ...

    @property
    def provider(self) -> str:
        """The provider's name (``anthropic``, ``openai``, ``fake``): a metrics label."""
        ...

    def stream(
        self, messages: Sequence[Message], usage: Usage, tools: Sequence[ToolSpec] = ()
    ) -> AsyncIterator[str | ToolCall]:
        """Yield the reply's text pieces in order, then the tool calls the
        model asks for, if any; fill ``usage`` as the provider reports it
        (also when the stream is cut short). Raise ``LLMError`` on failure."""
        ...

    async def aclose(self) -> None:
        """Release the provider's connections."""
        ...


MAX_DETAIL_CHARS = 200


def clip(detail: str) -> str:
    """A provider's own explanation, short enough for an ``error`` event."""
    detail = detail.strip()
    if len(detail) > MAX_DETAIL_CHARS:
        detail = detail[: MAX_DETAIL_CHARS - 1] + "…"
    return detail
