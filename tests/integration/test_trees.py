"""Conversation trees on real pods: edit (a prompt with ``parent_id``),
``regenerate`` and ``switch`` across two pods; every socket sees the same
events; ``get_history`` walks exactly one branch with the right siblings; the
model is given that branch only (the fake model's ``usage.input_tokens`` is
the word count of its context); ``branch`` events replay on resume; repeats
with a ``client_msg_id`` do nothing twice; and bad ids are refused with
nothing written."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import httpx
import orjson
import pytest
import websockets

from app.chat import keys
from tests import procs
from tests.integration.helpers import (
    Event,
    assert_matches_log,
    expect,
    expect_quiet,
    get_history,
    open_ready,
    read_until,
    recv_event,
    send,
    until_done,
)
from tests.integration.shared_pods import module_pods_on_redis
from tests.integration.tokens import AUTH_ENV, bearer

pytestmark = pytest.mark.integration

ENV = dict(
    AUTH_ENV, CHAT_FAKE_TOKEN_DELAY_MS=2, CHAT_FAKE_REPLY_TOKENS=12, CHAT_RATE_PROMPTS_PER_MIN=0
)


pods_and_redis = module_pods_on_redis("trees", 2, **ENV)


@pytest.fixture(scope="module")
def redis_db(pods_and_redis: tuple[procs.RedisServer, list[procs.Server]]) -> procs.RedisServer:
    return pods_and_redis[0]


@pytest.fixture(scope="module")
def two_pods(pods_and_redis: tuple[procs.RedisServer, list[procs.Server]]) -> list[procs.Server]:
    return pods_and_redis[1]


def new_thread() -> str:
    return f"tree-{secrets.token_hex(5)}"


async def join(pod: Any, thread: str, user: str = "alice", query: str = "") -> tuple[Any, Event]:
    return await open_ready(pod.ws, thread, query, additional_headers=bearer(user))


def words(*texts: str) -> int:
    return sum(len(t.split()) for t in texts)


def final(events: list[Event]) -> tuple[Event, Event]:
    """The assistant ``message`` and ``done`` of a turn's events."""
    done = events[-1]
    reply = next(e for e in events if e["type"] == "message" and e["id"] == done["message_id"])
    return reply["message"], done


async def test_edit_and_regenerate_across_pods(two_pods, redis_db) -> None:
    pod_a, pod_b = two_pods
    thread = new_thread()
    a, ready = await join(pod_a, thread)
    b, _ = await join(pod_b, thread)
    assert ready["leaf_id"] is None
    seen_a: list[Event] = []
    seen_b: list[Event] = []
    try:
        await send(a, {"type": "prompt", "content": "one two three"})
        t1 = await read_until(a, "done", into=seen_a)
        await read_until(b, "done", into=seen_b)
        q1 = t1[0]["message"]
        r1, done1 = final(t1)
        assert q1["parent_id"] is None and r1["parent_id"] == q1["id"]
        assert done1["usage"]["input_tokens"] == words("one two three")

        await send(b, {"type": "prompt", "content": "four five"})
        t2 = await read_until(b, "done", into=seen_b)
        await read_until(a, "done", into=seen_a)
        q2 = t2[0]["message"]
        r2, done2 = final(t2)
        assert q2["parent_id"] == r1["id"]
        assert done2["usage"]["input_tokens"] == words("one two three", r1["content"], "four five")

        # Edit q2 (on pod A): a branch under q2's parent; the model sees it only.
        await send(a, {"type": "prompt", "content": "six seven eight nine", "parent_id": r1["id"]})
        t3 = await read_until(a, "done", into=seen_a)
        await read_until(b, "done", into=seen_b)
        e3 = t3[0]["message"]
        r3, done3 = final(t3)
        assert e3["parent_id"] == r1["id"]
        assert done3["usage"]["input_tokens"] == words(
            "one two three", r1["content"], "six seven eight nine"
        )

        # Regenerate r3 (on pod B): no user message, a sibling reply to e3.
        await send(b, {"type": "regenerate", "message_id": r3["id"]})
        t4 = await read_until(b, "done", into=seen_b)
        await read_until(a, "done", into=seen_a)
        assert [e["type"] for e in t4 if e["type"] != "delta"] == ["loading", "message", "done"]
        r4, done4 = final(t4)
        assert r4["parent_id"] == e3["id"] and r4["role"] == "assistant"
        assert done4["usage"]["input_tokens"] == done3["usage"]["input_tokens"]

        # History along each branch: exactly the path, with siblings.
        page = (await get_history(a))["messages"]
        assert [m["id"] for m in page] == [q1["id"], r1["id"], e3["id"], r4["id"]]
        assert [m["siblings"] for m in page] == [
            [q1["id"]], [r1["id"]], [q2["id"], e3["id"]], [r3["id"], r4["id"]]
        ]  # fmt: skip
        assert page[0]["parent_id"] is None
        old = (await get_history(b, leaf=r2["id"]))["messages"]
        assert [m["id"] for m in old] == [q1["id"], r1["id"], q2["id"], r2["id"]]
        paged = await get_history(b, leaf=r3["id"], limit=2)
        assert [m["id"] for m in paged["messages"]] == [e3["id"], r3["id"]] and paged["has_more"]
        rest = await get_history(b, leaf=r3["id"], before=e3["id"])
        assert [m["id"] for m in rest["messages"]] == [q1["id"], r1["id"]]
        assert not rest["has_more"]
    finally:
        await a.close()
        await b.close()
    assert [e.get("id") for e in seen_a if "id" in e] == [e.get("id") for e in seen_b if "id" in e]
    assert_matches_log(seen_a, redis_db, thread)
    # A new socket is told the active leaf.
    c, ready = await join(pod_b, thread)
    await c.close()
    assert ready["leaf_id"] == r4["id"]


