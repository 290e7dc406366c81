"""The Anthropic provider: streams a reply from the Messages API.

This module owns everything specific to Anthropic: a thread's history as a
``messages`` list with prompt-cache breakpoints, streaming the reply's text
and tool calls, reading token usage (cache reads and writes included), what
"overloaded" is (the fallback model is asked then), and what each SDK or
transport failure means for a user (app.llm.sdk does the rest, shared with
the OpenAI provider).

The SDK (``anthropic``) is built on ``httpx2``: HTTP errors surface as
``anthropic.APIError`` when the stream is opened, but a connection that drops
mid-reply raises raw ``httpx2`` errors, and a body that simply stops early is
not reported by the SDK at all; both are turned into ``LLMError`` here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import anthropic
import httpx2
from anthropic.types import (
    AssistantMessageParam,
    CacheControlEphemeralParam,
    MessageParam,
    RawMessageStreamEvent,
    TextBlockParam,
    UserMessageParam,
)

from app.chat.records import Message
from app.llm.base import LLMError, ToolCall, ToolSpec, Usage, clip
from app.llm.context import turns
from app.llm.sdk import SdkModel
from app.settings import Settings

log = logging.getLogger(__name__)

# ``error.type`` values (SSE ``error`` events carry no HTTP status of their own)
# that describe a transient condition on Anthropic's side.
_RETRYABLE_ERROR_TYPES = frozenset(
    {"rate_limit_error", "overloaded_error", "api_error", "timeout_error"}
)
_CACHE: CacheControlEphemeralParam = {"type": "ephemeral"}


class AnthropicModel(SdkModel):
    """``ChatModel`` backed by Anthropic's streaming Messages API."""

    provider = "anthropic"
    failures = (anthropic.AnthropicError, httpx2.HTTPError, httpx2.StreamError)

    def __init__(
        self,
        settings: Settings,
        http_client: httpx2.AsyncClient | None = None,
        max_retries: int | None = None,
    ) -> None:
        super().__init__(settings, settings.anthropic_api_key)
        self._client = anthropic.AsyncAnthropic(
            api_key=settings.anthropic_api_key, **self._client_options(http_client, max_retries)
        )

    def _params(self, messages: Sequence[Message]) -> list[MessageParam]:
        params = to_anthropic_messages(messages)
        if not params:
            raise LLMError("There is no user message to reply to.", retryable=False)
        return params

    def _overloaded(self, exc: BaseException) -> bool:
        return isinstance(exc, anthropic.APIStatusError) and (
            exc.status_code == 529 or exc.type == "overloaded_error"
        )

    def _describe(self, exc: BaseException) -> tuple[str, bool, int | None, str | None]:
        message, retryable = describe_error(exc)
        if isinstance(exc, anthropic.APIStatusError):
            return message, retryable, exc.status_code, exc.request_id
        return message, retryable, None, None

    async def _create(
        self, model: str, params: list[MessageParam], tools: Sequence[ToolSpec]
    ) -> anthropic.AsyncStream[RawMessageStreamEvent]:
        # Prompt caching: a breakpoint on the system prompt (shared by every
        # thread, with the tools before it) and one on the conversation's
        # last block. The next turn's request starts with this one's, so it
        # reads the whole earlier conversation from the cache (0.1x price)
        # and only the new messages are processed afresh.
        system: list[TextBlockParam] = [
            {"type": "text", "text": self._settings.chat_system_prompt, "cache_control": _CACHE}
        ]
        extra: dict[str, Any] = {}
        if tools:
            extra["tools"] = [
                {"name": t.name, "description": t.description, "input_schema": dict(t.input_schema)}
                for t in tools
            ]
        events: anthropic.AsyncStream[RawMessageStreamEvent] = await self._client.messages.create(
            model=model,
            max_tokens=self._settings.chat_max_tokens,
            system=system,
            messages=_with_cache_breakpoint(params),
            stream=True,
            **extra,
        )
        return events

    async def _read(
        self, events: anthropic.AsyncStream[RawMessageStreamEvent], usage: Usage
    ) -> AsyncIterator[str | ToolCall]:
        """Text as it streams; tool calls at the end, their input JSON kept as
        sent (a malformed one is the runner's to report)."""
        calls: dict[int, list[str]] = {}  # block index -> [id, name, input json]
        finished = False
        async with events:
            # Only ``message_stop`` tells a complete reply from a body that
            # stopped early, which the SDK ends quietly.
            async for event in events:
                if event.type == "message_start":
                    start = event.message.usage
                    read = start.cache_read_input_tokens or 0
                    written = start.cache_creation_input_tokens or 0
                    usage.input_tokens = start.input_tokens + read + written
                    usage.cache_read_tokens = read
                    usage.cache_write_tokens = written
                    usage.output_tokens = start.output_tokens
                elif event.type == "content_block_start":
                    block = event.content_block
                    if block.type == "tool_use":
                        calls[event.index] = [block.id, block.name, ""]
                elif event.type == "content_block_delta":
                    delta = event.delta
                    if delta.type == "text_delta" and delta.text:
                        yield delta.text
                    elif delta.type == "input_json_delta" and event.index in calls:
                        calls[event.index][2] += delta.partial_json
                elif event.type == "message_delta":
                    usage.output_tokens = event.usage.output_tokens
                elif event.type == "message_stop":
                    finished = True
        if not finished:
            log.warning("anthropic stream ended before message_stop")
            raise LLMError("The model's reply was cut off; try again.", retryable=True)
        for _index, (call_id, name, arguments) in sorted(calls.items()):
            yield ToolCall(call_id, name, arguments or "{}")

    async def aclose(self) -> None:
        await self._client.close()


