"""The context every provider gets: token estimates and the budget they fill."""

from __future__ import annotations

from app.chat.records import Message
from app.llm.context import MESSAGE_OVERHEAD_TOKENS, estimate_tokens, message_tokens

PROSE = (
    "Durable chat keeps every thread's history in Redis, streams each reply to "
    "every tab on any pod, and survives the death of the pod that runs a turn. "
) * 20


def test_estimate_errs_high_for_prose() -> None:
    # Tokenizers of current models average about 4 characters of English a
    # token; the estimate must not be below that, or a context could overflow.
    assert estimate_tokens(PROSE) >= len(PROSE) / 4
    assert estimate_tokens(PROSE) == -(-len(PROSE) // 3)


def test_estimate_counts_bytes_not_characters() -> None:
    # Scripts outside ASCII cost more tokens per character: 3 bytes each here.
    assert estimate_tokens("日本語のテキスト") == 8
    assert estimate_tokens("") == 0
    assert estimate_tokens("a") == 1


def test_a_message_costs_its_text_and_an_overhead() -> None:
    message = Message(
        id="1-0", role="user", content="abcdef", user_id="u", created_at=1, status="complete"
    )
    assert message_tokens(message) == 2 + MESSAGE_OVERHEAD_TOKENS
