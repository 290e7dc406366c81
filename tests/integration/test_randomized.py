"""A seeded random workout of three pods: many clients prompting, cancelling,
losing their connections and resuming on other pods. Afterwards every
client's timeline must equal the Redis event log from its first event on (no
gap, no duplicate, same order), and each turn must have exactly one
assistant message in the history."""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

import pytest

from app.client import ChatClient, ChatClosed
from tests.procs import wait_until

pytestmark = pytest.mark.integration

SEED = 20261125
THREADS = 5
CLIENTS = 12
STEPS = 70


async def test_random_clients_on_three_pods_see_the_redis_timeline(redis_server, pod_factory):
    rng = random.Random(SEED)
    env = {"CHAT_FAKE_TOKEN_DELAY_MS": 8, "CHAT_FAKE_REPLY_TOKENS": 25}
    pods = [pod_factory(redis_server, **env) for _ in range(3)]
    urls = [pod.ws for pod in pods]
    threads = [f"rnd{i}" for i in range(THREADS)]
    clients: list[ChatClient] = []
    received: list[list[dict[str, Any]]] = []
    consumers: list[asyncio.Task[None]] = []

    async def consume(client: ChatClient, sink: list[dict[str, Any]]) -> None:
        with contextlib.suppress(ChatClosed):
            async for event in client.events():
                sink.append(event)

    for i in range(CLIENTS):
        first = rng.randrange(3)
        client = ChatClient(urls[first:] + urls[:first], threads[i % THREADS])
        await client.connect()
        clients.append(client)
        received.append([])
        consumers.append(asyncio.create_task(consume(client, received[-1])))
    try:
        for _ in range(STEPS):
            client = rng.choice(clients)
            action = rng.choices(["prompt", "cancel", "cut", "wait"], [5, 1, 2, 2])[0]
            if action == "prompt":
                await client.prompt(f"say {rng.randrange(10_000)}")
            elif action == "cancel":
                await client.cancel()
            elif action == "cut" and client._ws is not None:
                client._ws.transport.abort()  # the client resumes on its next pod
            await asyncio.sleep(rng.choice([0, 0.01, 0.05, 0.1]))
        db = redis_server.client()

        def all_idle() -> bool:
            return not any(db.exists(f"chat:{{{t}}}:lock", f"chat:{{{t}}}:turn") for t in threads)

        wait_until(all_idle, 30, what="every turn to end")

        def caught_up() -> bool:
            for client, events in zip(clients, received, strict=True):
                log_tail = db.xrevrange(f"chat:{{{client.thread_id}}}:events", count=1)
                ids = [e["id"] for e in events if "id" in e]
                if log_tail and (not ids or ids[-1] != log_tail[0][0]):
                    return False
            return True

        await asyncio.to_thread(wait_until, caught_up, 20, 0.05, "clients to catch up")
    finally:
        for client in clients:
            await client.close()
        for task in consumers:
            task.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)

    assert sum(c.reconnects for c in clients) > 0, "the workout cut no connection"
    for client, events in zip(clients, received, strict=True):
        assert not any(e["type"] == "ready" and e.get("recovered") is False for e in events)
        got = [(e["id"], e["n"]) for e in events if "id" in e]
        if not got:
            continue
        log = db.xrange(f"chat:{{{client.thread_id}}}:events", got[0][0], "+")
        assert got == [(entry_id, int(f["n"])) for entry_id, f in log], client.thread_id
    turns = 0
    for thread in threads:
        log = db.xrange(f"chat:{{{thread}}}:events")
        loadings = sum('"type":"loading"' in f["data"] for _, f in log)
        history = db.xrange(f"chat:{{{thread}}}:history")
        assistants = [f["status"] for _, f in history if f["role"] == "assistant"]
        assert len(assistants) == loadings, (thread, assistants)
        assert sum(f["role"] == "user" for _, f in history) == loadings
        turns += loadings
    assert turns >= THREADS  # the workout really ran turns