def to_anthropic_messages(messages: Sequence[Message]) -> list[MessageParam]:
    """The history (oldest first) as the API wants it: the turns every
    provider gets (app.llm.context.turns), tool rounds as ``tool_use`` and
    ``tool_result`` blocks."""
    out: list[MessageParam] = []
    for turn in turns(messages):
        text: list[Any] = [{"type": "text", "text": turn.text}] if turn.text.strip() else []
        if turn.role == "user":
            if not turn.results:
                out.append(UserMessageParam(role="user", content=turn.text))
                continue
            results: list[Any] = [
                {"type": "tool_result", "tool_use_id": use.call_id, "content": use.output,
                 "is_error": use.is_error}
                for use in turn.results
            ]  # fmt: skip
            out.append(UserMessageParam(role="user", content=results + text))
        elif not turn.calls:
            out.append(AssistantMessageParam(role="assistant", content=turn.text))
        else:
            uses: list[Any] = [
                {"type": "tool_use", "id": use.call_id, "name": use.name,
                 "input": use.input if isinstance(use.input, dict) else {}}
                for use in turn.calls
            ]  # fmt: skip
            out.append(AssistantMessageParam(role="assistant", content=text + uses))
    return out


def _with_cache_breakpoint(params: list[MessageParam]) -> list[MessageParam]:
    """``params`` with ``cache_control`` on the last block of the last message."""
    *head, last = params
    content = last["content"]
    blocks: list[Any] = (
        [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
    )
    blocks[-1] = {**blocks[-1], "cache_control": _CACHE}
    return [*head, cast(MessageParam, {"role": last["role"], "content": blocks})]


def describe_error(exc: BaseException) -> tuple[str, bool]:
    """(message for the user, retryable) for an SDK or ``httpx2`` failure.

    The message is built from the status and the API's own short explanation,
    never from the request (whose headers carry the key).
    """
    if isinstance(exc, anthropic.APIStatusError):
        return _describe_status(exc)
    if isinstance(exc, anthropic.APITimeoutError | httpx2.TimeoutException):
        return "The model service timed out; try again.", True
    if isinstance(exc, anthropic.APIConnectionError):
        return "Could not reach the model service; try again.", True
    if isinstance(exc, httpx2.HTTPError | httpx2.StreamError):
        return "The connection to the model service was lost mid-reply; try again.", True
    if isinstance(exc, anthropic.APIResponseValidationError):
        return "The model service sent a response that could not be read.", True
    return "The model request failed.", False


def _describe_status(exc: anthropic.APIStatusError) -> tuple[str, bool]:
    status = exc.status_code
    kind = exc.type
    if status == 429 or kind == "rate_limit_error":
        return "The model is rate limited; try again shortly.", True
    if status == 529 or kind == "overloaded_error":
        return "The model is overloaded; try again shortly.", True
    if status in (401, 403) or kind in ("authentication_error", "permission_error"):
        return "The model service refused the configured credentials.", False
    # An SSE ``error`` event arrives on a 200 response: only its type tells.
    retryable = status == 408 or status >= 500 or kind in _RETRYABLE_ERROR_TYPES
    detail = clip(exc.api_message or "")
    label = f"HTTP {status}" if status >= 400 else (kind or "stream error")
    text = f"The model service returned an error ({label})"
    return (f"{text}: {detail}" if detail else f"{text}.", retryable)
