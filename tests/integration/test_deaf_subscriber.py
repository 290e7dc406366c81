"""A subscriber that stops hearing: Redis cuts it at its pub/sub output-buffer
limit (python-socketio #1581: a listener that died silently for a day), or
its connection goes silent while staying open. The pod notices, replaces
it, refills every thread from the event log, fails /readyz until it hears
again, and counts it; every client still gets every event."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.integration.faultproxy import FaultProxy
from tests.integration.helpers import (
    assert_consistent,
    close_all,
    close_code,
    metric,
    of_type,
    open_ready,
    readyz,
    recorders,
    unique,
    until_status,
)
from tests.integration.tokens import AUTH_ENV, bearer

pytestmark = pytest.mark.integration


async def test_redis_cuts_the_subscriber_at_its_output_buffer_limit(redis_server, pod_factory):
    """The pub/sub output buffer is cut at 1 KiB, and every delta of these
    turns is about 2 KiB (a fast model: CHAT_DELTA_MAX_BYTES fills at once):
    Redis closes both pods' subscribers again and again mid-turn."""
    redis_server.client().config_set("client-output-buffer-limit", "pubsub 1kb 0 0")
    # The audit is off (60 s): the refills after each cut bring what was lost.
    # The audit is off (60 s): the refills after each cut bring what was lost.
    env = {"CHAT_FAKE_TOKEN_DELAY_MS": 0, "CHAT_FAKE_REPLY_TOKENS": 3000, "CHAT_FANOUT_AUDIT_S": 60}
    pods = [pod_factory(redis_server, **env) for _ in range(2)]
    threads = [unique("burst") for _ in range(2)]
    writers = await recorders([pods[0].ws, pods[1].ws], threads)
    watchers = await recorders([pods[1].ws, pods[0].ws], threads)
    before = [metric(pod, "durable_chat_subscriber_connects") for pod in pods]
    try:
        for rec in writers:
            await rec.client.prompt(f"burst {rec.thread}")
        for rec in writers + watchers:
            await rec.until(lambda ev: len(of_type(ev, "done")) == 1, 30, "the burst to end")
    finally:
        await close_all(writers + watchers)
    log = await asyncio.to_thread(Path(redis_server.workdir, "redis.log").read_text)
    assert "overcoming of output buffer limits" in log  # Redis did cut them
    after = [metric(pod, "durable_chat_subscriber_connects") for pod in pods]
    # At least one pod was cut (how big a delta grows, and so whether a
    # given pod's subscriber passes 1 KiB, depends on the machine's timing).
    assert any(a > b for a, b in zip(after, before, strict=True)), (before, after)
    assert all(rec.client.reconnects == 0 for rec in writers + watchers)
    assert all(of_type(rec.events, "done")[0]["status"] == "complete" for rec in writers)
    assert all(len(of_type(rec.events, "delta")) > 5 for rec in writers)
    assert_consistent(writers + watchers, redis_server, turns=1)


async def test_a_silent_subscriber_is_replaced_and_readyz_waits_for_it(redis_server, pod_factory):
    """Pod A's subscriber connections, and only those, are blackholed: open
    but silent. A's probe misses its deadline, /readyz says so, the metric
    counts it; its sockets stay (CHAT_SUBSCRIBER_MOVE_S=0) and get every
    event, in order, from the refills of the log that follow each
    replacement (the audit is off here: CHAT_FANOUT_AUDIT_S=60)."""
    proxy = FaultProxy(redis_server.port)
    try:
        env = {
            "CHAT_SUBSCRIBER_PROBE_S": 0.5, "CHAT_SUBSCRIBER_DEADLINE_S": 0.3,
            "CHAT_SUBSCRIBER_MOVE_S": 0, "CHAT_FANOUT_AUDIT_S": 60,
            "CHAT_FAKE_TOKEN_DELAY_MS": 10, "CHAT_FAKE_REPLY_TOKENS": 100,
        }  # fmt: skip
        pod_a, pod_b = pod_factory(proxy, **env), pod_factory(redis_server, **env)
        thread = unique("silent")
        [writer] = await recorders([pod_b.ws], [thread])
        [watcher] = await recorders([pod_a.ws], [thread])
        try:
            proxy.blackhole(subscribers=True)
            await until_status(pod_a, lambda s: s == 503, 5, "A to say it cannot hear")
            await writer.client.prompt("while A is deaf")
            await writer.until(lambda ev: len(of_type(ev, "done")) == 1, 20, "the turn, on B")
            # Each new subscriber is silent too: each is caught and replaced,
            # and each replacement refills A's sockets from the log.
            assert metric(pod_a, "durable_chat_subscriber_deaf") >= 2
            assert await readyz(pod_a) == 503
            assert await until_status(pod_b, lambda s: s == 200, 1, "B ready") < 1
            proxy.heal()
            await until_status(pod_a, lambda s: s == 200, 10, "A to hear again")
            await watcher.until(lambda ev: len(of_type(ev, "done")) == 1, 10, "the refill on A")
        finally:
            await close_all([writer, watcher])
        assert watcher.client.reconnects == 0
        assert_consistent([writer, watcher], redis_server, turns=1)
    finally:
        proxy.close()


