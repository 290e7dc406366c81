"""A thread whose Redis data is lost under live sockets: no silent hole."""

from __future__ import annotations

import asyncio

import pytest

from app.client import ChatClient
from tests.integration.helpers import connect, recv_event, send, until_done
from tests.procs import wait_until

pytestmark = pytest.mark.integration


async def test_live_client_learns_the_thread_was_reset(redis_server, pod_factory):
    """Redis restarts empty (no persistence): a client that stayed connected is
    made to resume, and is told ``recovered: false`` with a new epoch, instead
    of silently missing what was lost or what comes next."""
    pod = pod_factory(redis_server)
    client = ChatClient([pod.ws], "lost1")
    await client.connect()
    events = client.events()
    try:
        first_ready = await anext(events)
        await client.prompt("before the loss")
        while (await anext(events))["type"] != "done":
            pass
        redis_server.stop()
        redis_server.start()  # empty: it kept nothing
        wait_until(pod.ready, 20, what="the pod to see Redis again")
        other = await connect(pod.ws, "lost1")  # someone else carries on
        try:
            await recv_event(other)
            await send(other, {"type": "prompt", "content": "after the loss"})
            await until_done(other)
        finally:
            await other.close()
        async with asyncio.timeout(15):
            while True:
                event = await anext(events)
                if event["type"] == "ready":
                    break
    finally:
        await client.close()
    assert event["recovered"] is False
    assert event["epoch"] != first_ready["epoch"]
    assert client.reconnects >= 1
