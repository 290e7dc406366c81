"""Model providers behind one interface (app.llm.base.ChatModel)."""

from __future__ import annotations

from app.llm.base import ChatModel, LLMError, ToolCall, ToolSpec, Usage
from app.llm.fake import FakeModel
from app.settings import Settings

__all__ = ["ChatModel", "LLMError", "ToolCall", "ToolSpec", "Usage", "make_model"]


def make_model(settings: Settings) -> ChatModel:
    """The provider the settings ask for (CHAT_LLM)."""
    if settings.chat_llm == "anthropic":
        from app.llm.anthropic import AnthropicModel

        return AnthropicModel(settings)
    if settings.chat_llm == "openai":
        from app.llm.openai import OpenAIModel

        return OpenAIModel(settings)
    return FakeModel(
        settings.chat_fake_reply_tokens, settings.chat_fake_token_delay_ms, settings.chat_fake_stamp
    )
