"""The user socket (/v1/ws) on real pods and a real redis-server: the live
inbox across pods, read markers and unread counts, roles, join/leave
multiplexing compared with thread sockets, presence, typing, and bad input.

One set of three authenticated pods serves the module; every test uses its
own users and threads.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from tests.integration.helpers import (
    TIMEOUT_S,
    Event,
    open_ready,
    recv_any,
    recv_event,
    send,
    timeline,
    until_done,
)
from tests.integration.shared_pods import pods
from tests.integration.tokens import AUTH_ENV, bearer, open_socket
from tests.procs import Server

pytestmark = pytest.mark.integration

LEASE_MS = 1500


@pytest.fixture(scope="module")
def trio(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Server]]:
    workdir: Path = tmp_path_factory.mktemp("usersock")
    with pods(
        request, workdir, 3, **AUTH_ENV, CHAT_SOCKET_LEASE_MS=LEASE_MS, CHAT_MAX_JOINED=3,
    ) as started:  # fmt: skip
        yield started


def user(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


async def user_socket(pod: Server, sub: str) -> tuple[Any, Event]:
    ws = await websockets.connect(
        f"{pod.ws}/v1/ws", open_timeout=10, max_queue=None, additional_headers=bearer(sub)
    )
    return ws, await recv_event(ws)


def rest(pod: Server, sub: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=pod.http, headers=bearer(sub), timeout=10)


async def next_card(ws: Any, thread: str) -> dict[str, Any]:
    """The next ``thread`` event about ``thread`` (others are skipped)."""
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            event = await recv_event(ws)
            if event["type"] == "thread" and event["thread"]["id"] == thread:
                return dict(event["thread"])


async def card_where(ws: Any, thread: str, check: Any) -> dict[str, Any]:
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            card = await next_card(ws, thread)
            if check(card):
                return card


async def test_an_inbox_follows_threads_across_pods(trio: list[Server]) -> None:
    p1, p2, p3 = trio
    a, b = user("alice"), user("bob")
    inbox, first = await user_socket(p1, a)
    assert first == {"type": "inbox", "threads": [], "next_cursor": None}
    async with rest(p2, a) as alice:
        made = await alice.post("/v1/threads", json={})
        thread = made.json()["id"]
        created = await next_card(inbox, thread)
        assert (created["role"], created["unread"], created["generating"]) == ("owner", 0, False)
        assert created["last_message"] is None and created["title"] == ""
        assert (await alice.put(f"/v1/threads/{thread}/members/{b}")).status_code == 204
        added = await next_card(inbox, thread)
        assert added == created  # B's arrival changes nothing A sees, but A hears it
        bob_inbox, bob_first = await user_socket(p3, b)
        assert [t["id"] for t in bob_first["threads"]] == [thread]
        assert bob_first["threads"][0]["role"] == "member"
        # B prompts on pod 3: the turn starts, then ends.
        ws = await open_socket(p3.ws, thread, b)
        await recv_event(ws)
        await send(ws, {"type": "prompt", "content": "hello from bob"})
        events = await until_done(ws)
        started = await next_card(inbox, thread)
        assert started["generating"] and started["unread"] == 1
        assert started["last_message"]["user_id"] == b
        assert started["last_message"]["preview"] == "hello from bob"
        ended = await next_card(inbox, thread)
        assert not ended["generating"] and ended["unread"] == 2
        assert ended["last_message"]["role"] == "assistant"
        reply = [e for e in events if e["type"] == "message"][-1]["message"]
        # The commits build the last message from what they wrote (not read
        # back): the same card a snapshot reads from the stored reply.
        assert ended["last_message"] == {
            "id": reply["id"], "role": "assistant", "user_id": "assistant",
            "preview": reply["content"][:200], "created_at": reply["created_at"],
        }  # fmt: skip
        # The card carries the thread's token totals: here its one turn's.
        assert started["usage"] == {"input_tokens": 0, "output_tokens": 0}
        assert ended["usage"] == events[-1]["usage"]
        # Bob wrote the prompt: only the reply is unread for him.
        bob_card = await card_where(bob_inbox, thread, lambda c: not c["generating"])
        assert bob_card["unread"] == 1
        # A reads on another tab (a thread socket on pod 2): pod 1's inbox hears it.
        tab = await open_socket(p2.ws, thread, a)
        await recv_event(tab)
        await send(tab, {"type": "read", "message_id": reply["id"]})
        # (the auto-title's card may come first)
        read = await card_where(inbox, thread, lambda c: c["unread"] != 2)
        assert read["unread"] == 0 and read["updated_at"] == ended["updated_at"]
        # A fresh snapshot agrees, newest activity first.
        again, snapshot = await user_socket(p2, a)
        assert [t["id"] for t in snapshot["threads"]] == [thread]
        assert snapshot["threads"][0]["unread"] == 0
        assert snapshot["threads"][0]["last_message"] == ended["last_message"]
        # Removed: B's inbox says so, and B's socket on the thread closes.
        assert (await alice.delete(f"/v1/threads/{thread}/members/{b}")).status_code == 204
        gone = await recv_event(bob_inbox)
        while gone["type"] != "thread_removed":
            gone = await recv_event(bob_inbox)
        assert gone == {"type": "thread_removed", "thread_id": thread, "reason": "revoked"}
        assert (await alice.delete(f"/v1/threads/{thread}")).status_code == 204
        deleted = await recv_event(inbox)
        while deleted["type"] != "thread_removed":
            deleted = await recv_event(inbox)
        assert deleted == {"type": "thread_removed", "thread_id": thread, "reason": "deleted"}
        for sock in (inbox, bob_inbox, ws, tab, again):
            await sock.close()


async def test_viewers_read_and_watch_but_change_nothing(trio: list[Server]) -> None:
    p1, p2, _ = trio
    a, v = user("owner"), user("viewer")
    async with rest(p1, a) as owner, rest(p2, v) as viewer:
        thread = (await owner.post("/v1/threads", json={})).json()["id"]
        put = await owner.put(f"/v1/threads/{thread}/members/{v}", json={"role": "viewer"})
        assert put.status_code == 204, put.text
        assert (await viewer.get(f"/v1/threads/{thread}")).json()["role"] == "viewer"
        ws = await open_socket(p1.ws, thread, a)
        await recv_event(ws)
        events = await until_done_after(ws, {"type": "prompt", "content": "first"})
        reply = [e for e in events if e["type"] == "message"][-1]["message"]
        watcher = await open_socket(p2.ws, thread, v)
        assert (await recv_event(watcher))["type"] == "ready"
        for frame in (
            {"type": "prompt", "content": "let me in"},
            {"type": "regenerate", "message_id": reply["id"]},
            {"type": "switch", "message_id": reply["id"]},
            {"type": "cancel"},
        ):
            await send(watcher, frame)
            refused = await recv_event(watcher)
            assert refused["type"] == "error" and refused["code"] == "forbidden", (frame, refused)
        post = await viewer.post(f"/v1/threads/{thread}/messages", json={"content": "x"})
        assert post.status_code == 403
        # A viewer reads: history, and a read marker.
        await send(watcher, {"type": "get_history"})
        assert len((await recv_event(watcher))["messages"]) == 2
        inbox, snapshot = await user_socket(p2, v)
        assert snapshot["threads"][0]["role"] == "viewer"
        assert snapshot["threads"][0]["unread"] == 2
        await send(watcher, {"type": "read", "message_id": reply["id"]})
        assert (await next_card(inbox, thread))["unread"] == 0
        # Made a member, the same user may prompt.
        assert (await owner.put(f"/v1/threads/{thread}/members/{v}")).status_code == 204
        assert (await next_card(inbox, thread))["role"] == "member"
        await send(watcher, {"type": "prompt", "content": "now I may"})
        assert (await recv_event(watcher))["type"] == "message"
        bad = await owner.put(f"/v1/threads/{thread}/members/{v}", json={"role": "admin"})
        assert bad.status_code == 422
        for sock in (ws, watcher, inbox):
            await sock.close()


async def until_done_after(ws: Any, frame: Event) -> list[Event]:
    await send(ws, frame)
    return await until_done(ws)


async def test_bad_input_on_the_user_socket_is_answered_and_it_keeps_serving(
    trio: list[Server],
) -> None:
    p1, _, _ = trio
    a, stranger = user("careful"), user("stranger")
    async with rest(p1, a) as alice:
        threads = [(await alice.post("/v1/threads", json={})).json()["id"] for _ in range(4)]
    ws, first = await user_socket(p1, a)
    assert {t["id"] for t in first["threads"]} == set(threads)
    other, _ = await user_socket(p1, stranger)
    for frame, code in (
        ({"type": "join", "thread_id": "no-such-thread"}, "forbidden"),
        ({"type": "join", "thread_id": threads[0]}, "forbidden"),
        ({"type": "read", "thread_id": "no-such-thread", "message_id": "1-0"}, "forbidden"),
        ({"type": "read", "thread_id": threads[0], "message_id": "1-0"}, "forbidden"),
        ({"type": "join", "thread_id": "bad id!"}, "bad_request"),
        ({"type": "prompt", "content": "x"}, "bad_request"),
        ({"type": "prompt", "thread_id": threads[0], "content": "x"}, "bad_request"),
        ({"type": "leave", "thread_id": threads[0]}, "bad_request"),
    ):
        await send(other, frame)
        error = await recv_event(other)
        assert error["type"] == "error" and error["code"] == code, (frame, error)
    # Joining past CHAT_MAX_JOINED (3 here) is refused; the others stay joined.
    for thread in threads[:3]:
        await send(ws, {"type": "join", "thread_id": thread})
        ready = await recv_event(ws)
        assert (ready["type"], ready["thread_id"]) == ("ready", thread)
    await send(ws, {"type": "join", "thread_id": threads[3]})
    refused = await recv_event(ws)
    assert (refused["type"], refused["code"], refused["thread_id"]) == (
        "error", "rate_limited", threads[3],
    )  # fmt: skip
    await send(ws, {"type": "join", "thread_id": threads[0]})
    assert (await recv_event(ws))["code"] == "bad_request"  # already joined
    await send(ws, {"type": "read", "thread_id": threads[0], "message_id": "1-0"})
    assert (await recv_event(ws))["code"] == "not_found"
    await send(ws, {"type": "leave", "thread_id": threads[0]})
    await send(ws, {"type": "join", "thread_id": threads[3]})
    assert (await recv_event(ws))["type"] == "ready"
    await send(ws, {"type": "ping"})
    assert (await recv_event(ws))["type"] == "pong"
    for sock in (ws, other):
        await sock.close()


async def test_a_multiplexed_socket_sees_exactly_what_thread_sockets_see(
    trio: list[Server],
) -> None:
    p1, p2, p3 = trio
    a = user("multi")
    async with rest(p1, a) as alice:
        threads = [(await alice.post("/v1/threads", json={})).json()["id"] for _ in range(3)]
    ws, _ = await user_socket(p3, a)
    watchers = []
    for thread in threads:
        await send(ws, {"type": "join", "thread_id": thread})
        assert (await recv_event(ws))["type"] == "ready"
        watchers.append((await open_ready(p1.ws, thread, additional_headers=bearer(a)))[0])
    seen: dict[str, list[Event]] = {t: [] for t in threads}

    async def collect(count: int) -> None:
        done = 0
        async with asyncio.timeout(TIMEOUT_S):
            while done < count:
                event = await recv_event(ws)
                if event["type"] in ("thread", "thread_removed"):
                    continue
                seen[event["thread_id"]].append(event)
                done += event["type"] == "done"

    for thread in threads:
        await send(ws, {"type": "prompt", "thread_id": thread, "content": f"about {thread}"})
    await collect(3)
    for thread, watcher in zip(threads, watchers, strict=True):
        theirs = await until_done(watcher)
        assert timeline(seen[thread]) == timeline(theirs)
        assert [e for e in seen[thread] if "id" in e] == theirs
    # kill -9 of the user socket's pod mid-turn (the turns run on pod 1):
    # on another pod, each thread resumes after the last event seen.
    before = {t: len(seen[t]) for t in threads}
    for thread, watcher in zip(threads, watchers, strict=True):
        await send(watcher, {"type": "prompt", "content": f"again {thread}"})
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            event = await recv_event(ws)
            if event["type"] not in ("thread", "thread_removed"):
                seen[event["thread_id"]].append(event)
                if event["type"] == "delta":
                    break
    last = {t: seen[t][-1]["id"] for t in threads}
    p3.kill()
    try:
        back, _ = await user_socket(p2, a)
        for thread in threads:
            await send(back, {"type": "join", "thread_id": thread, "after": last[thread]})
        resumed: dict[str, list[Event]] = {t: [] for t in threads}
        async with asyncio.timeout(TIMEOUT_S):
            while not all(any(e["type"] == "done" for e in resumed[t]) for t in threads):
                event = await recv_event(back)
                if event["type"] == "ready":
                    assert event["recovered"] is True
                elif event["type"] not in ("thread", "thread_removed"):
                    resumed[event["thread_id"]].append(event)
        for thread, watcher in zip(threads, watchers, strict=True):
            theirs = await until_done(watcher)
            # Before the kill and after the resume: each event once, in order.
            assert seen[thread][before[thread] :] + resumed[thread] == theirs
        await back.close()
    finally:
        p3.start()
    for sock in watchers:
        await sock.close()


async def test_presence_across_pods_and_typing(trio: list[Server]) -> None:
    p1, _, p3 = trio
    a, b = user("here"), user("there")
    async with rest(p1, a) as alice:
        thread = (await alice.post("/v1/threads", json={})).json()["id"]
        await alice.put(f"/v1/threads/{thread}/members/{b}")
    ws_a = await open_socket(p1.ws, thread, a)
    assert (await recv_any(ws_a))["type"] == "ready"
    assert await presence(ws_a) == [a]
    inbox_b, _ = await user_socket(p3, b)
    await send(inbox_b, {"type": "join", "thread_id": thread})
    assert (await recv_event(inbox_b))["type"] == "ready"
    assert await presence(inbox_b) == sorted([a, b])
    assert await presence(ws_a) == sorted([a, b])
    # Typing: others hear it, at most once per 2 s per user; a flood is dropped.
    for _ in range(20):
        await send(inbox_b, {"type": "typing", "thread_id": thread})
    heard = await next_of(ws_a, "typing")
    assert heard == {"type": "typing", "thread_id": thread, "user_id": b}
    await send(ws_a, {"type": "ping"})
    assert (await next_not_presence(ws_a))["type"] == "pong"  # no second typing
    await send(inbox_b, {"type": "ping"})
    assert (await next_not_presence(inbox_b))["type"] == "pong"  # nor its own
    # kill -9 of B's pod: B leaves A's presence within the lease.
    p3.kill()
    try:
        async with asyncio.timeout(LEASE_MS / 1000 + 2):
            while await presence(ws_a) != [a]:
                pass
    finally:
        p3.start()
    await ws_a.close()


async def presence(ws: Any) -> list[str]:
    return list((await next_of(ws, "presence"))["users"])


async def next_of(ws: Any, kind: str) -> Event:
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            event = await recv_any(ws)
            if event["type"] == kind:
                return event


async def next_not_presence(ws: Any) -> Event:
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            event = await recv_any(ws)
            if event["type"] != "presence":
                return event


async def test_auto_titles_from_the_fake_model_and_the_owners_rename_wins(
    trio: list[Server],
) -> None:
    p1, p2, _ = trio
    a = user("titler")
    async with rest(p1, a) as alice:
        auto = (await alice.post("/v1/threads", json={})).json()["id"]
        mine = (await alice.post("/v1/threads", json={})).json()["id"]
        inbox, _ = await user_socket(p2, a)
        ws = await open_socket(p1.ws, auto, a)
        await recv_event(ws)
        await until_done_after(ws, {"type": "prompt", "content": "how do I bake rye bread at home"})
        titled = await card_where(inbox, auto, lambda c: c["title"])
        assert titled["title"] == "how do I bake rye bread"
        # Renamed while the first reply runs: the rename stays.
        other = await open_socket(p1.ws, mine, a)
        await recv_event(other)
        await send(other, {"type": "prompt", "content": "a thread I name myself"})
        await read_until_type(other, "loading")
        assert (await alice.patch(f"/v1/threads/{mine}", json={"title": "Mine"})).status_code == 200
        await until_done(other)
        await until_done_after(other, {"type": "prompt", "content": "and a second turn"})
        assert (await alice.get(f"/v1/threads/{mine}")).json()["title"] == "Mine"
        assert (await card_where(inbox, mine, lambda c: c["title"]))["title"] == "Mine"
        for sock in (inbox, ws, other):
            await sock.close()


async def read_until_type(ws: Any, kind: str) -> Event:
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            event = await recv_event(ws)
            if event["type"] == kind:
                return event


async def test_a_reconnect_storm_sends_each_socket_a_few_presence_frames(
    trio: list[Server],
) -> None:
    owner = user("host")
    guests = [user(f"g{i}") for i in range(60)]
    async with rest(trio[0], owner) as host:
        thread = (await host.post("/v1/threads", json={})).json()["id"]
        for guest in guests:
            assert (await host.put(f"/v1/threads/{thread}/members/{guest}")).status_code == 204
    watcher = await open_socket(trio[0].ws, thread, owner)
    assert (await recv_any(watcher))["type"] == "ready"
    assert await presence(watcher) == [owner]
    everyone = sorted([owner, *guests])
    storm = await asyncio.gather(
        *(open_socket(trio[i % 3].ws, thread, g) for i, g in enumerate(guests))
    )
    frames = 0
    async with asyncio.timeout(TIMEOUT_S):
        while (users := await presence(watcher)) != everyone:
            frames += 1
            assert set(users) <= set(everyone)
    # Coalesced per pod and window: a handful of frames, not one per socket.
    assert frames + 1 <= len(guests) // 4, frames
    await asyncio.gather(*(ws.close() for ws in storm))
    async with asyncio.timeout(TIMEOUT_S):
        while await presence(watcher) != [owner]:
            frames += 1
    assert frames <= len(guests) // 2, frames
    await watcher.close()
