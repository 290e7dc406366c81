"""Helpers for the failure tests (test_crash_recovery, test_drain, test_cancel,
test_resume, test_idempotency, test_slow_client, test_redis_outage,
test_randomized_failures): sockets that say what they saw, and checks of what
a client saw against what Redis holds."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import orjson
from websockets.exceptions import ConnectionClosed

from tests.integration.conftest import RedisServer
from tests.integration.helpers import recv_event, timeline

TIMEOUT_S = 15.0


async def read_until(
    ws: Any, stop: Any, timeout: float = TIMEOUT_S, into: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Events up to and including the first for which ``stop(event)`` holds.
    With ``into``, events are appended there as they come (kept on timeout)."""
    events: list[dict[str, Any]] = [] if into is None else into
    start = len(events)
    async with asyncio.timeout(timeout):
        while True:
            event = orjson.loads(await ws.recv())
            events.append(event)
            if stop(event):
                return events[start:]


async def until_deltas(ws: Any, count: int, timeout: float = TIMEOUT_S) -> list[dict[str, Any]]:
    """Events until the ``count``-th delta (inclusive)."""
    seen = 0

    def enough(event: dict[str, Any]) -> bool:
        nonlocal seen
        seen += event["type"] == "delta"
        return seen >= count

    return await read_until(ws, enough, timeout)


async def until_done(ws: Any, timeout: float = TIMEOUT_S) -> list[dict[str, Any]]:
    return await read_until(ws, lambda e: e["type"] == "done", timeout)


async def expect_quiet(ws: Any) -> None:
    """Nothing is pending on the socket: a ping is answered before any event."""
    await ws.send('{"type":"ping"}')
    event = await recv_event(ws, 5)
    assert event["type"] == "pong", f"unexpected event before pong: {event}"


async def close_code(ws: Any, timeout: float = 10.0) -> tuple[list[dict[str, Any]], int | None]:
    """Read until the server closes the socket: the events before, and the close code."""
    events: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                events.append(orjson.loads(await ws.recv()))
    except ConnectionClosed as exc:
        return events, exc.rcvd.code if exc.rcvd is not None else None


def deltas_text(events: list[dict[str, Any]], generation_id: str | None = None) -> str:
    """The concatenated delta texts (of one generation, if given), checking
    that their ``seq`` numbers run 0, 1, 2... with none missing or repeated."""
    deltas = [
        e for e in events if e["type"] == "delta" and generation_id in (None, e["generation_id"])
    ]
    if generation_id is not None and deltas:
        assert [d["seq"] for d in deltas] == list(range(len(deltas))), "delta seq gap/dup"
    return "".join(d["text"] for d in deltas)


def event_log(server: RedisServer, thread: str, start: str = "-") -> list[dict[str, Any]]:
    """The thread's stored timeline (``chat:{T}:events``) as frames with id and n."""
    entries = server.client().xrange(f"chat:{{{thread}}}:events", start, "+")
    return [
        {"id": entry_id, "n": int(fields["n"]), **orjson.loads(fields["data"])}
        for entry_id, fields in entries
    ]


def history(server: RedisServer, thread: str) -> list[dict[str, str]]:
    """The thread's committed messages (``chat:{T}:history``), with their ids."""
    entries = server.client().xrange(f"chat:{{{thread}}}:history")
    return [{"id": entry_id, **fields} for entry_id, fields in entries]


def assert_matches_log(events: list[dict[str, Any]], server: RedisServer, thread: str) -> None:
    """Guarantee 1 and 2 for one client: the timeline events it received are
    exactly the thread's event log from its first received event on, in
    order: ids strictly increasing, no duplicate, no gap."""
    got = timeline(events)
    assert got, "the client received no timeline event"
    keys = [tuple(map(int, event_id.split("-"))) for event_id, _, _ in got]
    assert all(a < b for a, b in itertools.pairwise(keys)), "ids not increasing"
    stored = timeline(event_log(server, thread, got[0][0]))
    if got != stored:
        at = next((i for i, (a, b) in enumerate(zip(got, stored, strict=False)) if a != b), None)
        at = min(len(got), len(stored)) if at is None else at
        raise AssertionError(
            f"client timeline differs from the log at index {at} (client has {len(got)} "
            f"events, log {len(stored)}): client {got[max(0, at - 2) : at + 3]}, "
            f"log {stored[max(0, at - 2) : at + 3]}"
        )


def assert_turns_well_formed(server: RedisServer, thread: str) -> int:
    """Every turn in the event log is whole: user message, loading, deltas
    (seq 0..k), the assistant message whose content is the deltas' text, and
    ``done`` naming that message with the same status; and the history holds
    exactly those messages. Returns the number of turns."""
    log = event_log(server, thread)
    stored = {m["id"]: m for m in history(server, thread)}
    numbers = [e["n"] for e in log]
    if numbers:
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "n not contiguous"
    turns = 0
    i = 0
    while i < len(log):
        user = log[i]
        assert user["type"] == "message" and user["message"]["role"] == "user", user
        loading = log[i + 1]
        assert loading["type"] == "loading", loading
        generation = loading["generation_id"]
        j = i + 2
        while log[j]["type"] == "delta":
            j += 1
        text = deltas_text(log[i + 2 : j], generation)
        final, done = log[j], log[j + 1]
        assert final["type"] == "message" and final["message"]["role"] == "assistant", final
        assert final["message"]["content"] == text, (thread, generation)
        assert done["type"] == "done" and done["generation_id"] == generation, done
        assert done["message_id"] == final["id"] == final["message"]["id"]
        assert done["status"] == final["message"]["status"]
        for event in (user, final):
            entry = stored[event["id"]]
            assert entry["content"] == event["message"]["content"]
            assert entry["status"] == event["message"]["status"]
        turns += 1
        i = j + 2
    assert len(stored) == 2 * turns, "history holds messages the timeline does not show"
    return turns


def assert_idle(server: RedisServer, thread: str) -> None:
    """No stuck turn: no lock, no turn record, not in the reaper's index."""
    db = server.client()
    assert not db.exists(f"chat:{{{thread}}}:lock"), "stuck lock"
    assert not db.exists(f"chat:{{{thread}}}:turn"), "stuck turn record"
    assert db.zscore("chat:turns", thread) is None, "still in the turn index"


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start
