"""What every provider sends the model, before its own wire format.

A thread's history becomes a list of turns that every chat API accepts:
roles alternating, the user first, no empty turns, and an assistant reply
that used tools split back into its rounds (text and the calls it asked
for, then the results, then the text that followed). Each provider only
renders these turns. The context's size is estimated here in tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson

from app.chat.records import Message, Role, ToolUse

# Tokens a message costs beyond its text (role markers, separators): every
# chat format spends a few; 4 is what OpenAI documents for its own.
MESSAGE_OVERHEAD_TOKENS = 4


def estimate_tokens(text: str) -> int:
    """A token count that errs on the safe side, without a tokenizer.

    One token per 3 bytes of UTF-8: English prose runs about 4 characters a
    token in the Claude and GPT tokenizers, code and most other scripts near
    3 bytes, so this overestimates rather than overflowing a context window.
    """
    size = len(text) if text.isascii() else len(text.encode())  # no copy for ASCII
    return -(-size // 3)


def message_tokens(message: Message) -> int:
    """The estimated cost of one history message in a model's context, with
    the tool calls and results it carries."""
    tokens = estimate_tokens(message.content) + MESSAGE_OVERHEAD_TOKENS
    for use in message.tool_calls:
        tokens += estimate_tokens(arguments_json(use)) + estimate_tokens(use.output)
        tokens += 2 * MESSAGE_OVERHEAD_TOKENS
    return tokens


def arguments_json(use: ToolUse) -> str:
    """A call's input as the JSON text a model sent (kept raw if it was not JSON)."""
    return use.input if isinstance(use.input, str) else orjson.dumps(use.input).decode()


@dataclass
class Turn:
    """One turn as a model reads it. An assistant turn may end by asking for
    tools (``calls``); the user turn after it starts with their ``results``."""

    role: Role
    text: str = ""
    calls: list[ToolUse] = field(default_factory=list)
    results: list[ToolUse] = field(default_factory=list)

    def empty(self) -> bool:
        return not self.text.strip() and not self.calls and not self.results


def turns(messages: Sequence[Message]) -> list[Turn]:
    """The history (oldest first) as alternating turns, the user's first:
    empty messages dropped, consecutive same-role messages merged."""
    out: list[Turn] = []
    for piece in itertools.chain.from_iterable(_rounds(m) for m in messages):
        if piece.empty():
            continue
        if not out and (piece.role != "user" or piece.results):
            # A model's reply cannot open a conversation, nor can results of
            # calls it does not show: what is left of it is the user's text.
            if piece.role != "user" or not piece.text.strip():
                continue
            piece = Turn("user", piece.text)
        last = out[-1] if out else None
        if last is not None and last.role == piece.role and not last.calls:
            last.text = "\n\n".join(t for t in (last.text, piece.text) if t.strip())
            last.calls = piece.calls
            last.results += piece.results
        else:
            out.append(piece)
    return out


def _rounds(message: Message) -> list[Turn]:
    """A message as turns: an assistant reply that used tools is split at
    each call's offset into (text, calls), (results), ..., (final text)."""
    if message.role == "user" or not message.tool_calls:
        return [Turn(message.role, message.content)]
    out: list[Turn] = []
    position = 0
    ordered = sorted(message.tool_calls, key=lambda use: use.offset)
    for offset, group in itertools.groupby(ordered, key=lambda use: use.offset):
        calls = list(group)
        out.append(Turn("assistant", message.content[position:offset], calls=calls))
        out.append(Turn("user", results=calls))
        position = max(position, offset)
    out.append(Turn("assistant", message.content[position:]))
    return out
