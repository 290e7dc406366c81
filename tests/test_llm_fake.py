"""The fake model's input count: words of the context, counted once per text."""

from __future__ import annotations

from app.chat.records import Message
from app.llm.base import Usage
from app.llm.fake import FakeModel, WordCounts


def _message(content: str, role: str = "user") -> Message:
    return Message(
        id="1-0", role=role, content=content, user_id="u", created_at=0,  # type: ignore[arg-type]
        status="complete",
    )  # fmt: skip


async def _input_tokens(model: FakeModel, messages: list[Message]) -> int:
    usage = Usage()
    async for _ in model.stream(messages, usage):
        pass
    return usage.input_tokens


def test_counts_are_words_whatever_the_whitespace() -> None:
    counts = WordCounts()
    long = "  one\ttwo\n\nthree " * 200
    assert counts(long) == len(long.split()) == 600
    assert counts(long) == 600  # kept
    assert counts("a  b\u00a0c") == 3  # short: split each time, Unicode spaces too


def test_a_kept_count_is_never_another_texts() -> None:
    counts = WordCounts()
    first = "word " * 100
    same_length = "wordy" * 100  # one word, as long as ``first``
    assert counts(first) == 100
    assert counts(same_length) == 1
    assert counts(first) == 100


async def test_input_tokens_over_a_repeated_context() -> None:
    model = FakeModel(tokens=3, delay_ms=0)
    history = [_message("hello there " * 300), _message("reply words " * 200, "assistant")]
    first = await _input_tokens(model, [*history, _message("and again")])
    second = await _input_tokens(model, [*history, _message("and again please")])
    assert first == 600 + 400 + 2
    assert second == 600 + 400 + 3
