"""A deterministic streaming model: no network, no key, same reply every time.

The reply to a conversation depends only on its last user message and the
configured length, so tests can compute exactly what they must receive
(``expected_reply``). It is the default when no Anthropic key is set, and the
model of tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Sequence

from app.chat.records import Message
from app.llm.base import ToolCall, ToolSpec, Usage

_WORDS = (
    "durable", "chat", "streams", "every", "token", "to", "each", "tab", "on", "any",
    "pod", "and", "keeps", "the", "thread", "history", "safe", "in", "redis", "always",
)  # fmt: skip


def expected_reply(prompt: str, tokens: int) -> str:
    """The fake model's full reply to ``prompt``: ``tokens`` pieces joined."""
    return "".join(reply_tokens(prompt, tokens))


def reply_tokens(prompt: str, tokens: int) -> list[str]:
    """The pieces the fake model streams, in order."""
    seed = hashlib.sha256(prompt.encode()).digest()
    words = [_WORDS[seed[i % len(seed)] % len(_WORDS)] for i in range(tokens)]
    return [words[0].capitalize()] + [" " + w for w in words[1:]]


def tool_request(prompt: str) -> tuple[str, str] | None:
    """``/tool NAME [JSON]``: the tool the fake model calls, and its arguments
    as given (not checked: tests send malformed ones on purpose)."""
    if not prompt.startswith("/tool "):
        return None
    name, _, arguments = prompt[len("/tool ") :].strip().partition(" ")
    return name, arguments.strip() or "{}"


def _words(message: Message) -> int:
    """The words the fake model counts as its input: the text, and the tool
    calls' outputs (so tests can see a call carried into the next context)."""
    return len(message.content.split()) + sum(len(u.output.split()) for u in message.tool_calls)


class FakeModel:
    """Streams ``reply_tokens`` of the last user message, one per ``delay_ms``.

    A prompt ``/tool NAME [JSON]`` makes it call tool NAME first (see
    tool_request); once the results are in, it replies as usual.

    With ``stamp`` (CHAT_FAKE_STAMP, for benchmarks) each piece is followed by
    its emission time, ``[t=<unix seconds, 6 decimals>]``, so a client can
    measure emit-to-receive latency; the reply then differs from expected_reply.
    """

    def __init__(self, tokens: int, delay_ms: float, stamp: bool = False) -> None:
        self._tokens = tokens
        self._delay_s = delay_ms / 1000
        self._stamp = stamp

    @property
    def name(self) -> str:
        return "fake"

    @property
    def provider(self) -> str:
        return "fake"

    async def stream(
        self, messages: Sequence[Message], usage: Usage, tools: Sequence[ToolSpec] = ()
    ) -> AsyncIterator[str | ToolCall]:
        prompt = next((m.content for m in reversed(messages) if m.role == "user"), "")
        usage.model = "fake"
        usage.input_tokens = sum(_words(m) for m in messages)
        call = tool_request(prompt)
        if call is not None and not (messages and messages[-1].role == "assistant"):
            # Ask once; the turn's next call (after the results) replies.
            name, arguments = call
            seed = f"{len(messages)}:{prompt}".encode()
            yield ToolCall(f"call_{hashlib.sha256(seed).hexdigest()[:16]}", name, arguments)
            return
        for i, piece in enumerate(reply_tokens(prompt, self._tokens)):
            if self._delay_s:
                await asyncio.sleep(self._delay_s)
            usage.output_tokens = i + 1
            yield f"{piece}[t={time.time():.6f}]" if self._stamp else piece

    async def aclose(self) -> None:
        return None
