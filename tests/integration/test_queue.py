"""Prompts while a turn runs, on real pods: the owner's prompt_policy
(``reject``, ``queue``, ``interrupt``, set over REST), the durable queue
(``queued``/``unqueued`` events, ``ready.queue``, ``message.queue_id``),
every queued prompt run exactly once and in order on whichever pod frees the
thread, even when its sender left or the pod running the turn is killed,
``queue_full``, cancelling a queued prompt (its sender, the owner, nobody
else), and repeats of a queued prompt's ``client_msg_id``."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import httpx
import pytest

from app.chat import keys
from tests import procs
from tests.integration.helpers import (
    Event,
    assert_matches_log,
    open_ready,
    read_until,
    recv_event,
    send,
    stored_events,
)
from tests.integration.shared_pods import module_pods_on_redis
from tests.integration.tokens import AUTH_ENV, bearer

pytestmark = pytest.mark.integration

# A turn of about a second: long enough for others to prompt meanwhile.
ENV = dict(
    AUTH_ENV, CHAT_FAKE_REPLY_TOKENS=40, CHAT_FAKE_TOKEN_DELAY_MS=25,
    CHAT_RATE_PROMPTS_PER_MIN=0, CHAT_MAX_QUEUED=3,
)  # fmt: skip


pods_and_redis = module_pods_on_redis("queue", 3, **ENV)


@pytest.fixture(scope="module")
def redis_db(pods_and_redis: tuple[procs.RedisServer, list[procs.Server]]) -> procs.RedisServer:
    return pods_and_redis[0]


@pytest.fixture(scope="module")
def three_pods(pods_and_redis: tuple[procs.RedisServer, list[procs.Server]]) -> list[procs.Server]:
    return pods_and_redis[1]


async def new_thread(pod: Any, policy: str, *members: str) -> str:
    """A thread owned by alice, with ``members`` and ``policy``."""
    thread = f"q-{secrets.token_hex(5)}"
    async with httpx.AsyncClient(base_url=pod.http, headers=bearer("alice"), timeout=10) as http:
        assert (await http.post("/v1/threads", json={"id": thread})).status_code == 201
        for member in members:
            assert (await http.put(f"/v1/threads/{thread}/members/{member}")).status_code == 204
        reply = await http.patch(f"/v1/threads/{thread}", json={"prompt_policy": policy})
        assert reply.status_code == 200 and reply.json()["prompt_policy"] == policy
    return thread


async def join(pod: Any, thread: str, user: str) -> tuple[Any, Event]:
    return await open_ready(pod.ws, thread, additional_headers=bearer(user))


async def until(ws: Any, kind: str, **fields: Any) -> Event:
    """The next event of type ``kind`` whose ``fields`` match (others are skipped)."""
    events = await read_until(
        ws, lambda e: e["type"] == kind and all(e.get(k) == v for k, v in fields.items())
    )
    return events[-1]


def dones(count: int) -> Any:
    seen = 0

    def enough(event: Event) -> bool:
        nonlocal seen
        seen += event["type"] == "done"
        return seen >= count

    return enough


def turns_of(log: list[Event]) -> list[tuple[str | None, str, str]]:
    """(queue_id, content, status) of every turn in an event log, in order."""
    out = []
    for i, event in enumerate(log):
        if event["type"] == "message" and event["message"]["role"] == "user":
            done = next(e for e in log[i:] if e["type"] == "done")
            out.append(
                (event["message"].get("queue_id"), event["message"]["content"], done["status"])
            )
    return out


async def test_three_users_on_three_pods_queue_and_run_once_in_order(three_pods, redis_db) -> None:
    thread = await new_thread(three_pods[0], "queue", "bob", "carol")
    users = ["alice", "bob", "carol"]
    sockets = [
        (await join(pod, thread, user))[0] for pod, user in zip(three_pods, users, strict=True)
    ]
    watcher, _ = await join(three_pods[1], thread, "alice")
    seen: list[Event] = []
    try:
        await send(sockets[0], {"type": "prompt", "content": "long one"})
        await read_until(watcher, "loading", into=seen)
        queued: list[Event] = []
        for ws, user in zip(sockets, users, strict=True):
            await send(ws, {"type": "prompt", "content": f"from {user}", "client_msg_id": user})
            queued.append(await until(ws, "queued", client_msg_id=user))
        assert [q["user_id"] for q in queued] == users
        assert [q["queue_id"] for q in queued] == [q["id"] for q in queued]
        # A new socket is told what waits.
        late, ready = await join(three_pods[2], thread, "carol")
        await late.close()
        assert [q["queue_id"] for q in ready["queue"]] == [q["id"] for q in queued]
        await sockets[1].close()  # bob leaves before his turn: it still runs
        await read_until(watcher, dones(4), timeout=30, into=seen)
    finally:
        for ws in (*sockets, watcher):
            await ws.close()
    log = stored_events(redis_db, thread)
    assert turns_of(log) == [
        (None, "long one", "complete"),
        *[(q["queue_id"], f"from {u}", "complete") for q, u in zip(queued, users, strict=True)],
    ]
    assert_matches_log(seen, redis_db, thread)
    assert not redis_db.client().exists(keys.queue(keys.thread_id(thread)))


async def test_interrupt_cancels_the_running_turn_and_runs_next(three_pods, redis_db) -> None:
    thread = await new_thread(three_pods[0], "interrupt", "bob")
    alice, _ = await join(three_pods[0], thread, "alice")
    bob, _ = await join(three_pods[1], thread, "bob")
    try:
        await send(alice, {"type": "prompt", "content": "a long answer please"})
        await read_until(bob, "delta")
        await send(bob, {"type": "prompt", "content": "stop, this instead"})
        events = await read_until(bob, dones(2), timeout=20)
    finally:
        await alice.close()
        await bob.close()
    done = [e for e in events if e["type"] == "done"]
    assert [d["status"] for d in done] == ["cancelled", "complete"]
    assert turns_of(stored_events(redis_db, thread))[-1][1:] == ("stop, this instead", "complete")


async def test_reject_full_queue_and_cancelling_queued_prompts(three_pods, redis_db) -> None:
    pod = three_pods[0]
    rejecting = await new_thread(pod, "reject")
    alice, _ = await join(pod, rejecting, "alice")
    try:
        await send(alice, {"type": "prompt", "content": "first"})
        await read_until(alice, "loading")
        await send(alice, {"type": "prompt", "content": "second"})
        assert (await until(alice, "error"))["code"] == "thread_busy"
    finally:
        await alice.close()

    thread = await new_thread(pod, "queue", "bob", "carol")
    alice, _ = await join(pod, thread, "alice")
    bob, _ = await join(three_pods[1], thread, "bob")
    carol, _ = await join(three_pods[2], thread, "carol")
    try:
        await send(alice, {"type": "prompt", "content": "running"})
        await read_until(alice, "loading")
        ids = []
        for ws, name in ((bob, "bob"), (carol, "carol"), (bob, "bob")):
            await send(ws, {"type": "prompt", "content": "wait"})
            ids.append((await until(ws, "queued", user_id=name))["queue_id"])
        await send(carol, {"type": "prompt", "content": "one too many"})
        full = await until(carol, "error")
        assert full["code"] == "queue_full" and full["retryable"] is True
        # Carol may not cancel Bob's; Bob may; the owner may cancel Carol's.
        await send(carol, {"type": "cancel", "queue_id": ids[0]})
        assert (await until(carol, "error"))["code"] == "forbidden"
        await send(bob, {"type": "cancel", "queue_id": ids[0]})
        gone = await until(alice, "unqueued")
        assert gone["queue_id"] == ids[0] and gone["reason"] == "cancelled"
        await send(alice, {"type": "cancel", "queue_id": ids[1]})
        assert (await until(bob, "unqueued", queue_id=ids[1]))["reason"] == "cancelled"
        await send(alice, {"type": "cancel", "queue_id": ids[1]})
        assert (await until(alice, "error"))["code"] == "not_found"
        await read_until(alice, dones(2), timeout=20)
    finally:
        for ws in (alice, bob, carol):
            await ws.close()
    ran = turns_of(stored_events(redis_db, thread))
    assert ran == [(None, "running", "complete"), (ids[2], "wait", "complete")]


async def test_a_queued_prompt_repeated_after_a_reconnect_runs_once(three_pods, redis_db) -> None:
    thread = await new_thread(three_pods[0], "queue")
    alice, _ = await join(three_pods[0], thread, "alice")
    frame = {"type": "prompt", "content": "only once", "client_msg_id": "q-once"}
    try:
        await send(alice, {"type": "prompt", "content": "running"})
        await read_until(alice, "loading")
        await send(alice, frame)
        queued = await until(alice, "queued")
    finally:
        await alice.close()
    again, _ = await join(three_pods[1], thread, "alice")
    try:
        await send(again, frame)  # while it waits: the original queued event
        assert (await read_until(again, lambda e: e.get("id") == queued["id"]))[-1] == queued
        await read_until(again, dones(2), timeout=20)
        await send(again, frame)  # after it ran: still the original, nothing new
        assert await recv_event(again) == queued
    finally:
        await again.close()
    assert [t[1] for t in turns_of(stored_events(redis_db, thread))] == ["running", "only once"]


@pytest.mark.parametrize("how", ["kill", "drain"])
async def test_queued_prompts_run_once_after_their_turns_pod_dies_or_drains(
    redis_server, pod_factory, how: str
) -> None:
    """A killed pod's turn is closed by the reaper, a drained pod's ends
    interrupted; either way another pod starts what waits, once each."""
    env = dict(ENV, CHAT_LOCK_TTL_MS=1500, CHAT_REAPER_INTERVAL_MS=300, CHAT_DRAIN_GRACE_S=0.1)
    pods = [pod_factory(redis_server, **env) for _ in range(2)]
    thread = await new_thread(pods[1], "queue")
    victim, _ = await join(pods[0], thread, "alice")
    watcher, _ = await join(pods[1], thread, "alice")
    seen: list[Event] = []
    try:
        await send(victim, {"type": "prompt", "content": "doomed"})
        await read_until(watcher, "delta", into=seen)
        for content in ("then this", "and this"):
            await send(watcher, {"type": "prompt", "content": content})
            await read_until(watcher, "queued", into=seen)
        if how == "kill":
            await asyncio.to_thread(pods[0].kill)
        else:
            assert await asyncio.to_thread(pods[0].terminate) == 0
        await read_until(watcher, dones(3), timeout=30, into=seen)
    finally:
        await watcher.close()
    log = stored_events(redis_server, thread)
    assert [(t[1], t[2]) for t in turns_of(log)] == [
        ("doomed", "interrupted"), ("then this", "complete"), ("and this", "complete"),
    ]  # fmt: skip
    assert_matches_log(seen, redis_server, thread)