async def test_switch_on_one_pod_reaches_another_and_replays(two_pods) -> None:
    pod_a, pod_b = two_pods
    thread = new_thread()
    a, _ = await join(pod_a, thread)
    try:
        t1 = await _turn(a, "alpha")
        q1, r1 = t1[0]["message"], final(t1)[0]
        t2 = await _turn(a, "beta")
        q2, r2 = t2[0]["message"], final(t2)[0]
        t3 = await _turn(a, "gamma", parent_id=r1["id"])  # an edit of "beta"
        r3 = final(t3)[0]
        watcher, ready = await join(pod_b, thread)
        assert ready["leaf_id"] == r3["id"]
        await watcher.close()
        # Pod A switches twice while the watcher is away.
        await send(a, {"type": "switch", "message_id": q2["id"]})
        first = await expect(a, "branch")
        assert first["leaf_id"] == r2["id"]
        assert (await get_history(a))["messages"][-1]["id"] == r2["id"]
        await send(a, {"type": "switch", "message_id": q1["id"]})
        second = await expect(a, "branch")
        assert second["leaf_id"] == r3["id"]  # the newest leaf under q1
        query = f"?after={ready['last_event_id']}&epoch={ready['epoch']}"
        resumed, again = await join(pod_b, thread, query=query)
        replay = [await recv_event(resumed), await recv_event(resumed)]
        assert again["recovered"] is True and again["leaf_id"] == r3["id"]
        assert replay == [first, second]
        # And live: a switch on pod B reaches pod A.
        await send(resumed, {"type": "switch", "message_id": r2["id"]})
        live = await expect(a, "branch")
        assert live == await expect(resumed, "branch") and live["leaf_id"] == r2["id"]
        await resumed.close()
    finally:
        await a.close()


async def test_repeats_with_a_client_msg_id_do_nothing_twice(two_pods, redis_db) -> None:
    pod_a, pod_b = two_pods
    thread = new_thread()
    a, _ = await join(pod_a, thread)
    try:
        t1 = await _turn(a, "question")
        r1 = final(t1)[0]
        regenerate = {"type": "regenerate", "message_id": r1["id"], "client_msg_id": "again-1"}
        await send(a, regenerate)
        turn = await until_done(a)
        loading = turn[0]
        assert loading["type"] == "loading"
    finally:
        await a.close()
    # After a reconnect to the other pod: the original loading frame, nothing new.
    b, _ = await join(pod_b, thread)
    try:
        await send(b, regenerate)
        assert await recv_event(b) == loading
        await expect_quiet(b)
    finally:
        await b.close()
    stored = redis_db.client().xrange(keys.history(keys.thread_id(thread)))
    assert len(stored) == 3  # the question and two replies


