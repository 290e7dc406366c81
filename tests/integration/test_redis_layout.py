"""The Redis key layout of app/chat/keys.py, as an operator sees it in
redis-cli after real turns on a real pod: only documented keys, of the
documented types, and no lock or turn left once the thread is free."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

from app.chat import keys, scripts
from app.chat.usage import utc_day
from tests.integration.helpers import (
    KEY_LAYOUT,
    Event,
    open_ready,
    recv_event,
    turn,
    undocumented,
    unique,
)
from tests.procs import wait_until

# The sha a pod's presence reads and renewals run as (RENEW_PRESENCE).
PRESENCE_READS = hashlib.sha1(scripts.RENEW_PRESENCE.encode()).hexdigest()

TYPES = {
    "history": "stream",
    "events": "stream",
    "fence": "string",
    "meta": "hash",
    "members": "set",
    "dedup": "hash",
    "tree": "hash",
    "reads": "hash",  # the assistant's replies are unread for the member
}


async def test_keys_after_turns_follow_the_documented_layout(redis_server, pod_factory):
    pod = pod_factory(redis_server, CHAT_FAKE_REPLY_TOKENS=4, CHAT_FAKE_TOKEN_DELAY_MS=1)
    started_ms = int(time.time() * 1000)
    thread = unique("layout")
    ws, ready = await open_ready(pod.ws, thread)
    try:
        first = await turn(ws, "plain prompt")
        second = await turn(ws, "idempotent prompt", client_msg_id="cm-1")
    finally:
        await ws.close()
    db = redis_server.client()
    found = set(db.keys("*"))

    assert not undocumented(found), undocumented(found)
    for key in found:
        match = KEY_LAYOUT.fullmatch(key)
        assert match is not None
        if match.group("thread") is not None:
            assert match.group("thread") == thread, key  # no other thread exists
        if match.group("user") is not None:
            assert match.group("user") == "anonymous", key  # auth off

    t = f"chat:{{{thread}}}:"
    required = {t + suffix for suffix in TYPES} | {"chat:user:{anonymous}:threads"}
    assert required <= found, sorted(required - found)
    # With auth off nothing else: no quota or socket counters for ``anonymous``,
    # only the tokens of the day, and the socket's presence until its pod
    # has seen it close.
    day = f"chat:user:{{anonymous}}:usage:{utc_day()}"
    optional = {"chat:reaper:leader", "chat:turns", day, t + "presence", t + "context"}
    assert found - required <= optional, sorted(found - required)
    for suffix, kind in TYPES.items():
        assert db.type(t + suffix) == kind, suffix

    # The thread is free: no lock, no running-turn record, not in the reaper's index.
    assert t + "lock" not in found and t + "turn" not in found
    assert "chat:turns" not in found or db.zscore("chat:turns", thread) is None

    history = db.xrange(t + "history")
    assert [f["role"] for _, f in history] == ["user", "assistant"] * 2
    assert [i for i, _ in history] == [
        first[0]["id"], first[-1]["message_id"], second[0]["id"], second[-1]["message_id"],
    ]  # fmt: skip
    assert history[2][1]["client_msg_id"] == "cm-1"

    meta = db.hgetall(t + "meta")
    assert {"epoch", "last_event_id", "event_n", "message_count"} <= meta.keys(), meta
    assert meta["epoch"] == ready["epoch"]
    assert meta["last_event_id"] == second[-1]["id"]
    assert int(meta["event_n"]) == second[-1]["n"]
    assert int(meta["message_count"]) == 4
    # Usage: the thread's totals and the user's day agree with the turns'
    # done.usage, and no charge is left in the outbox.
    spent = [e["usage"] for e in (first[-1], second[-1])]
    assert int(meta["input_tokens"]) == sum(u["input_tokens"] for u in spent)
    assert int(meta["output_tokens"]) == sum(u["output_tokens"] for u in spent) == 8
    today = db.hgetall(day)
    assert int(today["input_tokens"]) == int(meta["input_tokens"])
    assert int(today["output_tokens"]) == 8 and int(today["turns"]) == 2
    assert t + "usage" not in found
    # Where the model's context starts (the thread's first message: it fits),
    # kept a while for the next turn's prompt cache.
    assert db.get(t + "context") == history[0][0]
    assert 0 < db.ttl(t + "context") <= 3600

    events = db.xrange(t + "events")
    seen = [e for e in first + second if "id" in e]
    assert [i for i, _ in events] == [e["id"] for e in seen]
    assert [e["n"] for e in seen] == list(range(seen[0]["n"], seen[0]["n"] + len(seen)))

    assert int(db.get(t + "fence")) >= 2  # one grant per turn
    assert db.smembers(t + "members") == {"anonymous"}
    active = db.zscore("chat:user:{anonymous}:threads", thread)
    assert active is not None and started_ms <= active <= time.time() * 1000  # ms, as all scores
    assert db.hgetall(t + "dedup") == {"cm-1": second[0]["id"]}
    assert 0 < db.ttl(t + "dedup") <= 86400  # expires (CHAT_DEDUP_TTL_S)


def _commands_until(monitor: Any, marker: str) -> list[dict[str, Any]]:
    """What MONITOR saw up to the ``ECHO marker`` (Redis runs commands one at
    a time, so every command sent before the marker is in the list)."""
    seen = []
    for command in monitor.listen():
        if command["command"] == f"ECHO {marker}":
            return seen
        seen.append(command)
    return seen


async def test_a_connect_is_one_round_trip_on_a_followed_thread(redis_server, pod_factory):
    """Round trips a real pod sends a real Redis for a connect, counted with
    MONITOR (commands scripts run are not round trips: left out): a thread new
    to the pod is its SUBSCRIBE and one JOIN_THREAD (here the thread is new to
    Redis too: created by it); a thread the pod follows, one; a resume with
    ``after``, one, the missed events included."""
    pod = pod_factory(redis_server, CHAT_FAKE_REPLY_TOKENS=3, CHAT_FAKE_TOKEN_DELAY_MS=0)
    warm, _ = await open_ready(pod.ws, unique("warm"))  # connections, scripts loaded
    db, marker = redis_server.client(), unique("marker")
    thread = unique("counted")
    sockets = [warm]

    async def counted(query: str = "") -> tuple[Event, list[str]]:
        with redis_server.client().monitor() as monitor:
            ws, ready = await open_ready(pod.ws, thread, query)
            sockets.append(ws)
            db.echo(marker)
            seen = await asyncio.to_thread(_commands_until, monitor, marker)
        ours = [c["command"] for c in seen if c.get("client_type") != "lua"]
        # An earlier socket's join is read again (presence) 200 ms after it,
        # with every thread nudged meanwhile: not this connect's round trip.
        ours = [c for c in ours if not c.startswith(f"EVALSHA {PRESENCE_READS} ")]
        return ready, [c for c in ours if f"{{{thread}}}" in c]

    try:
        ready, new = await counted()
        assert [c.split()[0] for c in new] == ["SUBSCRIBE", "EVALSHA"], new
        ready, followed = await counted()
        assert [c.split()[0] for c in followed] == ["EVALSHA"], followed
        events = await turn(sockets[-1], "hello")
        # The turn's last writes (its auto-title, its usage settled) are off
        # the turn's path: not in the resume's count.
        meta = keys.meta(keys.thread_id(thread))
        await asyncio.to_thread(wait_until, lambda: db.hget(meta, "title"), 10, what="the title")
        usage, record = f"chat:{{{thread}}}:usage", f"chat:{{{thread}}}:turn"
        await asyncio.to_thread(
            wait_until, lambda: not db.exists(usage, record), 10, what="the turn settled"
        )
        ready, resumed = await counted(f"?after={events[0]['id']}&epoch={ready['epoch']}")
        assert [c.split()[0] for c in resumed] == ["EVALSHA"], resumed
        assert ready["recovered"] is True
        replay = [await recv_event(sockets[-1]) for _ in events[1:]]
        assert [e["id"] for e in replay] == [e["id"] for e in events[1:]]
    finally:
        for ws in sockets:
            await ws.close()
