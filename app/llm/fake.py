"""A deterministic streaming model: no network, no key, same reply every time.

The reply to a conversation depends only on its last user message and the
configured length, so tests can compute exactly what they must receive
(``expected_reply``). It is the default when no model key is set (the pod
then warns at start and the demo page shows a banner), and the model of
tests and benchmarks. Its reply says that it is fake.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Sequence

from app.chat.records import Message
from app.llm.base import ToolCall, ToolSpec, Usage

# What the fake model says: it echoes the prompt's first words, says what it
# is, then counts, so that a person trying the demo reads it for what it is
# and sees the stream go on for CHAT_FAKE_REPLY_TOKENS words.
_ECHO_WORDS = 8
_ECHO_CHARS = 24
_INTRO = (
    "(fake model) You said: “{echo}”. This is durable-chat's built-in fake model, "
    "not an AI: a canned reply, streamed word by word, the same for the same "
    "prompt. Set ANTHROPIC_API_KEY for real answers. Counting on:"
)


def expected_reply(prompt: str, tokens: int) -> str:
    """The fake model's full reply to ``prompt``: ``tokens`` pieces joined."""
    return "".join(reply_tokens(prompt, tokens))


def reply_tokens(prompt: str, tokens: int) -> list[str]:
    """The pieces the fake model streams, in order: ``tokens`` words (each
    after the first with its leading space), a function of ``prompt`` only."""
    said = prompt.split()
    echo = " ".join(word[:_ECHO_CHARS] for word in said[:_ECHO_WORDS])
    if len(said) > _ECHO_WORDS:
        echo += " …"
    words = _INTRO.format(echo=echo or "(nothing)").split()[:tokens]
    words += [str(n) for n in range(1, tokens - len(words) + 1)]
    return [words[0]] + [" " + word for word in words[1:]]


def tool_request(prompt: str) -> tuple[str, str] | None:
    """``/tool NAME [JSON]``: the tool the fake model calls, and its arguments
    as given (not checked: tests send malformed ones on purpose)."""
    if not prompt.startswith("/tool "):
        return None
    name, _, arguments = prompt[len("/tool ") :].strip().partition(" ")
    return name, arguments.strip() or "{}"


# Texts shorter than this are split each time; longer ones have their count
# kept (WordCounts).
_COUNT_KEPT_FROM = 256
_COUNTS_KEPT = 8192


class WordCounts:
    """The whitespace-separated words of texts, counted once per text.

    A thread's context is mostly the same messages turn after turn, and at
    full speed splitting every one of them again each turn cost a pod about
    3% of its CPU. A count is kept by the text's length and hash (a text, not
    its message id: ids repeat across threads), at most ``_COUNTS_KEPT`` of
    them, the oldest dropped first.
    """

    def __init__(self) -> None:
        self._kept: dict[tuple[int, int], int] = {}

    def __call__(self, text: str) -> int:
        if len(text) < _COUNT_KEPT_FROM:
            return len(text.split())
        key = (len(text), hash(text))
        count = self._kept.get(key)
        if count is None:
            count = self._kept[key] = len(text.split())
            if len(self._kept) > _COUNTS_KEPT:
                del self._kept[next(iter(self._kept))]
        return count

    def of(self, message: Message) -> int:
        """The words the fake model counts as a message's input: its text, and
        the tool calls' outputs (so tests can see a call carried into the next
        context)."""
        return self(message.content) + sum(self(u.output) for u in message.tool_calls)


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
        self._words = WordCounts()

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
        usage.input_tokens = sum(self._words.of(m) for m in messages)
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

    async def title(self, first_prompt: str) -> str:
        """A thread's title (app.llm.titles): the first six words of its first prompt."""
        return " ".join(first_prompt.split()[:6])

    async def aclose(self) -> None:
        return None
