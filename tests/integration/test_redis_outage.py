"""Redis dies (SIGKILL) in the middle of a turn and comes back on the same
port with its data (AOF, fsync always). Pods must stay up (alive, not
ready), refuse work with retryable errors meanwhile, and afterwards carry on:
the interrupted turn completes, a refused prompt sent again completes once,
and every client's timeline is the Redis event log, gap- and duplicate-free."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from app.client import ChatClient
from app.llm.fake import expected_reply
from tests.integration.helpers import (
    assert_idle,
    assert_matches_log,
    assert_turns_well_formed,
    connect,
    open_ready,
    read_until,
    recv_event,
    stored_history,
    unique,
)
from tests.procs import wait_until

pytestmark = pytest.mark.integration

TOKENS = 150  # at 10 ms: the turn outlives the outage's start
ENV = {"CHAT_FAKE_TOKEN_DELAY_MS": 10, "CHAT_FAKE_REPLY_TOKENS": TOKENS}
DOWN_FOR_S = 1.5


def _dones(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "done"]


async def _status(http: httpx.AsyncClient, url: str) -> int:
    try:
        return (await http.get(url, timeout=5)).status_code
    except httpx.HTTPError:
        return 0


async def test_redis_killed_mid_turn_and_restarted(redis_factory, pod_factory):
    server = redis_factory(persistent=True)
    pods = [pod_factory(server, **ENV), pod_factory(server, **ENV)]
    pod_a, pod_b = pods
    thread = unique("outage")
    observer, _ = await open_ready(pod_b.ws, thread)
    client = ChatClient([pod_a.ws, pod_b.ws], thread)
    await client.connect()
    received: list[dict[str, Any]] = []

    async def consume() -> None:
        async for event in client.events():
            received.append(event)

    consumer = asyncio.create_task(consume())
    raw, _ = await open_ready(pod_a.ws, thread)
    http = httpx.AsyncClient()
    try:
        await client.prompt("one")
        await asyncio.to_thread(
            wait_until,
            lambda: sum(e["type"] == "delta" for e in received) >= 5,
            10,
            what="the turn to stream",
        )
        server.stop()  # SIGKILL

        # The pods live on, say they are not ready, and refuse work retryably.
        for pod in pods:
            assert await _status(http, f"{pod.http}/healthz") == 200
            assert await _status(http, f"{pod.http}/readyz") == 503
        await raw.send('{"type":"prompt","content":"while down"}')
        refused = await read_until(raw, lambda e: e["type"] == "error", timeout=10)
        assert (refused[-1]["code"], refused[-1]["retryable"]) == ("unavailable", True)
        cmid = await client.prompt("two")  # refused too, kept by the client
        await asyncio.to_thread(
            wait_until,
            lambda: any(e["type"] == "error" for e in received),
            10,
            what="the client's prompt to be refused",
        )
        assert [e["code"] for e in received if e["type"] == "error"] == ["unavailable"]
        # A new socket cannot join now: closed 1013, try again later.
        with pytest.raises(ConnectionClosed) as closed:
            probe = await connect(pod_b.ws, thread)
            await recv_event(probe, 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        assert all(pod.proc is not None and pod.proc.poll() is None for pod in pods)
        await asyncio.sleep(max(0.0, DOWN_FOR_S - 1.0))

        server.start()  # same port, same data
        for pod in pods:
            await asyncio.to_thread(wait_until, pod.ready, 10, what="the pod to be ready again")

        # The turn cut by the outage completes, whole.
        await asyncio.to_thread(
            wait_until, lambda: _dones(received), 15, what="the first turn to end"
        )
        assert _dones(received)[0]["status"] == "complete"
        # The refused prompt, sent again with its client_msg_id, runs once.
        await client.prompt("two", client_msg_id=cmid)
        await asyncio.to_thread(
            wait_until, lambda: len(_dones(received)) == 2, 15, what="the second turn to end"
        )
        watched = await read_until(observer, lambda e: e.get("id") == received[-1]["id"])
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        await client.close()
        await observer.close()
        await raw.close()
        await http.aclose()
    assert all(pod.proc is not None and pod.proc.poll() is None for pod in pods)
    assert [d["status"] for d in _dones(received)] == ["complete", "complete"]
    stored = stored_history(server, thread)
    assert [(m["role"], m["content"]) for m in stored] == [
        ("user", "one"),
        ("assistant", expected_reply("one", TOKENS)),
        ("user", "two"),
        ("assistant", expected_reply("two", TOKENS)),
    ]
    assert stored[2]["client_msg_id"] == cmid
    assert_matches_log(received, server, thread)
    assert_matches_log(watched, server, thread)
    assert assert_turns_well_formed(server, thread) == 2
    assert_idle(server, thread)
