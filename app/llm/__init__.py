"""Model providers behind one interface (app.llm.base.ChatModel)."""

from __future__ import annotations

import logging

from app.llm.base import ChatModel, LLMError, ToolCall, ToolSpec, Usage
from app.llm.fake import FakeModel
from app.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["ChatModel", "LLMError", "ToolCall", "ToolSpec", "Usage", "make_model"]


def make_model(settings: Settings) -> ChatModel:
    """The provider the settings ask for (CHAT_LLM)."""
    if settings.chat_llm == "anthropic":
        from app.llm.anthropic import AnthropicModel

        return AnthropicModel(settings)
    if settings.chat_llm == "openai":
        from app.llm.openai import OpenAIModel

        return OpenAIModel(settings)
    log.warning(
        "CHAT_LLM is FAKE: no model key is set, so every reply is canned text from a "
        "deterministic FAKE model, not an AI. Set ANTHROPIC_API_KEY (or CHAT_LLM=openai) "
        "for real answers."
    )
    return FakeModel(
        settings.chat_fake_reply_tokens, settings.chat_fake_token_delay_ms, settings.chat_fake_stamp
    )
