"""Guarantee 6 on real processes: kill -9 of the pod running a turn.

The reaper (in every pod, one leader at a time) must close the dead turn
within CHAT_LOCK_TTL_MS + CHAT_REAPER_INTERVAL_MS: its streamed text kept as
an ``interrupted`` assistant message, then ``done``, once. Without a reaper,
the next prompt after the lease ran out closes the orphan itself.
"""

from __future__ import annotations

import asyncio

import pytest

from app.llm.fake import expected_reply
from tests.integration.followers import PyFollower
from tests.integration.helpers import (
    Stopwatch,
    assert_idle,
    assert_matches_log,
    assert_turns_well_formed,
    deltas_text,
    open_ready,
    read_until,
    stored_history,
    unique,
    until_deltas,
    until_done,
)
from tests.procs import wait_until

pytestmark = pytest.mark.integration

TTL_MS, REAPER_MS = 2000, 500
# 200 tokens at 20 ms: the turn would run about 4 s, far beyond the kill.
SLOW = {"CHAT_FAKE_TOKEN_DELAY_MS": 20, "CHAT_FAKE_REPLY_TOKENS": 200}
LEASES = {"CHAT_LOCK_TTL_MS": TTL_MS, "CHAT_REAPER_INTERVAL_MS": REAPER_MS}
# The survivor answers new prompts fast (its own fake model settings).
QUICK = {"CHAT_FAKE_TOKEN_DELAY_MS": 1, "CHAT_FAKE_REPLY_TOKENS": 50}
MARGIN_S = 1.5


async def test_kill_9_mid_turn_is_closed_by_the_reaper_within_ttl_plus_interval(
    redis_server, pod_factory
):
    doomed = pod_factory(redis_server, **SLOW, **LEASES)
    survivor = pod_factory(redis_server, **QUICK, **LEASES)
    thread = unique("crash")
    sender, _ = await open_ready(doomed.ws, thread)
    watcher, _ = await open_ready(survivor.ws, thread)
    # A client of the doomed pod: it must fail over and miss nothing.
    roaming = await PyFollower([doomed.ws, survivor.ws], thread).start()
    roamed = roaming.events
    try:
        await sender.send('{"type":"prompt","content":"die mid-sentence"}')
        seen = await until_deltas(watcher, 5)
        generation = next(e["generation_id"] for e in seen if e["type"] == "loading")
        # The harder case: the dead pod also led the reapers (it started
        # first), so the survivor must take the leader lease over first.
        leader = redis_server.client().get("chat:reaper:leader")
        assert leader == f"pod:{doomed.env['CHAT_POD_ID']}", leader
        doomed.kill()
        clock = Stopwatch()
        seen += await until_done(watcher, timeout=TTL_MS / 1000 + REAPER_MS / 1000 + 10)
        recovered_in = clock.elapsed
        final, done = seen[-2], seen[-1]
        # Exactly: the assistant message (interrupted, the text streamed so
        # far), then done; no other event in between, none missing.
        assert [e["type"] for e in seen[-2:]] == ["message", "done"]
        assert final["message"]["role"] == "assistant"
        assert final["message"]["status"] == "interrupted"
        streamed = deltas_text(seen, generation)
        assert final["message"]["content"] == streamed
        assert len(streamed) > 0 and expected_reply("die mid-sentence", 200).startswith(streamed)
        assert done["status"] == "interrupted" and done["generation_id"] == generation
        assert done["message_id"] == final["id"] == final["message"]["id"]
        assert recovered_in < (TTL_MS + REAPER_MS) / 1000 + MARGIN_S, recovered_in
        assert_matches_log(seen, redis_server, thread)
        assert_idle(redis_server, thread)

        # The thread is free: a new prompt on the surviving pod completes.
        await watcher.send('{"type":"prompt","content":"and now?"}')
        after = await until_done(watcher)
        assert after[-1]["status"] == "complete"
        assert after[-2]["message"]["content"] == expected_reply("and now?", 50)

        # The client of the dead pod resumed on the survivor: the same
        # timeline, each event once, through to the second turn's done.
        await roaming.until(
            lambda events: any(e.get("id") == after[-1]["id"] for e in events), 10,
            what="the roaming client to reach the second turn's done",
        )  # fmt: skip
    finally:
        await roaming.stop()
        await watcher.close()
        await sender.close()
    assert roaming.client.reconnects >= 1
    assert any(e["type"] == "ready" and e.get("recovered") is True for e in roamed)
    assert_matches_log(roamed, redis_server, thread)
    # One assistant message for the killed turn, committed once.
    stored = stored_history(redis_server, thread)
    assert [(m["role"], m["status"]) for m in stored] == [
        ("user", "complete"),
        ("assistant", "interrupted"),
        ("user", "complete"),
        ("assistant", "complete"),
    ]
    assert stored[1]["content"] == streamed and stored[1]["id"] == final["id"]
    assert assert_turns_well_formed(redis_server, thread) == 2
    assert_idle(redis_server, thread)


