"""The Anthropic provider: streams a reply from the Messages API.

This module owns everything specific to Anthropic: turning a thread's history
into a valid ``messages`` list (alternating roles, starting with the user),
streaming the reply's text, reading token usage, and translating every SDK or
transport failure into an ``LLMError`` whose message is safe to show a user
(it never contains the API key) and says whether a retry may succeed.

The SDK (``anthropic``) is built on ``httpx2``: HTTP errors surface as
``anthropic.APIError`` when the stream is opened, but a connection that drops
mid-reply raises raw ``httpx2`` errors, and a body that simply stops early is
not reported by the SDK at all; both are turned into ``LLMError`` here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

import anthropic
import httpx2
from anthropic.types import AssistantMessageParam, MessageParam, UserMessageParam

from app.chat.records import Message, Role
from app.llm.base import LLMError
from app.settings import Settings

log = logging.getLogger(__name__)

# ``error.type`` values (SSE ``error`` events carry no HTTP status of their own)
# that describe a transient condition on Anthropic's side.
_RETRYABLE_ERROR_TYPES = frozenset(
    {"rate_limit_error", "overloaded_error", "api_error", "timeout_error"}
)
_MAX_DETAIL_CHARS = 200


class AnthropicModel:
    """``ChatModel`` backed by Anthropic's streaming Messages API."""

    def __init__(
        self,
        settings: Settings,
        http_client: httpx2.AsyncClient | None = None,
        max_retries: int = 2,
    ) -> None:
        self._settings = settings
        self._api_key = settings.anthropic_api_key or ""
        if http_client is not None:
            self._client = anthropic.AsyncAnthropic(
                api_key=settings.anthropic_api_key,
                timeout=settings.chat_llm_timeout_s,
                max_retries=max_retries,
                http_client=http_client,
            )
        else:
            self._client = anthropic.AsyncAnthropic(
                api_key=settings.anthropic_api_key,
                timeout=settings.chat_llm_timeout_s,
                max_retries=max_retries,
            )

    @property
    def name(self) -> str:
        return self._settings.chat_model

    async def stream(
        self, messages: Sequence[Message], usage: dict[str, int]
    ) -> AsyncIterator[str]:
        params = to_anthropic_messages(messages)
        if not params:
            raise LLMError("There is no user message to reply to.", retryable=False)
        settings = self._settings
        try:
            async with self._client.messages.stream(
                model=settings.chat_model,
                max_tokens=settings.chat_max_tokens,
                system=settings.chat_system_prompt,
                messages=params,
            ) as stream:
                finished = False
                # The events rather than ``stream.text_stream`` (the same text):
                # only ``message_stop`` tells a complete reply from a body that
                # stopped early, which the SDK ends quietly.
                async for event in stream:
                    if event.type == "content_block_delta" and event.delta.type == "text_delta":
                        if event.delta.text:
                            yield event.delta.text
                    elif event.type == "message_stop":
                        finished = True
                if not finished:
                    log.warning("anthropic stream ended before message_stop")
                    raise LLMError("The model's reply was cut off; try again.", retryable=True)
                final = await stream.get_final_message()
        except LLMError:
            raise
        except (anthropic.AnthropicError, httpx2.HTTPError, httpx2.StreamError) as exc:
            raise self._to_llm_error(exc) from None
        except Exception:
            # A body the SDK cannot parse (bad JSON, an event out of order) is
            # still the model failing; the traceback goes to the log only.
            log.exception("anthropic stream could not be read")
            raise LLMError("The model service sent a reply that could not be read.") from None
        if final.usage is not None:
            usage["input_tokens"] = final.usage.input_tokens
            usage["output_tokens"] = final.usage.output_tokens

    async def aclose(self) -> None:
        await self._client.close()

    def _to_llm_error(self, exc: Exception) -> LLMError:
        """A user-safe ``LLMError`` for a failure of the SDK or its transport."""
        message, retryable = describe_error(exc)
        if self._api_key:
            message = message.replace(self._api_key, "[redacted]")
        status = exc.status_code if isinstance(exc, anthropic.APIStatusError) else None
        request_id = exc.request_id if isinstance(exc, anthropic.APIStatusError) else None
        log.warning(
            "anthropic request failed: %s status=%s request_id=%s retryable=%s",
            type(exc).__name__,
            status,
            request_id,
            retryable,
        )
        return LLMError(message, retryable=retryable)


def to_anthropic_messages(messages: Sequence[Message]) -> list[MessageParam]:
    """The history (oldest first) as the API wants it: no empty messages,
    roles alternating (consecutive same-role messages merged) and the user
    first (leading assistant messages dropped)."""
    turns: list[tuple[Role, str]] = []
    for m in messages:
        if not m.content.strip() or (not turns and m.role != "user"):
            continue
        if turns and turns[-1][0] == m.role:
            turns[-1] = (m.role, f"{turns[-1][1]}\n\n{m.content}")
        else:
            turns.append((m.role, m.content))
    return [
        UserMessageParam(role="user", content=content)
        if role == "user"
        else AssistantMessageParam(role="assistant", content=content)
        for role, content in turns
    ]


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
    detail = (exc.api_message or "").strip()
    if len(detail) > _MAX_DETAIL_CHARS:
        detail = detail[: _MAX_DETAIL_CHARS - 1] + "…"
    label = f"HTTP {status}" if status >= 400 else (kind or "stream error")
    text = f"The model service returned an error ({label})"
    return (f"{text}: {detail}" if detail else f"{text}.", retryable)