async def test_subscribers_killed_again_and_again_lose_nothing(redis_server, pod_factory):
    """`CLIENT KILL TYPE pubsub` every 20 ms while turns stream: whatever a
    pod's subscriber missed, a turn's last event included, comes from the
    refill after its reconnect. The audit is off (CHAT_FANOUT_AUDIT_S=60):
    the refill alone recovers it, which is what lets the audit skip idle
    threads."""
    env = {
        "CHAT_FANOUT_AUDIT_S": 60, "CHAT_FAKE_TOKEN_DELAY_MS": 5,
        "CHAT_FAKE_REPLY_TOKENS": 200,
    }  # fmt: skip
    pods = [pod_factory(redis_server, **env) for _ in range(2)]
    threads = [unique("killed") for _ in range(3)]
    writers = await recorders([pods[0].ws, pods[1].ws], threads)
    watchers = await recorders([pods[1].ws, pods[0].ws], threads)
    before = [metric(pod, "durable_chat_subscriber_connects") for pod in pods]
    admin = redis_server.client()
    kills = 0
    try:
        for rec in writers:
            await rec.client.prompt(f"through the kills {rec.thread}")
        # Until every writer has its done: the last events are published
        # while subscribers keep dying.
        while not all(of_type(rec.events, "done") for rec in writers):
            kills += await asyncio.to_thread(
                admin.execute_command, "CLIENT", "KILL", "TYPE", "pubsub"
            )
            await asyncio.sleep(0.02)
        for rec in writers + watchers:
            await rec.until(lambda ev: len(of_type(ev, "done")) == 1, 20, "every done")
    finally:
        await close_all(writers + watchers)
    assert kills > 2
    after = [metric(pod, "durable_chat_subscriber_connects") for pod in pods]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    assert all(rec.client.reconnects == 0 for rec in writers + watchers)
    assert_consistent(writers + watchers, redis_server, turns=1)


async def test_a_pod_that_missed_an_erasure_closes_the_users_socket_once_it_hears(
    redis_server, pod_factory
):
    """Erasing a user tells every pod over pub/sub; pod A's subscriber is
    blackholed then and hears nothing. Its next subscriber finds the
    erasure noted in chat:erasures (since it last heard) and closes the
    erased user's socket (1008); the other member's stays open."""
    proxy = FaultProxy(redis_server.port)
    try:
        env = {
            **AUTH_ENV, "CHAT_SUBSCRIBER_PROBE_S": 0.5, "CHAT_SUBSCRIBER_DEADLINE_S": 0.3,
            "CHAT_SUBSCRIBER_MOVE_S": 0, "CHAT_FANOUT_AUDIT_S": 60,
        }  # fmt: skip
        pod_a, pod_b = pod_factory(proxy, **env), pod_factory(redis_server, **env)
        thread, alice, bob = unique("erased-deaf"), "alice-deaf", unique("bob-deaf")
        owner, _ = await open_ready(pod_b.ws, thread, additional_headers=bearer(alice))
        async with httpx.AsyncClient(base_url=pod_b.http, timeout=30) as http:
            added = await http.put(f"/v1/threads/{thread}/members/{bob}", headers=bearer(alice))
            assert added.status_code == 204, added.text
            theirs, _ = await open_ready(pod_a.ws, thread, additional_headers=bearer(bob))
            watcher, _ = await open_ready(pod_a.ws, thread, additional_headers=bearer(alice))
            try:
                proxy.blackhole(subscribers=True)
                await until_status(pod_a, lambda s: s == 503, 5, "A to say it cannot hear")
                erased = await http.delete(f"/v1/users/{bob}/data", headers=bearer(bob))
                assert erased.status_code == 200, erased.text
                assert erased.json()["sockets_closed"] == 1
                _, code = await close_code(theirs, timeout=10)
                assert code == 1008
                proxy.heal()
                await until_status(pod_a, lambda s: s == 200, 10, "A to hear again")
                assert watcher.close_code is None  # Alice's socket on A stays
            finally:
                for ws in (owner, theirs, watcher):
                    await ws.close()
    finally:
        proxy.close()
