"""What every provider sends the model, before its own wire format.

A thread's history becomes an alternating list of turns that every chat API
accepts (no empty messages, consecutive same-role messages merged, the user
first), and its size is estimated in tokens for the context budget.
"""

from __future__ import annotations

from collections.abc import Sequence

from app.chat.records import Message, Role

# Tokens a message costs beyond its text (role markers, separators): every
# chat format spends a few; 4 is what OpenAI documents for its own.
MESSAGE_OVERHEAD_TOKENS = 4


def estimate_tokens(text: str) -> int:
    """A token count that errs on the safe side, without a tokenizer.

    One token per 3 bytes of UTF-8: English prose runs about 4 characters a
    token in the Claude and GPT tokenizers, code and most other scripts near
    3 bytes, so this overestimates rather than overflowing a context window.
    """
    return -(-len(text.encode()) // 3)


def message_tokens(message: Message) -> int:
    """The estimated cost of one history message in a model's context."""
    return estimate_tokens(message.content) + MESSAGE_OVERHEAD_TOKENS


def turns(messages: Sequence[Message]) -> list[tuple[Role, str]]:
    """The history (oldest first) as alternating turns, the user's first."""
    out: list[tuple[Role, str]] = []
    for m in messages:
        if not m.content.strip() or (not out and m.role != "user"):
            continue
        if out and out[-1][0] == m.role:
            out[-1] = (m.role, f"{out[-1][1]}\n\n{m.content}")
        else:
            out.append((m.role, m.content))
    return out
