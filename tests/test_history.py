"""Reads of committed messages: pages, the whole history, the model's context."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from app.chat import keys
from app.chat.history import HistoryReader, entry_fields, message_from_entry
from app.chat.records import Message
from app.chat.scripts import Scripts

T = keys.thread_id("hist")


def reader_of(redis: Any) -> HistoryReader:
    return HistoryReader(redis, Scripts(redis))


async def add(redis: Any, entry_id: str, content: str, role: str = "user") -> None:
    message = Message(
        id="", role=role, content=content, user_id="u", created_at=1, status="complete"
    )  # type: ignore[arg-type]
    flat = entry_fields(message)
    await redis.xadd(keys.history(T), dict(zip(flat[::2], flat[1::2], strict=True)), entry_id)


def test_history_entry_fields_round_trip() -> None:
    message = Message(
        id="",
        role="user",
        content="hello",
        user_id="alice",
        created_at=123,
        status="complete",
        client_msg_id="c1",
    )
    flat = entry_fields(message)
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    assert fields == {
        "role": "user",
        "content": "hello",
        "user_id": "alice",
        "status": "complete",
        "created_at": "123",
        "client_msg_id": "c1",
    }
    assert message_from_entry("5-1", fields) == dataclasses.replace(message, id="5-1")


def test_history_entry_fields_omit_missing_client_msg_id() -> None:
    message = Message(
        id="", role="assistant", content="", user_id="assistant", created_at=1, status="error"
    )
    assert "client_msg_id" not in entry_fields(message)
    assert message_from_entry("1-0", {"role": "assistant"}).created_at == 1


@pytest.fixture
async def seven(redis: Any) -> list[str]:
    """Messages m1..m7 with ids 1-0 .. 7-0."""
    ids = [f"{i}-0" for i in range(1, 8)]
    for i, entry_id in enumerate(ids, start=1):
        await add(redis, entry_id, f"m{i}", "user" if i % 2 else "assistant")
    return ids


async def test_page_walks_back_through_the_history(redis: Any, seven: list[str]) -> None:
    reader = reader_of(redis)
    page, more = await reader.page(T, None, 3)
    assert [m.content for m in page] == ["m5", "m6", "m7"] and more is True
    page, more = await reader.page(T, page[0].id, 3)
    assert [m.content for m in page] == ["m2", "m3", "m4"] and more is True
    page, more = await reader.page(T, page[0].id, 3)
    assert [m.content for m in page] == ["m1"] and more is False


async def test_page_exactly_filling_the_limit_has_no_more(redis: Any, seven: list[str]) -> None:
    reader = reader_of(redis)
    page, more = await reader.page(T, None, 7)
    assert [m.id for m in page] == seven and more is False
    page, more = await reader.page(T, "4-0", 3)
    assert [m.id for m in page] == ["1-0", "2-0", "3-0"] and more is False


async def test_page_before_is_exclusive_and_messages_are_whole(
    redis: Any, seven: list[str]
) -> None:
    page, more = await reader_of(redis).page(T, "3-0", 50)
    assert [m.id for m in page] == ["1-0", "2-0"] and more is False
    assert page[0].role == "user" and page[1].role == "assistant"
    assert page[0].user_id == "u" and page[0].status == "complete"


async def test_page_of_an_empty_thread(redis: Any) -> None:
    assert await reader_of(redis).page(T, None, 10) == ([], False)


async def test_all_is_oldest_first(redis: Any, seven: list[str]) -> None:
    assert [m.id for m in await reader_of(redis).all(T)] == seven


def chars(message: Message) -> int:
    """A cost the tests can count by eye (the service uses estimated tokens)."""
    return len(message.content)


async def test_context_respects_the_budget(redis: Any, seven: list[str]) -> None:
    reader = reader_of(redis)
    # Each message costs 2: all 7 fit in 14.
    assert [m.content for m in await reader.context(T, "", 14, chars)] == [
        f"m{i}" for i in range(1, 8)
    ]
    # A window that no longer fits starts again with REFILL (60 %) of the
    # budget: room for the next turns to grow into with the same beginning.
    assert [m.content for m in await reader.context(T, "", 7, chars)] == ["m6", "m7"]
    assert [m.content for m in await reader.context(T, "", 6, chars)] == ["m7"]
    assert [m.content for m in await reader.context(T, "", 10, chars)] == ["m5", "m6", "m7"]


async def test_context_keeps_its_start_while_it_fits(redis: Any, seven: list[str]) -> None:
    reader = reader_of(redis)
    # The window started at m5 last time: it still does, though m3 and m4
    # would fit too (the same prefix is what a prompt cache can match).
    start = seven[4]
    window = await reader.context(T, "", 10, chars, start)
    assert [m.content for m in window] == ["m5", "m6", "m7"]
    await add(redis, "8-0", "m8")
    assert [m.content for m in await reader.context(T, "", 10, chars, start)] == [
        "m5", "m6", "m7", "m8",
    ]  # fmt: skip
    await add(redis, "9-0", "m9")
    await add(redis, "10-0", "mX")
    # Over the budget from that start: a new, shorter window.
    assert [m.content for m in await reader.context(T, "", 10, chars, start)] == [
        "m8", "m9", "mX",
    ]  # fmt: skip
    # A start that is not on the branch (another branch, or gone) is ignored.
    assert [m.content for m in await reader.context(T, "", 14, chars, "99-0")] == [
        "m7", "m8", "m9", "mX",
    ]  # fmt: skip


async def test_context_reads_across_pages_without_gap_or_repeat(redis: Any) -> None:
    # 100 messages of 3 chars: more than the first few (growing) pages hold.
    for i in range(1, 101):
        await add(redis, f"{i}-0", f"{i:03d}")
    reader = reader_of(redis)
    assert [m.content for m in await reader.context(T, "", 300, chars)] == [
        f"{i:03d}" for i in range(1, 101)
    ]
    assert [m.content for m in await reader.context(T, "", 90, chars)] == [
        f"{i:03d}" for i in range(83, 101)
    ]


async def test_context_always_includes_the_newest_message(redis: Any) -> None:
    await add(redis, "1-0", "short")
    await add(redis, "2-0", "x" * 1000)
    latest = await reader_of(redis).context(T, "2-0", 10, chars)
    assert [m.content for m in latest] == ["x" * 1000]


async def test_context_reads_beyond_one_batch(redis: Any) -> None:
    for i in range(1, 121):
        await add(redis, f"{i}-0", "ab")
    reader = reader_of(redis)
    everything = await reader.context(T, "", 10_000, chars)
    assert [m.id for m in everything] == [f"{i}-0" for i in range(1, 121)]
    some = await reader.context(T, "", 150, chars)
    assert [m.id for m in some] == [f"{i}-0" for i in range(76, 121)]


async def test_context_reads_nothing_older_than_its_start(redis: Any) -> None:
    """The walk stops where the last context started: the pages read hold
    the window and nothing past it (here 12 messages, not pages of 8 and 16)."""
    for i in range(1, 41):
        await add(redis, f"{i}-0", "ab")
    reader = reader_of(redis)
    read: list[int] = []
    walk = reader._scripts.history_path

    async def counted(*args: Any, **kwargs: Any) -> Any:
        reply = await walk(*args, **kwargs)
        read.append(len(reply) - 2)
        return reply

    reader._scripts.history_path = counted  # type: ignore[method-assign]
    window = await reader.context(T, "", 10_000, chars, "29-0")
    assert [m.id for m in window] == [f"{i}-0" for i in range(29, 41)]
    assert sum(read) == 12


async def test_context_of_an_empty_thread(redis: Any) -> None:
    assert await reader_of(redis).context(T, "", 100, chars) == []


async def test_page_before_the_first_possible_id_is_empty(redis: Any, seven: list[str]) -> None:
    assert await reader_of(redis).page(T, "0-0", 10) == ([], False)
    page, more = await reader_of(redis).page(T, "1-0", 10)
    assert page == [] and more is False
