"""The OpenAI-compatible provider: streams a reply from Chat Completions.

Works against OpenAI itself and any server that speaks its API (vLLM,
Ollama, llama.cpp, LiteLLM) through ``OPENAI_BASE_URL``. This module owns
everything specific to that API: the system prompt as the first message,
tool schemas as ``function`` tools, tool calls assembled from their streamed
fragments, usage from the final chunk (``stream_options.include_usage``),
and what each SDK failure means for a user (app.llm.sdk does the rest).

The SDK (``openai`` 3.x) is built on ``httpx2`` like anthropic's: HTTP errors
surface when the request is made, and a connection that drops mid-reply is
wrapped as ``APIConnectionError``/``APITimeoutError`` by the stream itself.
A body that ends without a ``finish_reason`` is a reply cut off; the SDK
ends such a stream quietly, so that is checked here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx2
import openai
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from app.chat.records import Message
from app.llm.base import LLMError, ToolCall, ToolSpec, Usage, clip
from app.llm.context import arguments_json, turns
from app.llm.sdk import SdkModel
from app.settings import Settings

log = logging.getLogger(__name__)

# Statuses that mean "overloaded, ask another model": OpenAI and most
# compatible servers answer 503 when they shed load; some proxies 529.
_OVERLOADED = frozenset({503, 529})


class OpenAIModel(SdkModel):
    """``ChatModel`` backed by an OpenAI-compatible Chat Completions API."""

    provider = "openai"
    failures = (openai.OpenAIError, httpx2.HTTPError, httpx2.StreamError)

    def __init__(
        self,
        settings: Settings,
        http_client: httpx2.AsyncClient | None = None,
        max_retries: int | None = None,
    ) -> None:
        super().__init__(settings, settings.openai_api_key)
        self._client = openai.AsyncOpenAI(
            # Self-hosted servers usually want no key, but the SDK insists on one.
            api_key=settings.openai_api_key or "not-needed",
            base_url=settings.openai_base_url,
            **self._client_options(http_client, max_retries),
        )

    def _params(self, messages: Sequence[Message]) -> list[ChatCompletionMessageParam]:
        params = to_openai_messages(self._settings.chat_system_prompt, messages)
        if len(params) < 2:
            raise LLMError("There is no user message to reply to.", retryable=False)
        return params

    def _overloaded(self, exc: BaseException) -> bool:
        return isinstance(exc, openai.APIStatusError) and exc.status_code in _OVERLOADED

    def _describe(self, exc: BaseException) -> tuple[str, bool, int | None, str | None]:
        message, retryable = describe_error(exc)
        if isinstance(exc, openai.APIStatusError):
            return message, retryable, exc.status_code, exc.request_id
        return message, retryable, None, None

    async def _create(
        self, model: str, params: list[ChatCompletionMessageParam], tools: Sequence[ToolSpec]
    ) -> openai.AsyncStream[ChatCompletionChunk]:
        extra: dict[str, Any] = {}
        if tools:
            extra["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": dict(t.input_schema),
                    },
                }
                for t in tools
            ]
        chunks: openai.AsyncStream[
            ChatCompletionChunk
        ] = await self._client.chat.completions.create(
            model=model,
            messages=params,
            max_completion_tokens=self._settings.chat_max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            **extra,
        )
        return chunks

    async def _read(
        self, chunks: openai.AsyncStream[ChatCompletionChunk], usage: Usage
    ) -> AsyncIterator[str | ToolCall]:
        """Text as it streams; tool calls (assembled by index) at the end."""
        calls: dict[int, dict[str, str]] = {}
        finished = False
        async with chunks:
            async for chunk in chunks:
                if chunk.usage is not None:
                    details = chunk.usage.prompt_tokens_details
                    usage.input_tokens = chunk.usage.prompt_tokens
                    usage.output_tokens = chunk.usage.completion_tokens
                    if details is not None:
                        usage.cache_read_tokens = details.cached_tokens or 0
                        usage.cache_write_tokens = details.cache_write_tokens or 0
                for choice in chunk.choices[:1]:
                    if choice.delta.content:
                        yield choice.delta.content
                    for fragment in choice.delta.tool_calls or ():
                        call = calls.setdefault(fragment.index, {"id": "", "name": "", "args": ""})
                        call["id"] = fragment.id or call["id"]
                        if fragment.function is not None:
                            call["name"] += fragment.function.name or ""
                            call["args"] += fragment.function.arguments or ""
                    if choice.finish_reason is not None:
                        finished = True
        if not finished:
            log.warning("openai stream ended without a finish_reason")
            raise LLMError("The model's reply was cut off; try again.", retryable=True)
        for index, call in sorted(calls.items()):
            yield ToolCall(call["id"] or f"call_{index}", call["name"], call["args"] or "{}")

    async def aclose(self) -> None:
        await self._client.close()


def to_openai_messages(
    system: str, messages: Sequence[Message]
) -> list[ChatCompletionMessageParam]:
    """The system prompt, then the turns every provider gets
    (app.llm.context.turns): tool calls on the assistant message, each
    result a ``tool`` message."""
    out: list[ChatCompletionMessageParam] = [{"role": "system", "content": system}]
    for turn in turns(messages):
        if turn.role == "user":
            for use in turn.results:
                output = f"Error: {use.output}" if use.is_error else use.output
                out.append({"role": "tool", "tool_call_id": use.call_id, "content": output})
            if turn.text.strip():
                out.append({"role": "user", "content": turn.text})
        elif not turn.calls:
            out.append({"role": "assistant", "content": turn.text})
        else:
            out.append(
                {
                    "role": "assistant",
                    "content": turn.text if turn.text.strip() else None,
                    "tool_calls": [
                        {
                            "id": use.call_id,
                            "type": "function",
                            "function": {"name": use.name, "arguments": arguments_json(use)},
                        }
                        for use in turn.calls
                    ],
                }
            )
    return out


def describe_error(exc: BaseException) -> tuple[str, bool]:
    """(message for the user, retryable) for an SDK or ``httpx2`` failure,
    built from the status and the service's short explanation, never from
    the request (whose headers carry the key)."""
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status == 429:
            return "The model is rate limited; try again shortly.", True
        if status in _OVERLOADED:
            return "The model is overloaded; try again shortly.", True
        if status in (401, 403):
            return "The model service refused the configured credentials.", False
        detail = clip(_api_message(exc))
        text = f"The model service returned an error (HTTP {status})"
        return (f"{text}: {detail}" if detail else f"{text}.", status == 408 or status >= 500)
    if isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException):
        return "The model service timed out; try again.", True
    if isinstance(exc, openai.APIConnectionError):
        return "The connection to the model service failed or was lost; try again.", True
    if isinstance(exc, httpx2.HTTPError | httpx2.StreamError):
        return "The connection to the model service was lost mid-reply; try again.", True
    if isinstance(exc, openai.APIResponseValidationError):
        return "The model service sent a response that could not be read.", True
    if isinstance(exc, openai.APIError):
        # An ``error`` object inside the stream (a 200 response): the server
        # failed mid-reply, which is usually worth another try.
        detail = clip(_api_message(exc))
        text = "The model service failed mid-reply"
        return (f"{text}: {detail}" if detail else f"{text}.", True)
    return "The model request failed.", False


def _api_message(exc: openai.APIError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
    return exc.message if isinstance(exc.message, str) else ""