async def test_bad_ids_are_refused_and_nothing_is_written(two_pods, redis_db) -> None:
    pod_a, _ = two_pods
    thread, other = new_thread(), new_thread()
    a, _ = await join(pod_a, thread)
    o, _ = await join(pod_a, other)
    try:
        t1 = await _turn(a, "mine")
        theirs = final(await _turn(o, "theirs"))[0]
        server = redis_db.client()
        before = (
            server.xlen(keys.history(keys.thread_id(thread))),
            server.hgetall(keys.tree(keys.thread_id(thread))),
            server.xlen(keys.events(keys.thread_id(thread))),
        )
        for frame, code in [
            ({"type": "prompt", "content": "x", "parent_id": "nope"}, "bad_request"),
            ({"type": "prompt", "content": "x", "parent_id": theirs["id"]}, "not_found"),
            ({"type": "prompt", "content": "x", "parent_id": "1-0"}, "not_found"),
            ({"type": "regenerate", "message_id": "12"}, "bad_request"),
            ({"type": "regenerate", "message_id": theirs["id"]}, "not_found"),
            ({"type": "switch", "message_id": theirs["id"]}, "not_found"),
            ({"type": "switch"}, "bad_request"),
            ({"type": "get_history", "leaf": theirs["id"]}, "not_found"),
        ]:
            await send(a, frame)
            error = await expect(a, "error")
            assert error["code"] == code, (frame, error)
        after = (
            server.xlen(keys.history(keys.thread_id(thread))),
            server.hgetall(keys.tree(keys.thread_id(thread))),
            server.xlen(keys.events(keys.thread_id(thread))),
        )
        assert after == before
        assert t1
    finally:
        for ws in (a, o):
            await ws.close()


async def _turn(ws: Any, content: str, **extra: Any) -> list[Event]:
    await send(ws, {"type": "prompt", "content": content, **extra})
    return await until_done(ws)


async def test_strangers_are_refused_and_the_seed_route_shows_the_active_branch(
    two_pods, redis_db
) -> None:
    pod_a, pod_b = two_pods
    thread = new_thread()
    a, _ = await join(pod_a, thread)
    try:
        q1, r1 = final_ids(await _turn(a, "one"))
        await _turn(a, "two")
        e2, r2 = final_ids(await _turn(a, "two again", parent_id=r1))
    finally:
        await a.close()
    t = keys.thread_id(thread)
    before = (redis_db.client().xlen(keys.history(t)), redis_db.client().hgetall(keys.tree(t)))
    async with httpx.AsyncClient(base_url=pod_b.http, headers=bearer("mallory")) as http:
        edit = {"content": "mine now", "parent_id": q1}
        assert (await http.post(f"/v1/threads/{thread}/messages", json=edit)).status_code == 403
        again = {"message_id": r1}
        assert (await http.post(f"/v1/threads/{thread}/regenerate", json=again)).status_code == 403
        assert (await http.get(f"/v1/threads/{thread}/messages?leaf={r1}")).status_code == 403
    after = (redis_db.client().xlen(keys.history(t)), redis_db.client().hgetall(keys.tree(t)))
    assert after == before
    # The seed protocol's (GET_HISTORY) is the active branch, not the whole stream.
    seed = await websockets.connect(
        f"{pod_b.ws}/websocket?threadID={thread}", additional_headers=bearer("alice")
    )
    try:
        await seed.send("(GET_HISTORY)")
        shown = orjson.loads(await asyncio.wait_for(seed.recv(), 10))
    finally:
        await seed.close()
    assert [m["content"] for m in shown][::2] == ["one", "two again"] and len(shown) == 4
    assert e2 and r2


def final_ids(events: list[Event]) -> tuple[str, str]:
    """(user message id, reply id) of one turn's events."""
    return events[0]["message"]["id"], events[-1]["message_id"]


async def test_a_viewer_may_not_branch_regenerate_or_switch(two_pods, redis_db) -> None:
    pod_a, pod_b = two_pods
    thread = new_thread()
    a, _ = await join(pod_a, thread)
    try:
        q1, r1 = final_ids(await _turn(a, "one"))
    finally:
        await a.close()
    async with httpx.AsyncClient(base_url=pod_a.http, headers=bearer("alice")) as http:
        added = await http.put(f"/v1/threads/{thread}/members/vic", json={"role": "viewer"})
        assert added.status_code == 204
    t = keys.thread_id(thread)
    before = (redis_db.client().xlen(keys.events(t)), redis_db.client().hgetall(keys.tree(t)))
    viewer, ready = await join(pod_b, thread, user="vic")
    try:
        assert ready["leaf_id"] == r1
        for frame in [
            {"type": "prompt", "content": "edit", "parent_id": q1},
            {"type": "regenerate", "message_id": r1},
            {"type": "switch", "message_id": q1},
            {"type": "cancel", "queue_id": r1},
        ]:
            await send(viewer, frame)
            assert (await expect(viewer, "error"))["code"] == "forbidden", frame
        page = await get_history(viewer, leaf=r1)  # reading is allowed
        assert [m["id"] for m in page["messages"]] == [q1, r1]
    finally:
        await viewer.close()
    after = (redis_db.client().xlen(keys.events(t)), redis_db.client().hgetall(keys.tree(t)))
    assert after == before
