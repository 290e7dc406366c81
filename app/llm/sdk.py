"""What the providers built on a vendor SDK share (app.llm.anthropic, app.llm.openai).

One model call: turn the history into the SDK's parameters, open the stream
(asking CHAT_FALLBACK_MODEL instead when the primary answers overloaded),
read it into text and tool calls, and turn every SDK or transport failure
into an ``LLMError`` whose message is safe to show a user: built from the
status and the service's own short explanation, never from the request,
and with the API key taken out should the service echo it. A subclass says
how for its SDK.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from typing import Any

from app.chat.records import Message
from app.llm.base import LLMError, ToolCall, ToolSpec, Usage
from app.settings import Settings

log = logging.getLogger(__name__)


class SdkModel(ABC):
    """A ``ChatModel`` over a vendor SDK's streaming API."""

    provider: str = ""
    # What the SDK and its transport raise (anything else while reading is a
    # body the SDK could not parse).
    failures: tuple[type[BaseException], ...] = ()

    def __init__(self, settings: Settings, api_key: str | None) -> None:
        self._settings = settings
        self._api_key = api_key or ""

    @property
    def name(self) -> str:
        return self._settings.model_name

    def _client_options(self, http_client: Any, max_retries: int | None) -> dict[str, Any]:
        """The SDK client's options every provider sets alike: CHAT_LLM_TIMEOUT_S,
        CHAT_LLM_MAX_RETRIES (or ``max_retries``), and a given HTTP client (tests)."""
        retries = self._settings.chat_llm_max_retries if max_retries is None else max_retries
        options: dict[str, Any] = {"timeout": self._settings.chat_llm_timeout_s}
        options["max_retries"] = retries
        if http_client is not None:
            options["http_client"] = http_client
        return options

    async def stream(
        self, messages: Sequence[Message], usage: Usage, tools: Sequence[ToolSpec] = ()
    ) -> AsyncIterator[str | ToolCall]:
        params = self._params(messages)
        fallback = self._settings.chat_fallback_model
        model = self.name
        try:
            try:
                opened = await self._create(model, params, tools)
            except self.failures as exc:
                if not (fallback and self._overloaded(exc)):
                    raise
                log.warning("%s model %s overloaded; asking %s", self.provider, model, fallback)
                model = fallback
                opened = await self._create(model, params, tools)
            usage.model = model
            async for item in self._read(opened, usage):
                yield item
        except LLMError:
            raise
        except self.failures as exc:
            raise self._to_llm_error(exc) from None
        except Exception:
            log.exception("%s stream could not be read", self.provider)
            raise LLMError("The model service sent a reply that could not be read.") from None

    @abstractmethod
    def _params(self, messages: Sequence[Message]) -> Any:
        """The history as the SDK wants it; LLMError when there is no user message."""

    @abstractmethod
    async def _create(self, model: str, params: Any, tools: Sequence[ToolSpec]) -> Any:
        """Open the streaming request (its HTTP errors raise here)."""

    @abstractmethod
    def _read(self, opened: Any, usage: Usage) -> AsyncIterator[str | ToolCall]:
        """Text as it streams, tool calls at the end; LLMError for a body
        that ends before the reply does."""

    @abstractmethod
    def _overloaded(self, exc: BaseException) -> bool:
        """Whether ``exc`` says the model is overloaded (ask the fallback)."""

    @abstractmethod
    def _describe(self, exc: BaseException) -> tuple[str, bool, int | None, str | None]:
        """(message for the user, retryable, HTTP status, request id) of a failure."""

    def _to_llm_error(self, exc: BaseException) -> LLMError:
        message, retryable, status, request_id = self._describe(exc)
        if self._api_key:
            message = message.replace(self._api_key, "[redacted]")
        log.warning(
            "%s request failed: %s status=%s request_id=%s retryable=%s",
            self.provider, type(exc).__name__, status, request_id, retryable,
        )  # fmt: skip
        return LLMError(message, retryable=retryable)
