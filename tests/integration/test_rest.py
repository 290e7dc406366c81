"""The REST API of threads on a real pod: create, list (paged), rename, members,
delete (even under a running turn, across pods), its errors, its schema."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.integration.helpers import metric, recv_event, send, undocumented, until_done
from tests.integration.tokens import AUTH_ENV, bearer, open_socket
from tests.procs import wait_until

pytestmark = pytest.mark.integration


async def test_threads_over_rest(redis_server, pod_factory):
    pod = pod_factory(redis_server, **AUTH_ENV)
    alice = httpx.AsyncClient(base_url=pod.http, headers=bearer("alice"), timeout=10)
    bob = httpx.AsyncClient(base_url=pod.http, headers=bearer("bob"), timeout=10)
    try:
        made = await alice.post("/v1/threads", json={})
        assert made.status_code == 201
        generated = made.json()
        assert len(generated["id"]) >= 16 and generated["members"] == ["alice"]
        for i in range(4):
            body = {"id": f"rest{i}", "title": f"Topic {i}"}
            created = (await alice.post("/v1/threads", json=body)).json()
            assert (created["owner"], created["role"], created["title"]) == (
                "alice", "owner", f"Topic {i}",
            )  # fmt: skip
            await asyncio.sleep(0.002)  # distinct activity times
        # Paged, newest activity first, every thread exactly once.
        listed: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = (await alice.get("/v1/threads", params=params)).json()
            listed += [t["id"] for t in page["threads"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert listed == ["rest3", "rest2", "rest1", "rest0", generated["id"]]
        # A prompt moves its thread to the top.
        ws = await open_socket(pod.ws, "rest0", "alice")
        await recv_event(ws)
        await send(ws, {"type": "prompt", "content": "bump"})
        await until_done(ws)
        await ws.close()
        top = (await alice.get("/v1/threads", params={"limit": 1})).json()["threads"][0]
        assert top["id"] == "rest0" and top["updated_at"] > top["created_at"]

        renamed = await alice.patch("/v1/threads/rest1", json={"title": "Renamed"})
        assert renamed.status_code == 200 and renamed.json()["title"] == "Renamed"
        assert (await alice.put("/v1/threads/rest1/members/bob")).status_code == 204
        detail = (await bob.get("/v1/threads/rest1")).json()
        assert detail["members"] == ["alice", "bob"] and detail["role"] == "member"
        assert (await bob.patch("/v1/threads/rest1", json={"title": "x"})).status_code == 403
        assert (await bob.put("/v1/threads/rest1/members/carol")).status_code == 403
        assert (await bob.delete("/v1/threads/rest1")).status_code == 403
        assert (await bob.delete("/v1/threads/rest1/members/bob")).status_code == 204  # leaves
        assert (await bob.get("/v1/threads/rest1")).status_code == 403
        left = await alice.delete("/v1/threads/rest1/members/alice")
        assert left.status_code == 409  # the owner deletes instead

        errors = {
            "no token": await httpx.AsyncClient(base_url=pod.http).get("/v1/threads"),
            "taken id": await alice.post("/v1/threads", json={"id": "rest2"}),
            "bad id": await alice.post("/v1/threads", json={"id": "a:{b}"}),
            "bad path id": await alice.get("/v1/threads/a%7Bb%7D"),
            "bad member": await alice.put("/v1/threads/rest2/members/a%7Bb%7D"),
            "unknown field": await alice.post("/v1/threads", json={"id": "x1", "admin": True}),
            "title type": await alice.patch("/v1/threads/rest2", json={"title": 5}),
            "long title": await alice.patch("/v1/threads/rest2", json={"title": "x" * 201}),
            "not json": await alice.post(
                "/v1/threads", content=b"{", headers={"content-type": "application/json"}
            ),
            "huge body": await alice.post(
                "/v1/threads", content=b" " * 100_000, headers={"content-type": "application/json"}
            ),
            "bad cursor": await alice.get("/v1/threads", params={"cursor": "nope"}),
            "bad limit": await alice.get("/v1/threads", params={"limit": 1000}),
            "missing": await alice.get("/v1/threads/no-such-thread"),
        }
        statuses = {name: r.status_code for name, r in errors.items()}
        assert statuses == {
            "no token": 401, "taken id": 409, "bad id": 422, "bad path id": 422,
            "bad member": 422, "unknown field": 422, "title type": 422, "long title": 422,
            "not json": 422, "huge body": 413, "bad cursor": 422, "bad limit": 422,
            "missing": 404,
        }  # fmt: skip
        for response in errors.values():
            assert set(response.json()["error"]) >= {"code", "message"}

        schema = (await alice.get("/openapi.json")).json()
        assert {"/v1/threads", "/v1/threads/{thread_id}",
                "/v1/threads/{thread_id}/members/{member}"} <= set(schema["paths"])  # fmt: skip
        # Nothing was built from the refused ids.
        found = set(redis_server.client().keys("*"))
        assert not undocumented(found), found
    finally:
        await alice.aclose()
        await bob.aclose()


async def test_delete_under_a_running_turn_leaves_nothing(redis_server, pod_factory):
    slow = {**AUTH_ENV, "CHAT_FAKE_REPLY_TOKENS": 300, "CHAT_FAKE_TOKEN_DELAY_MS": 10}
    pod_a = pod_factory(redis_server, **slow)
    pod_b = pod_factory(redis_server, **slow)
    async with httpx.AsyncClient(base_url=pod_a.http, headers=bearer("alice")) as http:
        assert (await http.post("/v1/threads", json={"id": "doomed"})).status_code == 201
        assert (await http.put("/v1/threads/doomed/members/bob")).status_code == 204
    sender = await open_socket(pod_a.ws, "doomed", "alice")
    watcher = await open_socket(pod_b.ws, "doomed", "bob")
    await recv_event(sender)
    await recv_event(watcher)
    await send(sender, {"type": "prompt", "content": "a long answer please"})
    deltas = 0
    while deltas < 3:
        deltas += (await recv_event(watcher))["type"] == "delta"
    async with httpx.AsyncClient(base_url=pod_b.http, headers=bearer("alice")) as http:
        assert (await http.delete("/v1/threads/doomed")).status_code == 204
    for ws in (sender, watcher):  # every socket of the thread, on both pods
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(10):
                while True:
                    await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    db = redis_server.client()
    # The turn's next write fails its fence check, and it stops: none of its
    # writes land, before or after.
    await asyncio.to_thread(
        wait_until, lambda: metric(pod_a, "durable_chat_turns_running") == 0, 15,
        what="the deleted thread's turn to stop",
    )  # fmt: skip
    left = {k for k in db.keys("*") if "doomed" in k}
    assert left == {"chat:{doomed}:fence"}
    assert 0 < db.ttl("chat:{doomed}:fence") <= 86400
    assert db.zscore("chat:user:{alice}:threads", "doomed") is None
    assert db.zscore("chat:user:{bob}:threads", "doomed") is None
    assert db.zscore("chat:user:{alice}:owned", "doomed") is None
    assert db.zscore("chat:turns", "doomed") is None
    assert "lost its lock" in pod_a.logs()
    # The id cannot be taken again while the tombstone lives.
    again = await open_socket(pod_b.ws, "doomed", "alice")
    with pytest.raises(ConnectionClosed) as refused:
        await recv_event(again)
    assert refused.value.rcvd is not None and refused.value.rcvd.code == 1008
    async with httpx.AsyncClient(base_url=pod_a.http, headers=bearer("alice")) as http:
        assert (await http.post("/v1/threads", json={"id": "doomed"})).status_code == 409
    # And pod A carries on serving.
    fresh = await open_socket(pod_a.ws, "after-delete", "alice")
    await recv_event(fresh)
    await send(fresh, {"type": "prompt", "content": "still here?"})
    assert (await until_done(fresh, timeout=20))[-1]["status"] == "complete"
    await fresh.close()