async def test_without_a_reaper_the_next_prompt_closes_the_dead_turn(redis_server, pod_factory):
    """The reaper is off everywhere: after the dead turn's lease ran out, a
    prompt on another pod closes it (interrupted, then done) before its own
    turn starts; while the lease lives, the prompt is told thread_busy."""
    no_reaper = {"CHAT_REAPER_IN_POD": 0, "CHAT_LOCK_TTL_MS": TTL_MS}
    doomed = pod_factory(redis_server, **SLOW, **no_reaper)
    survivor = pod_factory(redis_server, **QUICK, **no_reaper)
    thread = unique("orphan")
    sender, _ = await open_ready(doomed.ws, thread)
    watcher, _ = await open_ready(survivor.ws, thread)
    try:
        await sender.send('{"type":"prompt","content":"cut me off"}')
        seen = await until_deltas(watcher, 1)
        generation = next(e["generation_id"] for e in seen if e["type"] == "loading")
        doomed.kill()
        # The dead turn's lease still runs: one writer at a time.
        await watcher.send('{"type":"prompt","content":"too early"}')
        busy = await read_until(watcher, lambda e: e["type"] == "error")
        seen += busy[:-1]
        assert (busy[-1]["type"], busy[-1]["code"], busy[-1]["retryable"]) == (
            "error",
            "thread_busy",
            True,
        )
        db = redis_server.client()
        await asyncio.to_thread(
            wait_until,
            lambda: not db.exists(f"chat:{{{thread}}}:lock"),
            TTL_MS / 1000 + 5,
            what="the dead turn's lease to run out",
        )
        await asyncio.sleep(0.5)  # no reaper: nothing happens by itself
        assert db.exists(f"chat:{{{thread}}}:turn")
        await watcher.send('{"type":"prompt","content":"take over"}')
        seen += await until_done(watcher)  # the orphan's done
        interrupted_at = len(seen)
        seen += await until_done(watcher)  # the new turn's done
    finally:
        await watcher.close()
        await sender.close()
    orphan_final, orphan_done = seen[interrupted_at - 2], seen[interrupted_at - 1]
    assert orphan_final["message"]["status"] == "interrupted"
    assert orphan_final["message"]["content"] == deltas_text(seen[:interrupted_at], generation)
    assert orphan_done["generation_id"] == generation and orphan_done["status"] == "interrupted"
    new_turn = seen[interrupted_at:]
    assert new_turn[0]["message"]["content"] == "take over"
    assert new_turn[-1]["status"] == "complete"
    assert new_turn[-2]["message"]["content"] == expected_reply("take over", 50)
    assert_matches_log(seen, redis_server, thread)
    assert assert_turns_well_formed(redis_server, thread) == 2
    assert "too early" not in [m["content"] for m in stored_history(redis_server, thread)]
    assert_idle(redis_server, thread)
