"""A sick network between pods and Redis, through a fault-injecting proxy
(tests/integration/faultproxy.py): added latency, a blackhole that keeps
connections open (half-open: only timeouts and probes notice), and a cut of
only the pub/sub connections. What must hold: no turn commits twice or after
its fence, a blackholed pod notices within a bound, reports not ready and
its sockets move, and every client's timeline is the Redis log.

One redis-server and one proxy serve the module; each test heals the proxy."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.llm.fake import expected_reply
from tests.integration.conftest import require_redis
from tests.integration.faultproxy import FaultProxy
from tests.integration.helpers import (
    assert_consistent,
    close_all,
    metric,
    of_type,
    recorders,
    stored_history,
    unique,
    until_status,
)
from tests.procs import RedisServer, wait_until

pytestmark = pytest.mark.integration

# Short bounds, so that faults are noticed in about a second.
FAST = {
    "CHAT_SUBSCRIBER_PROBE_S": 0.5,
    "CHAT_SUBSCRIBER_DEADLINE_S": 0.3,
    "CHAT_SUBSCRIBER_MOVE_S": 2,
    "REDIS_SOCKET_TIMEOUT_S": 1,
    "CHAT_LOCK_TTL_MS": 3000,
    "CHAT_REAPER_INTERVAL_MS": 500,
}


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    require_redis()
    tmp = Path(tempfile.mkdtemp(prefix="dc-sick-"))
    made = RedisServer(tmp).start()
    try:
        yield made
    finally:
        made.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def module_proxy(server: RedisServer) -> Iterator[FaultProxy]:
    made = FaultProxy(server.port)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def proxy(module_proxy: FaultProxy) -> Iterator[FaultProxy]:
    module_proxy.heal()
    try:
        yield module_proxy
    finally:
        module_proxy.heal()


@pytest.mark.parametrize("latency_s", [0.05, 0.5])
async def test_turns_under_added_latency(server, proxy, pod_factory, latency_s):
    pods = [pod_factory(proxy, CHAT_FAKE_TOKEN_DELAY_MS=10) for _ in range(2)]
    threads = [unique("slow")]
    writers = await recorders([pods[0].ws, pods[1].ws], threads)
    watchers = await recorders([pods[1].ws, pods[0].ws], threads)
    proxy.latency(latency_s)
    try:
        for rec in writers:
            await rec.client.prompt(f"q {rec.thread}")
        for rec in writers + watchers:
            await rec.until(lambda ev: len(of_type(ev, "done")) == 1, 30, "the turn under latency")
        for pod in pods:  # slow is not unready: the probe's deadline is 3 s
            assert await until_status(pod, lambda s: s == 200, 5, "ready under latency") < 5
    finally:
        await close_all(writers + watchers)
    assert all(of_type(rec.events, "done")[0]["status"] == "complete" for rec in writers + watchers)
    for thread in threads:
        replies = [m["content"] for m in stored_history(server, thread)]
        assert replies == [f"q {thread}", expected_reply(f"q {thread}", 30)]
    assert_consistent(writers + watchers, server, turns=1)


async def test_blackholed_pod_goes_unready_and_its_sockets_move(server, proxy, pod_factory):
    """Pod A reaches Redis through the proxy, pod B directly. A's network
    turns into a blackhole while a turn streams on each pod: A fails /readyz
    within a second or two, its sockets move to B, A's own turn is closed by
    B's reaper once its lease runs out (interrupted), and when the network
    heals A's stale turn writes nothing: its fence is gone."""
    env = {**FAST, "CHAT_FAKE_TOKEN_DELAY_MS": 20, "CHAT_FAKE_REPLY_TOKENS": 100}
    pod_a, pod_b = pod_factory(proxy, **env), pod_factory(server, **env)
    on_a, on_b = unique("on_a"), unique("on_b")
    [writer_a] = await recorders([pod_a.ws, pod_b.ws], [on_a])
    [writer_b] = await recorders([pod_b.ws, pod_a.ws], [on_b])
    [watcher_a] = await recorders([pod_a.ws, pod_b.ws], [on_b])
    everyone = [writer_a, writer_b, watcher_a]
    try:
        await writer_a.client.prompt("runs on A")
        await writer_b.client.prompt("runs on B")
        for rec in (writer_a, writer_b, watcher_a):
            await rec.until(lambda ev: len(of_type(ev, "delta")) >= 3, 15, "the turns to stream")

        proxy.blackhole()
        # A 503 (not just a probe timing out on the ping): A knows it is deaf
        # within the probe's interval and deadline (0.8 s here).
        deaf_after = await until_status(pod_a, lambda s: s == 503, 10, "A's 503", each_s=0.5)
        assert deaf_after < 1.5, deaf_after
        assert await until_status(pod_b, lambda s: s == 200, 1, "B to stay ready") < 1
        # A's sockets close 1013 and resume on B (their next URL), where both
        # turns end: B's own, and A's, closed by B's reaper as interrupted.
        for rec in (writer_a, watcher_a):
            await rec.until(lambda ev: len(of_type(ev, "ready")) >= 2, 10, "the socket to move")
        for rec in everyone:
            await rec.until(lambda ev: len(of_type(ev, "done")) == 1, 20, "both turns to end")
        statuses = [of_type(r.events, "done")[0]["status"] for r in everyone]
        assert statuses == ["interrupted", "complete", "complete"]
        assert metric(pod_b, "durable_chat_turns_reaped") == 1
        proxy.heal()
        # A's turn, still retrying, reaches Redis again: refused, it stops.
        await asyncio.to_thread(
            wait_until, lambda: "lost its lock" in pod_a.logs(), 20, what="A's stale turn to stop"
        )
        await until_status(pod_a, lambda s: s == 200, 10, "A to be ready again")
        assert metric(pod_a, "durable_chat_subscriber_deaf") >= 1
        assert metric(pod_a, "durable_chat_followers_moved") >= 2
    finally:
        await close_all(everyone)
    assert [m["role"] for m in stored_history(server, on_a)] == ["user", "assistant"]
    assert_consistent(everyone, server, turns=1)


async def test_pubsub_connections_cut_mid_turn(server, proxy, pod_factory):
    """Only the subscribers are cut (RST), twice, while turns stream: each
    pod reconnects, refills from the event log, and no client notices."""
    env = {"CHAT_FAKE_TOKEN_DELAY_MS": 10, "CHAT_FAKE_REPLY_TOKENS": 100}
    pods = [pod_factory(proxy, **env) for _ in range(2)]
    threads = [unique("cut") for _ in range(2)]
    writers = await recorders([pods[0].ws, pods[1].ws], threads)
    watchers = await recorders([pods[1].ws, pods[0].ws], threads)
    before = [metric(pod, "durable_chat_subscriber_connects") for pod in pods]
    try:
        for rec in writers:
            await rec.client.prompt(f"q {rec.thread}")
        for cut in range(2):
            for rec in writers:
                await rec.until(
                    lambda ev, c=cut: len(of_type(ev, "delta")) >= 10 * (c + 1), 15, "deltas"
                )
            assert proxy.cut_subscribers() == 2  # one subscriber per pod, whatever it follows
        for rec in writers + watchers:
            await rec.until(lambda ev: len(of_type(ev, "done")) == 1, 20, "the turns to end")
    finally:
        await close_all(writers + watchers)
    after = [metric(pod, "durable_chat_subscriber_connects") for pod in pods]
    assert all(a >= b + 2 for a, b in zip(after, before, strict=True)), (before, after)
    assert all(rec.client.reconnects == 0 for rec in writers + watchers)
    assert_consistent(writers + watchers, server, turns=1)
