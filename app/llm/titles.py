"""Thread titles from a model, through the provider interface (app.llm.base).

A title is one short model call: the thread's first prompt and an
instruction to name it, streamed like any reply and cut at a few words. A
provider that can do better (the fake model's deterministic title, a
cheaper model) implements ``Titler`` and is asked directly.
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

from app.chat.records import Message
from app.llm.base import ChatModel, ToolCall, Usage

MAX_WORDS = 6
MAX_CHARS = 80
INSTRUCTION = (
    "Name this conversation in at most six words. Answer with the title only, "
    "no quotes, no final period. The conversation starts with:\n\n"
)


@runtime_checkable
class Titler(Protocol):
    """A provider with its own way to title a thread."""

    async def title(self, first_prompt: str) -> str: ...


async def make_title(model: ChatModel, first_prompt: str) -> str:
    """A short title for a thread that starts with ``first_prompt`` ('' when
    the model gave none). Raises LLMError as the model does."""
    if isinstance(model, Titler):
        return clean(await model.title(first_prompt))
    ask = Message(
        id="", role="user", content=INSTRUCTION + first_prompt[:2000], user_id="titler",
        created_at=int(time.time() * 1000), status="complete",
    )  # fmt: skip
    pieces: list[str] = []
    async for piece in model.stream([ask], Usage()):
        if isinstance(piece, ToolCall):
            break
        pieces.append(piece)
        if sum(map(len, pieces)) > MAX_CHARS * 2:
            break
    return clean("".join(pieces))


def clean(raw: str) -> str:
    """At most MAX_WORDS words on one line, MAX_CHARS characters, no quotes."""
    words = raw.strip().strip("\"'“”").split()[:MAX_WORDS]
    title = " ".join(words)[:MAX_CHARS].rstrip(".")
    return "".join(ch for ch in title if ch.isprintable())
