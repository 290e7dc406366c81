"""SIGTERM mid-turn, as Kubernetes sends it: the pod closes its sockets with
1012 (clients resume elsewhere with ``after``), lets running turns finish
within CHAT_DRAIN_GRACE_S, commits the rest as ``interrupted`` itself (no
reaper needed), and exits 0."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.client import ChatClient
from app.llm.fake import expected_reply
from tests.integration.helpers import (
    Stopwatch,
    assert_idle,
    assert_matches_log,
    assert_turns_well_formed,
    close_code,
    deltas_text,
    open_ready,
    stored_history,
    timeline,
    unique,
    until_deltas,
    until_done,
)

pytestmark = pytest.mark.integration

CLOSE_RESTART = 1012


async def test_a_turn_shorter_than_the_grace_completes_and_clients_resume_elsewhere(
    redis_server, pod_factory
):
    env = {"CHAT_FAKE_TOKEN_DELAY_MS": 20, "CHAT_FAKE_REPLY_TOKENS": 60}  # about 1.3 s
    draining = pod_factory(redis_server, **env)
    other = pod_factory(redis_server, **env)
    thread = unique("drain")
    observer, _ = await open_ready(other.ws, thread)
    sender, _ = await open_ready(draining.ws, thread)
    client = ChatClient([draining.ws, other.ws], thread)
    await client.connect()
    received: list[dict[str, Any]] = []
    exit_code: asyncio.Task[int] | None = None
    try:
        await sender.send('{"type":"prompt","content":"finish me"}')
        async with asyncio.timeout(20):
            async for event in client.events():
                received.append(event)
                if exit_code is None and sum(e["type"] == "delta" for e in received) == 2:
                    exit_code = asyncio.create_task(asyncio.to_thread(draining.terminate))
                if event["type"] == "done":
                    break
        before_close, code = await close_code(sender)
        everything = await until_done(observer)
        assert exit_code is not None
        assert await exit_code == 0
    finally:
        await client.close()
        await observer.close()
        await sender.close()
    assert code == CLOSE_RESTART
    assert before_close == everything[: len(before_close)]  # a prefix, in order
    # The client was closed 1012 and resumed on the other pod: every event
    # exactly once, the same as a client that never moved.
    assert client.reconnects >= 1
    assert [e.get("recovered") for e in received if e["type"] == "ready"][1:] == [True]
    assert timeline(received) == timeline(everything)
    assert received[-1]["status"] == "complete"
    generation = next(e["generation_id"] for e in everything if e["type"] == "loading")
    assert deltas_text(received, generation) == expected_reply("finish me", 60)
    assert_matches_log(received, redis_server, thread)
    assert assert_turns_well_formed(redis_server, thread) == 1
    assert_idle(redis_server, thread)
    # The pod ended the turn itself and only then stopped.
    logs = draining.logs()
    ended = logs.find(f"turn {generation} ended complete")
    assert 0 <= ended < logs.find(f"pod {draining.env['CHAT_POD_ID']} stopped"), logs[-2000:]


async def test_a_turn_longer_than_the_grace_is_committed_interrupted(redis_server, pod_factory):
    slow = {"CHAT_FAKE_TOKEN_DELAY_MS": 20, "CHAT_FAKE_REPLY_TOKENS": 200}  # about 4 s
    draining = pod_factory(redis_server, **slow, CHAT_DRAIN_GRACE_S=0.5)
    other = pod_factory(redis_server, **slow)
    threads = [unique("grace"), unique("grace")]
    senders = [(await open_ready(draining.ws, t))[0] for t in threads]
    watchers = [(await open_ready(other.ws, t))[0] for t in threads]
    try:
        for sender in senders:  # two turns on the draining pod at once
            await sender.send('{"type":"prompt","content":"too long to wait for"}')
        seen = list(await asyncio.gather(*(until_deltas(w, 2) for w in watchers)))
        clock = Stopwatch()
        assert await asyncio.to_thread(draining.terminate) == 0
        took = clock.elapsed
        # Committed by the draining pod before it exited (the lock lease is
        # 15 s and no other reaper ran): nothing is left to recover.
        for thread in threads:
            assert_idle(redis_server, thread)
        closes = [await close_code(s) for s in senders]
        for i, watcher in enumerate(watchers):
            seen[i] += await until_done(watcher, timeout=5)
    finally:
        for ws in senders + watchers:
            await ws.close()
    assert [code for _, code in closes] == [CLOSE_RESTART, CLOSE_RESTART]
    assert took < 0.5 + 2.5, f"the drain took {took:.1f}s, as if it waited for the turns"
    for thread, events in zip(threads, seen, strict=True):
        generation = next(e["generation_id"] for e in events if e["type"] == "loading")
        final, done = events[-2], events[-1]
        streamed = deltas_text(events, generation)
        assert final["message"]["status"] == "interrupted" and done["status"] == "interrupted"
        assert final["message"]["content"] == streamed != ""
        assert streamed != expected_reply("too long to wait for", 200)
        assert done["message_id"] == final["id"]
        assert_matches_log(events, redis_server, thread)
        stored = stored_history(redis_server, thread)
        assert [(m["role"], m["status"]) for m in stored] == [
            ("user", "complete"),
            ("assistant", "interrupted"),
        ]
        assert stored[1]["content"] == streamed
        assert assert_turns_well_formed(redis_server, thread) == 1
