"""``cancel`` stops the thread's running turn wherever it runs: sent on one
pod, it ends a turn running on another, quickly, with the text streamed so
far committed as a ``cancelled`` assistant message, then ``done``."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.helpers import (
    Stopwatch,
    assert_idle,
    assert_matches_log,
    assert_turns_well_formed,
    deltas_text,
    open_ready,
    read_until,
    recv_event,
    stored_history,
    timeline,
    unique,
    until_deltas,
    until_done,
)

pytestmark = pytest.mark.integration

# 200 tokens at 20 ms: a turn runs about 4 s, so an answer to a cancel well
# under a second cannot be the turn ending by itself.
SLOW = {"CHAT_FAKE_TOKEN_DELAY_MS": 20, "CHAT_FAKE_REPLY_TOKENS": 200}
QUICKLY_S = 1.0


def _check_cancelled(events: list[dict], generation: str) -> str:
    final, done = events[-2], events[-1]
    assert final["type"] == "message" and final["message"]["role"] == "assistant"
    assert final["message"]["status"] == "cancelled"
    assert done["type"] == "done" and done["status"] == "cancelled"
    assert done["generation_id"] == generation and done["message_id"] == final["id"]
    streamed = deltas_text(events, generation)
    assert final["message"]["content"] == streamed != ""
    return streamed


async def _cancel(
    canceller: Any, seen: list[dict], other_seen: list[dict], other: Any, frame: str
) -> tuple[list[dict], list[dict], str]:
    """Send ``frame`` (a cancel) on ``canceller`` while a turn streams; both
    sockets must see it end ``cancelled`` within QUICKLY_S. Returns what
    ``other`` and ``canceller`` saw of the turn, and its streamed text."""
    generation = next(e["generation_id"] for e in seen + other_seen if e["type"] == "loading")
    clock = Stopwatch()
    await canceller.send(frame)
    seen = seen + await until_done(canceller, timeout=5)
    took = clock.elapsed
    other_seen = other_seen + await until_done(other, timeout=5)
    assert took < QUICKLY_S, f"the cancel took {took:.2f}s"
    streamed = _check_cancelled(seen, generation)
    assert _check_cancelled(other_seen, generation) == streamed
    return other_seen, seen, streamed


async def test_cancel_sent_to_the_other_pod_stops_the_turn(redis_server, pod_factory):
    pod_a = pod_factory(redis_server, **SLOW)
    pod_b = pod_factory(redis_server, **SLOW)
    thread = unique("cancel")
    on_a, _ = await open_ready(pod_a.ws, thread)
    on_b, _ = await open_ready(pod_b.ws, thread)
    try:
        # Nothing runs yet: nothing to cancel.
        await on_b.send('{"type":"cancel"}')
        idle = await recv_event(on_b)
        assert (idle["type"], idle["code"]) == ("error", "not_found")

        # Turn 1 runs on pod A (prompted there); pod B cancels it.
        await on_a.send('{"type":"prompt","content":"stop me"}')
        seen_b = await until_deltas(on_b, 3)
        generation = next(e["generation_id"] for e in seen_b if e["type"] == "loading")
        # A cancel for another generation does not touch this one.
        await on_b.send('{"type":"cancel","generation_id":"not-this-one"}')
        seen_b += await read_until(on_b, lambda e: e["type"] == "error")
        assert seen_b[-1]["code"] == "not_found"
        seen_b = seen_b[:-1]
        seen_b += await until_deltas(on_b, 1)  # still streaming
        seen_a, seen_b, turn_1 = await _cancel(on_b, seen_b, [], on_a, '{"type":"cancel"}')
        assert seen_a == seen_b  # the same events, in the same order, on both pods

        # The thread is free at once: turn 2 runs on pod B, pod A cancels it
        # by its generation id.
        await on_b.send('{"type":"prompt","content":"and me"}')
        seen_a2 = await until_deltas(on_a, 2)
        generation2 = next(e["generation_id"] for e in seen_a2 if e["type"] == "loading")
        assert generation2 != generation
        cancel = f'{{"type":"cancel","generation_id":"{generation2}"}}'
        seen_b2, seen_a2, turn_2 = await _cancel(on_a, seen_a2, [], on_b, cancel)
        assert timeline(seen_a2) == timeline(seen_b2)
    finally:
        await on_a.close()
        await on_b.close()
    assert_matches_log(seen_a + seen_a2, redis_server, thread)
    stored = stored_history(redis_server, thread)
    assert [(m["role"], m["status"]) for m in stored] == [
        ("user", "complete"),
        ("assistant", "cancelled"),
        ("user", "complete"),
        ("assistant", "cancelled"),
    ]
    assert [stored[1]["content"], stored[3]["content"]] == [turn_1, turn_2]
    assert assert_turns_well_formed(redis_server, thread) == 2
    assert_idle(redis_server, thread)
