"""A seeded random workout of three pods that are killed (-9) and drained
(SIGTERM) and restarted while a dozen ChatClients prompt, cancel, lose their
connections and resume on other pods. Half the threads queue prompts sent
while a turn runs (prompt_policy ``queue``), half refuse them; clients also
edit earlier messages, regenerate replies and switch branches.

Afterwards, for every client: the timeline events it received have strictly
increasing ids, no duplicate, and are exactly the Redis event log from its
first received event on (no gap); it was never told ``recovered: false``
(nothing was trimmed or lost). For every thread: every turn in the log is
whole (one assistant message per ``loading``, whose content is its deltas'
text, then ``done`` with the same status), the history holds exactly those
messages with their parent links, every queued prompt ran once and in queue
order (or was never started because it was refused), no client_msg_id was
appended twice, and no lock or waiting prompt is left.

The random choices come from a fixed seed (the same workout each run);
which turns a kill or a drain catches still depends on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from typing import Any

import httpx
import pytest

from app.client import ChatClient
from tests.integration.helpers import (
    assert_idle,
    assert_matches_log,
    assert_turns_well_formed,
    open_ready,
    stored_events,
    stored_history,
    unique,
    until_done,
)
from tests.procs import Server, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

SEED = 4242
PODS, THREADS, CLIENTS, STEPS = 3, 6, 12, 160
ENV = {
    "CHAT_FAKE_TOKEN_DELAY_MS": 10,
    "CHAT_FAKE_REPLY_TOKENS": 40,  # about half a second a turn
    "CHAT_LOCK_TTL_MS": 2000,
    "CHAT_REAPER_INTERVAL_MS": 500,
    "CHAT_DRAIN_GRACE_S": 0.15,  # some drained turns finish, some are interrupted
    "CHAT_PROMPT_POLICY": "queue",  # odd threads are set to reject below
    "CHAT_MAX_QUEUED": 3,
}
ACTIONS = {
    "prompt": 5, "edit": 1, "regenerate": 1, "switch": 0.6, "cancel": 1, "cut": 2, "wait": 2,
    "kill": 0.35, "term": 0.35,
}  # fmt: skip


async def test_random_clients_while_pods_die_and_drain(redis_server, pod_factory):
    rng = random.Random(SEED)
    pods: list[Server] = [pod_factory(redis_server, **ENV) for _ in range(PODS)]
    urls = [pod.ws for pod in pods]
    threads = [unique(f"chaos{i}") for i in range(THREADS)]
    clients: list[ChatClient] = []
    received: list[list[dict[str, Any]]] = []
    consumers: list[asyncio.Task[None]] = []
    bounce: asyncio.Task[None] | None = None
    done_ops: Counter[str] = Counter()

    async def consume(client: ChatClient, sink: list[dict[str, Any]]) -> None:
        async for event in client.events():
            sink.append(event)

    async def bounce_pod(pod: Server, how: str, downtime: float) -> None:
        """Kill or drain one pod, leave it down a while, start it again."""
        if how == "kill":
            await asyncio.to_thread(pod.kill)
        else:
            assert await asyncio.to_thread(pod.terminate) == 0, pod.logs()[-2000:]
        done_ops[how] += 1
        await asyncio.sleep(downtime)
        await asyncio.to_thread(pod.start)

    # Every thread has a past before the clients join: a client that joins a
    # thread with no event at all has no id to resume after, and if its
    # first connection drops before it sees one it can only be told
    # ``recovered: false`` (see test_resume); here that would be a failure.
    async def prime(thread: str) -> None:
        primer, _ = await open_ready(urls[0], thread)
        await primer.send('{"type":"prompt","content":"hello"}')
        await until_done(primer)
        await primer.close()

    await asyncio.gather(*(prime(thread) for thread in threads))
    async with httpx.AsyncClient(base_url=pods[0].http, timeout=10) as http:
        for thread in threads[1::2]:
            reply = await http.patch(f"/v1/threads/{thread}", json={"prompt_policy": "reject"})
            assert reply.status_code == 200, reply.text

    def seen_message(events: list[dict[str, Any]], role: str | None = None) -> str | None:
        """A message id this client has seen (of ``role``), or None."""
        ids = [
            e["id"] for e in events[-200:]
            if e["type"] == "message" and role in (None, e["message"]["role"])
        ]  # fmt: skip
        return rng.choice(ids) if ids else None

    for i in range(CLIENTS):
        first = rng.randrange(PODS)
        client = ChatClient(urls[first:] + urls[:first], threads[i % THREADS])
        await client.connect()
        clients.append(client)
        received.append([])
        consumers.append(asyncio.create_task(consume(client, received[-1])))
    db = redis_server.client()
    try:
        # Both kinds of pod failure happen at least once, at seeded steps.
        forced = {
            rng.randrange(10, STEPS // 2): "kill",
            rng.randrange(STEPS // 2, STEPS - 20): "term",
        }
        for step in range(STEPS):
            for task in consumers:
                if task.done():
                    task.result()  # a client gave up: fail with its error
            client = rng.choice(clients)
            action = forced.get(step) or rng.choices(list(ACTIONS), list(ACTIONS.values()))[0]
            mine = received[clients.index(client)]
            if action == "prompt":
                await asyncio.wait_for(client.prompt(f"say {rng.randrange(10_000)}"), 10)
            elif action == "edit" and (parent := seen_message(mine)) is not None:
                edit = client.prompt(f"edit {rng.randrange(10_000)}", parent_id=parent)
                await asyncio.wait_for(edit, 10)
            elif action == "regenerate" and (reply := seen_message(mine, "assistant")):
                await asyncio.wait_for(client.regenerate(reply), 10)
            elif action == "switch" and (target := seen_message(mine)) is not None:
                await asyncio.wait_for(client.switch(target), 10)
            elif action == "cancel":
                await asyncio.wait_for(client.cancel(), 10)
            elif action == "cut" and client._ws is not None:
                client._ws.transport.abort()  # the client resumes on its next pod
            elif action in ("kill", "term"):
                if bounce is not None and not bounce.done():
                    if step not in forced:
                        continue  # one pod down at a time
                    await bounce
                # Preferably a pod that runs a turn right now.
                busy = {db.hget(f"chat:{{{t}}}:turn", "pod") for t in threads} - {None}
                targets = [p for p in pods if p.env["CHAT_POD_ID"] in busy] or pods
                pod = rng.choice(targets)
                bounce = asyncio.create_task(bounce_pod(pod, action, rng.uniform(0.2, 1.0)))
            await asyncio.sleep(rng.choice([0.01, 0.03, 0.05, 0.08]))
        if bounce is not None:
            await bounce
        assert done_ops["kill"] >= 1 and done_ops["term"] >= 1, done_ops

        def all_idle() -> bool:
            return not any(
                db.exists(f"chat:{{{t}}}:lock", f"chat:{{{t}}}:turn", f"chat:{{{t}}}:queue")
                for t in threads
            )

        # A killed turn takes the lock TTL plus a reaper interval to close.
        await asyncio.to_thread(wait_until, all_idle, 20, 0.05, "every turn to end")

        def caught_up() -> bool:
            for client, events in zip(clients, received, strict=True):
                tail = db.xrevrange(f"chat:{{{client.thread_id}}}:events", count=1)
                if tail and not any(e.get("id") == tail[0][0] for e in events[-50:]):
                    return False
            return True

        await asyncio.to_thread(wait_until, caught_up, 20, 0.05, "clients to catch up")
    finally:
        if bounce is not None and not bounce.done():
            with contextlib.suppress(Exception):
                await bounce
        for client in clients:
            await client.close()
        for task in consumers:
            task.cancel()
        results = await asyncio.gather(*consumers, return_exceptions=True)
    failures = [r for r in results if not isinstance(r, asyncio.CancelledError | type(None))]
    assert not failures, failures

    reconnects = sum(c.reconnects for c in clients)
    assert reconnects > 0, "the workout cut no connection"
    for client, events in zip(clients, received, strict=True):
        refused = [e for e in events if e["type"] == "ready" and e.get("recovered") is False]
        assert not refused, f"a client of {client.thread_id} could not resume: {refused}"
        if any("id" in e for e in events):
            assert_matches_log(events, redis_server, client.thread_id)
    statuses: Counter[str] = Counter()
    turns = 0
    for thread in threads:
        turns += assert_turns_well_formed(redis_server, thread)
        assert_idle(redis_server, thread)
        stored = stored_history(redis_server, thread)
        ids = [m["client_msg_id"] for m in stored if m.get("client_msg_id")]
        assert len(ids) == len(set(ids)), f"a prompt was appended twice in {thread}"
        statuses.update(m["status"] for m in stored if m["role"] == "assistant")
    kinds = Counter(e["type"] for t in threads for e in stored_events(redis_server, t))
    print(f"turns {turns}, statuses {dict(statuses)}, reconnects {reconnects}, ops {done_ops}, "
          f"events {dict(kinds)}")  # fmt: skip
    # The workout did switch, queue and branch (edits, regenerates), not only prompt.
    assert kinds["branch"] and kinds["queued"], kinds
    forks = [
        v for t in threads for k, v in db.hgetall(f"chat:{{{t}}}:tree").items()
        if k.startswith("c:") and "," in v
    ]  # fmt: skip
    assert forks, "no message got a sibling"
    assert turns >= THREADS, "the workout ran too few turns"
