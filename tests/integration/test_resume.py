"""Guarantee 2 on real pods: a client that reconnects (to any pod) with
``after`` and ``epoch``, or sends ``resume`` on a live socket, gets exactly
the events it missed and then the live ones; when they cannot all be had
(another epoch, trimmed past the retention window) it is told so, never
left with a silent hole."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.client import ChatClient
from tests.integration.helpers import (
    EPHEMERAL,
    assert_matches_log,
    expect_quiet,
    open_ready,
    read_until,
    recv_event,
    stored_events,
    unique,
    until_deltas,
    until_done,
)

pytestmark = pytest.mark.integration

# 80 tokens at 10 ms, coalesced over 25 ms: about 30 deltas in about 1 s.
ENV = {"CHAT_FAKE_TOKEN_DELAY_MS": 10, "CHAT_FAKE_REPLY_TOKENS": 80}


def _key(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


def _query(after: str, epoch: str) -> str:
    return f"?after={after}&epoch={epoch}"


async def _replay(ws: Any, count: int) -> list[dict[str, Any]]:
    return [await recv_event(ws) for _ in range(count)]


async def test_resume_mid_turn_after_the_turn_and_on_a_live_socket(redis_server, pod_factory):
    pod_a = pod_factory(redis_server, **ENV)
    pod_b = pod_factory(redis_server, **ENV)
    thread = unique("resume")
    observer, ready = await open_ready(pod_b.ws, thread)
    epoch = ready["epoch"]
    leaver, _ = await open_ready(pod_a.ws, thread)  # closes politely, back on pod B
    dropped, _ = await open_ready(pod_a.ws, thread)  # its connection dies, back on pod A
    sockets = [observer, leaver, dropped]
    try:
        await leaver.send('{"type":"prompt","content":"resume me"}')
        before_1 = await until_deltas(leaver, 3)
        await leaver.close()
        before_2 = await until_deltas(dropped, 8)
        dropped.transport.abort()
        generation = before_1[1]["generation_id"]

        back_1, ready_1 = await open_ready(pod_b.ws, thread, _query(before_1[-1]["id"], epoch))
        back_2, ready_2 = await open_ready(pod_a.ws, thread, _query(before_2[-1]["id"], epoch))
        sockets += [back_1, back_2]
        for again in (ready_1, ready_2):
            assert again["recovered"] is True and again["epoch"] == epoch
            assert again["generating"] is True and again["generation_id"] == generation
        after_1, after_2 = await until_done(back_1), await until_done(back_2)
        everything = await until_done(observer)
        # What each had, then what it was sent: the uninterrupted observer's
        # events exactly (whole frames: same ids, numbers and contents).
        assert before_1 + after_1 == everything
        assert before_2 + after_2 == everything
        assert_matches_log(everything, redis_server, thread)
        done_id = everything[-1]["id"]

        # After the turn: the rest of it, then nothing more (until live).
        late, ready_3 = await open_ready(pod_b.ws, thread, _query(before_1[-1]["id"], epoch))
        sockets.append(late)
        assert ready_3["recovered"] is True and ready_3["generating"] is False
        assert await _replay(late, len(after_1)) == after_1
        await expect_quiet(late)
        # Resuming from the newest event: nothing to replay.
        current, ready_4 = await open_ready(pod_a.ws, thread, _query(done_id, epoch))
        sockets.append(current)
        assert ready_4["recovered"] is True and ready_4["last_event_id"] == done_id
        await expect_quiet(current)

        # Another epoch, or an id the thread never had: never silently resumed.
        for query in (
            _query(before_1[-1]["id"], "another-epoch"),
            _query("99999999999999-0", epoch),
        ):
            refused, ready_5 = await open_ready(pod_b.ws, thread, query)
            sockets.append(refused)
            assert ready_5["recovered"] is False and ready_5["last_event_id"] == done_id
            await expect_quiet(refused)  # no replay from a wrong place

        # `resume` on a live socket: a replay from the given id, then live
        # events continue with no duplicate of the replay.
        await current.send(f'{{"type":"resume","after":"{before_2[-1]["id"]}","epoch":"{epoch}"}}')
        assert await _replay(current, len(after_2)) == after_2
        await expect_quiet(current)
        await current.send(f'{{"type":"resume","after":"{before_2[-1]["id"]}","epoch":"nope"}}')
        gap = await recv_event(current)
        assert (gap["type"], gap["code"]) == ("error", "resume_gap")
        await current.send('{"type":"prompt","content":"live again"}')
        second_turn = await until_done(current)
        assert_matches_log(everything + second_turn, redis_server, thread)
    finally:
        for ws in sockets:
            await ws.close()


async def test_resume_beyond_the_retention_window_is_refused_loudly(redis_server, pod_factory):
    # 120 tokens, one delta each: about 125 events a turn, more than the
    # retention of 100, so a turn's end trims what came before it.
    pod = pod_factory(
        redis_server, CHAT_EVENT_RETENTION=100, CHAT_FAKE_REPLY_TOKENS=120,
        CHAT_FAKE_TOKEN_DELAY_MS=2, CHAT_DELTA_WINDOW_MS=0,
    )  # fmt: skip
    thread = unique("trim")
    ws, ready = await open_ready(pod.ws, thread)
    epoch = ready["epoch"]
    sockets = [ws]
    try:
        await ws.send('{"type":"prompt","content":"first"}')
        old = (await until_done(ws))[1]["id"]  # the first turn's `loading`
        for i in range(6):  # until the first turn is trimmed away (two turns, here)
            await ws.send(f'{{"type":"prompt","content":"more {i}"}}')
            await until_done(ws)
            if _key(stored_events(redis_server, thread)[0]["id"]) > _key(old):
                break
        log = stored_events(redis_server, thread)
        assert _key(log[0]["id"]) > _key(old), "nothing was trimmed"
        newest = log[-1]["id"]

        # A `resume` from a trimmed id: resume_gap, and the socket lives on.
        await ws.send(f'{{"type":"resume","after":"{old}","epoch":"{epoch}"}}')
        gap = await recv_event(ws)
        assert (gap["type"], gap["code"], gap["retryable"]) == ("error", "resume_gap", False)
        await expect_quiet(ws)
        # Reconnecting from it: recovered false, and no partial replay.
        stale, ready_2 = await open_ready(pod.ws, thread, _query(old, epoch))
        sockets.append(stale)
        assert ready_2["recovered"] is False and ready_2["last_event_id"] == newest
        await expect_quiet(stale)
        # The client library resets itself to "now" and says so.
        client = ChatClient([pod.ws], thread)
        client.last_event_id, client.epoch = old, epoch
        await client.connect()
        try:
            first = await anext(client.events())
            assert first["type"] == "ready" and first["recovered"] is False
            assert client.last_event_id == newest
        finally:
            await client.close()

        # The running turn is always resumable, even when it alone holds more
        # events than the retention window.
        await ws.send('{"type":"prompt","content":"long one"}')
        head = await until_deltas(ws, 110)
        loading = head[1]["id"]
        mid, ready_3 = await open_ready(pod.ws, thread, _query(loading, epoch))
        sockets.append(mid)
        assert ready_3["recovered"] is True and ready_3["generating"] is True
        rest = await until_done(ws)
        caught_up = await read_until(mid, lambda e: e["type"] == "done")
        assert caught_up == head[2:] + rest
        assert len(head + rest) > 100
    finally:
        for socket in sockets:
            await socket.close()


async def test_the_client_library_away_for_a_whole_turn_misses_nothing(redis_server, pod_factory):
    """A ChatClient that joined an idle thread and saw no event yet still
    knows where it is (the ``ready``'s last event): if its connection drops
    and a whole turn happens meanwhile, it resumes on the next pod with
    ``after`` and gets that turn. On a thread that had no event at all when
    it joined, it may instead be told ``recovered: false``, but never left
    with a silent hole."""
    quick = {"CHAT_FAKE_TOKEN_DELAY_MS": 1, "CHAT_FAKE_REPLY_TOKENS": 20}
    pod_a, pod_b = pod_factory(redis_server, **quick), pod_factory(redis_server, **quick)
    for has_past in (True, False):
        thread = unique("away")
        other, _ = await open_ready(pod_b.ws, thread)
        if has_past:
            await other.send('{"type":"prompt","content":"before you came"}')
            await until_done(other)
        client = ChatClient([pod_a.ws, pod_b.ws], thread)
        await client.connect()
        events = (e async for e in client.events() if e["type"] not in EPHEMERAL)
        try:
            first = await anext(events)
            assert first["type"] == "ready" and "recovered" not in first
            client._ws.transport.abort()  # events() notices on its next read
            await other.send('{"type":"prompt","content":"while you were away"}')
            missed = await until_done(other)
            async with asyncio.timeout(10):
                again = await anext(events)
                assert again["type"] == "ready" and client.reconnects == 1
                if has_past or again["recovered"] is True:
                    assert again["recovered"] is True
                    got = [await anext(events) for _ in missed]
                    assert got == missed
                else:
                    assert again["recovered"] is False  # told, not fooled
        finally:
            await client.close()
            await other.close()
