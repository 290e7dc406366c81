"""What the provider tests share (test_llm_anthropic, test_llm_openai): the
mock transport's responses, history messages, draining one model call, and
the check that an API key never leaks into an error."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence

import httpx2

from app.chat.records import Message, Role
from app.llm.base import ChatModel, LLMError, ToolCall, ToolSpec, Usage

Handler = Callable[[httpx2.Request], httpx2.Response]


def event_stream(content: bytes | AsyncIterator[bytes]) -> httpx2.Response:
    return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=content)


def dropped_after(prefix: bytes, exc: Exception) -> Handler:
    """A handler whose body sends ``prefix`` then fails like a dropped connection."""

    async def body() -> AsyncIterator[bytes]:
        yield prefix
        raise exc

    return lambda request: event_stream(body())


def msg(role: Role, content: str, n: int = 0) -> Message:
    return Message(
        id=f"{1000 + n}-0", role=role, content=content, user_id="u1", created_at=1000 + n,
        status="complete",
    )  # fmt: skip


HELLO = [msg("user", "hi there")]


async def collect(
    model: ChatModel, messages: Sequence[Message] = HELLO, tools: Sequence[ToolSpec] = ()
) -> tuple[list[str | ToolCall], Usage, LLMError | None]:
    """What streamed before the end or the failure, the usage, the error."""
    items: list[str | ToolCall] = []
    usage = Usage()
    try:
        async for item in model.stream(messages, usage, tools):
            items.append(item)
    except LLMError as exc:
        return items, usage, exc
    return items, usage, None


def assert_key_hidden(err: LLMError, key: str) -> None:
    assert key not in err.message
    assert key not in str(err)
    assert key not in repr(err.args)
