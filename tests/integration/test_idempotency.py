"""Guarantee 5 across pods: a prompt repeated with the same ``client_msg_id``
(say, after a reconnect to another pod) appends nothing and starts no second
turn; the sender gets the original ``message`` event again."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from app.chat import keys
from tests.integration.followers import PyFollower
from tests.integration.helpers import (
    assert_idle,
    assert_matches_log,
    assert_turns_well_formed,
    expect_quiet,
    of_type,
    open_ready,
    recv_event,
    stored_events,
    stored_history,
    unique,
    until_deltas,
    until_done,
)

pytestmark = pytest.mark.integration


def _users(redis_server: Any, thread: str) -> list[dict[str, str]]:
    return [m for m in stored_history(redis_server, thread) if m["role"] == "user"]


async def test_a_repeated_prompt_on_another_pod_returns_the_original(redis_server, pod_factory):
    env = {"CHAT_FAKE_TOKEN_DELAY_MS": 10, "CHAT_FAKE_REPLY_TOKENS": 60}
    pod_a, pod_b = pod_factory(redis_server, **env), pod_factory(redis_server, **env)
    thread = unique("idem")
    a, _ = await open_ready(pod_a.ws, thread)
    b, _ = await open_ready(pod_b.ws, thread)
    try:
        frame = orjson.dumps({"type": "prompt", "content": "once", "client_msg_id": "X-1"})
        await a.send(frame.decode())
        # Repeated on pod B while the turn still runs: the original message,
        # not thread_busy, and no second turn.
        seen_b = await until_deltas(b, 1)
        original = seen_b[0]
        assert original["type"] == "message" and original["message"]["client_msg_id"] == "X-1"
        await b.send(frame.decode())
        seen_b += await until_done(b)
        repeats = [e for e in seen_b if e.get("id") == original["id"]]
        assert repeats == [original, original], "expected the original message once more"
        seen_a = await until_done(a)
        # Repeated on pod B after the turn: the original again, then nothing.
        await b.send(frame.decode())
        assert await recv_event(b) == original
        await expect_quiet(b)
        # And on pod A, where it was first sent.
        await a.send(frame.decode())
        assert await recv_event(a) == original
        await expect_quiet(a)
    finally:
        await a.close()
        await b.close()
    assert_matches_log(seen_a, redis_server, thread)
    users = _users(redis_server, thread)
    assert [(u["id"], u["client_msg_id"]) for u in users] == [(original["id"], "X-1")]
    assert sum(e["type"] == "loading" for e in stored_events(redis_server, thread)) == 1
    assert assert_turns_well_formed(redis_server, thread) == 1


def _mine(received: list[dict[str, Any]], cmid: str) -> list[int]:
    """Where in ``received`` the message of the client's prompt ``cmid`` is."""
    return [
        i
        for i, e in enumerate(received)
        if e["type"] == "message" and e["message"].get("client_msg_id") == cmid
    ]


def _settled(redis_server: Any, thread: str, events: list[dict[str, Any]], cmid: str) -> bool:
    """The client, reconnected (a second ``ready``), has seen its own
    prompt's message and then a ``done`` that is the thread's last event."""
    mine = _mine(events, cmid)
    if len(of_type(events, "ready")) < 2 or not mine:
        return False
    dones = [e["id"] for e in events[mine[0] :] if e["type"] == "done"]
    last = redis_server.client().xrevrange(keys.events(keys.thread_id(thread)), count=1)
    return bool(dones and last and last[0][0] == dones[-1])


async def test_a_client_cut_off_while_prompting_gets_its_prompt_appended_once(
    redis_server, pod_factory
):
    """The client library re-sends an unconfirmed prompt after reconnecting
    to the next pod. Whether the first copy reached pod A or not, and whether
    A's turn had committed when B saw the copy, the thread gets it once."""
    env = {"CHAT_FAKE_TOKEN_DELAY_MS": 1, "CHAT_FAKE_REPLY_TOKENS": 20}
    pod_a, pod_b = pod_factory(redis_server, **env), pod_factory(redis_server, **env)
    for round_, delay in enumerate((0, 0.001, 0.003, 0.01, 0.03)):
        thread = unique(f"cut{round_}")
        # A thread with a past (the client joins it idle, after its last event).
        primer, _ = await open_ready(pod_b.ws, thread)
        await primer.send('{"type":"prompt","content":"earlier"}')
        await until_done(primer)
        await primer.close()
        rec = await PyFollower([pod_a.ws, pod_b.ws], thread).start()
        try:
            cmid = await rec.client.prompt(f"round {round_}")
            await asyncio.sleep(delay)
            rec.client._ws.transport.abort()  # the network drops, mid-prompt or just after
            # Settled when the client has the done of its own prompt's turn,
            # however long the reconnect takes on a loaded machine.
            await rec.until(
                lambda ev, t=thread, c=cmid: _settled(redis_server, t, ev, c), 20, "its turn"
            )
        finally:
            await rec.stop()
        users = _users(redis_server, thread)
        assert [u.get("client_msg_id") for u in users] == [None, cmid], f"round {round_}"
        mine = _mine(rec.events, cmid)
        assert len(mine) == 1, f"round {round_}: the client saw its message {len(mine)} times"
        assert_matches_log(rec.events, redis_server, thread)
        assert assert_turns_well_formed(redis_server, thread) == 2
        assert_idle(redis_server, thread)
