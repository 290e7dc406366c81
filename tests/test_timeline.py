"""The timeline format and its reads: frames, covers(), read_after/read_from."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest

from app.chat import keys
from app.chat.keys import ThreadId
from app.chat.records import Delta, Done, Message
from app.chat.timeline import (
    MESSAGE_ID_PLACEHOLDER,
    Timeline,
    TimelineEvent,
    done_event_data,
    event_data,
    event_type,
    frame_from_entry,
    message_event_data,
    message_event_parts,
    parse_frame,
)

T = keys.thread_id("tl")


async def add(redis: Any, thread: ThreadId, entry_id: str, n: int, event: dict[str, Any]) -> None:
    await redis.xadd(keys.events(thread), {"n": n, "data": orjson.dumps(event).decode()}, entry_id)


@pytest.fixture
async def log(redis: Any) -> list[str]:
    """Events 10-0 .. 14-0 (n 1..5) in T's log."""
    ids = [f"{10 + i}-0" for i in range(5)]
    for n, entry_id in enumerate(ids, start=1):
        await add(redis, T, entry_id, n, {"type": "delta", "thread_id": T, "text": str(n)})
    return ids


# --- format -------------------------------------------------------------------------


def test_frame_from_entry_and_parse_frame_agree() -> None:
    data = orjson.dumps({"type": "delta", "thread_id": "t", "text": 'a,b"c'}).decode()
    event = frame_from_entry("123-4", {"n": "9", "data": data})
    assert event.id == "123-4" and event.key == (123, 4) and event.n == 9
    assert orjson.loads(event.frame) == {
        "id": "123-4",
        "n": 9,
        "type": "delta",
        "thread_id": "t",
        "text": 'a,b"c',
    }
    parsed = parse_frame(event.frame)
    assert parsed == event


def test_parse_frame_of_a_control_frame_is_none() -> None:
    assert parse_frame('{"control":"cancel","generation_id":"g"}') is None
    assert parse_frame('{"control":"reset"}') is None
    assert parse_frame("") is None


def test_message_event_parts_join_around_the_ids_the_script_decides() -> None:
    message = Message(
        id="ignored", role="user", content="\x01\x02 is escaped", user_id="u", created_at=5,
        status="complete",
    )  # fmt: skip
    head, tail = message_event_parts(T, message)
    # The script joins them as message_event does (app.chat.scripts).
    filled = orjson.loads(f'{head}7-0","parent_id":"6-0"{tail}')
    assert filled["type"] == "message" and filled["thread_id"] == T
    assert filled["message"]["id"] == "7-0" and filled["message"]["parent_id"] == "6-0"
    root = orjson.loads(f'{head}7-0","parent_id":null{tail}')
    assert root["message"]["parent_id"] is None
    assert filled["message"]["content"] == "\x01\x02 is escaped"
    assert "client_msg_id" not in filled["message"]
    committed = dataclasses.replace(message, id="7-0", parent_id="6-0")
    assert message_event_data(T, committed) == f'{head}7-0","parent_id":"6-0"{tail}'


def test_done_event_data_has_the_placeholder_for_the_message_id() -> None:
    data = done_event_data(Done(thread_id="t", generation_id="g", status="cancelled"))
    assert orjson.loads(data.replace(MESSAGE_ID_PLACEHOLDER, "8-1")) == {
        "type": "done",
        "thread_id": "t",
        "generation_id": "g",
        "status": "cancelled",
        "message_id": "8-1",
    }


def test_event_data_drops_none() -> None:
    data = event_data(Delta(thread_id="t", generation_id="g", seq=3, text="x"))
    assert orjson.loads(data) == {
        "type": "delta",
        "thread_id": "t",
        "generation_id": "g",
        "seq": 3,
        "text": "x",
    }


# --- covers -----------------------------------------------------------------------------


async def test_covers_when_after_is_the_last_event(redis: Any, log: list[str]) -> None:
    assert await Timeline(redis).covers(T, log[-1], log[-1]) is True


async def test_covers_the_last_event_even_with_an_empty_log(redis: Any) -> None:
    """A client at the newest event misses nothing, whatever the log holds."""
    assert await Timeline(redis).covers(T, "5-0", "5-0") is True


async def test_covers_an_event_inside_the_log(redis: Any, log: list[str]) -> None:
    timeline = Timeline(redis)
    assert await timeline.covers(T, log[0], log[-1]) is True
    assert await timeline.covers(T, log[2], log[-1]) is True
    # An id between two stored ones (say, of an event since trimmed... or not) is covered too.
    assert await timeline.covers(T, "12-5", log[-1]) is True


async def test_covers_false_when_after_is_older_than_the_oldest(redis: Any, log: list[str]) -> None:
    timeline = Timeline(redis)
    assert await timeline.covers(T, "9-99", log[-1]) is False
    assert await timeline.covers(T, "0-0", log[-1]) is False
    await redis.xtrim(keys.events(T), maxlen=2, approximate=False)  # 13-0 and 14-0 are left
    assert await timeline.covers(T, log[1], log[-1]) is False
    assert await timeline.covers(T, log[3], log[-1]) is True


async def test_covers_false_beyond_the_last_event(redis: Any, log: list[str]) -> None:
    timeline = Timeline(redis)
    assert await timeline.covers(T, "14-1", log[-1]) is False
    assert await timeline.covers(T, "99999-0", log[-1]) is False


async def test_covers_false_without_events(redis: Any) -> None:
    timeline = Timeline(redis)
    assert await timeline.covers(T, "1-0", None) is False
    # A last id recorded but an empty log (everything lost): nothing is covered.
    assert await timeline.covers(T, "1-0", "5-0") is False


async def test_covers_rejects_a_malformed_cursor(redis: Any, log: list[str]) -> None:
    with pytest.raises(keys.InvalidId):
        await Timeline(redis).covers(T, "nope", log[-1])


# --- reads -------------------------------------------------------------------------------


async def test_read_after_is_exclusive(redis: Any, log: list[str]) -> None:
    timeline = Timeline(redis)
    assert [e.id for e in await timeline.read_after(T, log[1])] == log[2:]
    assert await timeline.read_after(T, log[-1]) == []
    assert [e.n for e in await timeline.read_after(T, "0-0")] == [1, 2, 3, 4, 5]


async def test_read_after_until_and_count(redis: Any, log: list[str]) -> None:
    timeline = Timeline(redis)
    assert [e.id for e in await timeline.read_after(T, log[0], f"({log[3]}")] == log[1:3]
    assert [e.id for e in await timeline.read_after(T, log[0], log[3])] == log[1:4]
    assert [e.id for e in await timeline.read_after(T, log[0], count=2)] == log[1:3]


async def test_read_from_is_inclusive(redis: Any, log: list[str]) -> None:
    events = await Timeline(redis).read_from(T, log[2])
    assert [e.id for e in events] == log[2:]
    assert [orjson.loads(e.frame)["text"] for e in events] == ["3", "4", "5"]


def test_event_type_reads_the_frames_type() -> None:
    data = '{"type":"loading","thread_id":"t","generation_id":"g","model":"m"}'
    assert event_type(frame_from_entry("1-0", {"n": "1", "data": data})) == "loading"
    # A frame without a type (not one our scripts write) is not an error.
    assert event_type(TimelineEvent("1-0", (1, 0), 1, '{"id":"1-0","n":1}')) == ""
