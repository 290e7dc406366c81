"""durable-chat on a real 3-primary Redis Cluster: sharded pub/sub, hash-tagged
commits, the cross-pod, single-writer and resume guarantees, and the user
socket (presence, typing, inbox cards, socket leases) with each user's keys
and each thread's keys on a shard of their own."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
import websockets
from redis.asyncio.cluster import RedisCluster as AsyncCluster
from redis.cluster import RedisCluster

from app.chat import keys
from app.chat.keys import ThreadId, UserId
from app.chat.lock import TurnLock
from app.chat.records import Delta, Done, Loading, Message
from app.chat.scripts import Scripts
from app.chat.sharded import ShardedSubscriber
from app.chat.threads import Threads
from app.chat.timeline import BATCH, parse_message
from app.chat.turns import Begun, TurnStore
from app.client import ChatClient
from app.llm.fake import expected_reply
from tests import procs
from tests.integration.conftest import POD_SETTINGS, require_redis, track_pods
from tests.integration.helpers import (
    TIMEOUT_S,
    Event,
    close_code,
    connect,
    recv_any,
    recv_event,
    send,
    timeline,
    until_done,
)
from tests.integration.tokens import AUTH_ENV, bearer
from tests.procs import REDIS_SERVER, Server, wait_until

pytestmark = pytest.mark.integration


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        port = random.randint(20000, 50000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise AssertionError("no free port pair for a cluster node")


def _start_cluster(nodes: int, replicas: int) -> Iterator[list[int]]:
    """``nodes`` cluster-enabled redis-servers joined into one cluster with
    ``replicas`` replicas per primary; yields their ports (primaries first)."""
    tmp = Path(tempfile.mkdtemp(prefix="dc-cluster-"))
    ports = [_cluster_port() for _ in range(nodes)]
    procs = []
    try:
        for port in ports:
            workdir = tmp / str(port)
            workdir.mkdir()
            procs.append(
                subprocess.Popen(
                    [
                        REDIS_SERVER or "redis-server", "--port", str(port),
                        "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                        "--cluster-config-file", "nodes.conf", "--save", "",
                        "--appendonly", "no", "--dir", str(workdir),
                        "--cluster-node-timeout", "2000",
                    ],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
        for port in ports:
            wait_until(lambda p=port: _pings(p), 10, what=f"cluster node {port}")
        subprocess.run(
            ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
             "--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        for port in ports:
            wait_until(lambda p=port: _cluster_ok(p), 30, what=f"cluster state ok on {port}")
        yield ports
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def redis_cluster(redis_factory) -> Iterator[list[int]]:
    """A 3-primary cluster."""
    del redis_factory  # its skip/fail rule for a missing redis-server applies here too
    yield from _start_cluster(3, 0)


@pytest.fixture
def redis_cluster_with_replicas(redis_factory) -> Iterator[list[int]]:
    """A 3-primary, 3-replica cluster."""
    del redis_factory
    yield from _start_cluster(6, 1)


def _pings(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def _cluster_ok(port: int) -> bool:
    info = redis.Redis(port=port, decode_responses=True).cluster("info")
    return bool(info.get("cluster_state") == "ok")


class _Seed:
    """What pod_factory needs of a server: a URL (here, one cluster node)."""

    def __init__(self, port: int) -> None:
        self.url = f"redis://127.0.0.1:{port}"


def _threads_on_every_shard(ports: list[int], count: int = 6) -> list[str]:
    """Thread ids whose hash slots fall on each of the three primaries."""
    cluster = RedisCluster(host="127.0.0.1", port=ports[0])
    by_node: dict[str, list[str]] = {}
    i = 0
    while min((len(v) for v in by_node.values()), default=0) < count // 3 or len(by_node) < 3:
        thread = f"cl{i}"
        node = cluster.get_node_from_key(f"chat:{{{thread}}}:live")
        by_node.setdefault(node.name, []).append(thread)
        i += 1
    cluster.close()
    return [t for threads in by_node.values() for t in threads[: count // 3]]


async def test_cross_pod_timeline_on_every_shard(redis_cluster, pod_factory):
    seed_a, seed_b = _Seed(redis_cluster[0]), _Seed(redis_cluster[1])
    pod_a = pod_factory(seed_a, REDIS_CLUSTER=1)
    pod_b = pod_factory(seed_b, REDIS_CLUSTER=1)
    # A user socket: its inbox cards come on the user's own shard channel,
    # published by the pod after each commit (SPUBLISH cannot cross slots).
    inbox = await websockets.connect(f"{pod_a.ws}/v1/ws", open_timeout=10, max_queue=None)
    assert (await recv_event(inbox))["type"] == "inbox"
    spent = 0
    threads = _threads_on_every_shard(redis_cluster)
    for thread in threads:
        a = await connect(pod_a.ws, thread)
        b = await connect(pod_b.ws, thread)
        try:
            assert (await recv_event(a))["type"] == "ready"
            assert (await recv_event(b))["type"] == "ready"
            await send(b, {"type": "prompt", "content": f"on {thread}"})
            seen_a, seen_b = await asyncio.gather(until_done(a), until_done(b))
        finally:
            await a.close()
            await b.close()
        assert timeline(seen_a) == timeline(seen_b)
        text = "".join(e["text"] for e in seen_a if e["type"] == "delta")
        assert text == seen_a[-2]["message"]["content"] == expected_reply(f"on {thread}", 30)
        spent += sum(seen_a[-1]["usage"].values())
    ended: set[str] = set()
    async with asyncio.timeout(15):
        while ended != set(threads):
            event = await recv_event(inbox)
            if event["type"] == "thread" and event["thread"]["last_message"]:
                if event["thread"]["last_message"]["role"] == "assistant":
                    assert not event["thread"]["generating"] and event["thread"]["unread"] == 1
                    ended.add(event["thread"]["id"])
    await inbox.close()
    # Every turn's tokens reached the user's day, whatever shard its thread
    # lives on (the user's counters live on another slot: app.chat.usage).
    async with httpx.AsyncClient(base_url=pod_a.http, timeout=10) as http:
        assert (await http.get("/v1/usage")).json()["total_tokens"] == spent
    # Sharded pub/sub: channels are shard channels, not global ones.
    cluster = RedisCluster(host="127.0.0.1", port=redis_cluster[0], decode_responses=True)
    try:
        history = cluster.xrange("chat:{cl0}:history")
        assert [f["role"] for _, f in history][-2:] == ["user", "assistant"]
    finally:
        cluster.close()


async def test_single_writer_across_pods(redis_cluster, pod_factory):
    pod_a = pod_factory(_Seed(redis_cluster[0]), REDIS_CLUSTER=1, CHAT_FAKE_TOKEN_DELAY_MS=20)
    pod_b = pod_factory(_Seed(redis_cluster[2]), REDIS_CLUSTER=1, CHAT_FAKE_TOKEN_DELAY_MS=20)
    a = await connect(pod_a.ws, "clbusy")
    b = await connect(pod_b.ws, "clbusy")
    try:
        await recv_event(a)
        await recv_event(b)
        await asyncio.gather(
            send(a, {"type": "prompt", "content": "one"}),
            send(b, {"type": "prompt", "content": "two"}),
        )
        seen_a, seen_b = await asyncio.gather(until_done(a), until_done(b))
    finally:
        await a.close()
        await b.close()
    errors = [e for e in seen_a + seen_b if e["type"] == "error"]
    assert [e["code"] for e in errors] == ["thread_busy"]
    assert sum(e["type"] == "loading" for e in seen_a) == 1
    assert timeline(seen_a) == timeline(seen_b)


async def test_resume_on_other_pod(redis_cluster, pod_factory):
    pod_a = pod_factory(_Seed(redis_cluster[0]), REDIS_CLUSTER=1, CHAT_FAKE_TOKEN_DELAY_MS=10)
    pod_b = pod_factory(_Seed(redis_cluster[1]), REDIS_CLUSTER=1, CHAT_FAKE_TOKEN_DELAY_MS=10)
    watcher = await connect(pod_b.ws, "clresume")
    await recv_event(watcher)
    client = ChatClient([pod_a.ws, pod_b.ws], "clresume")
    await client.connect()
    received: list[dict] = []
    try:
        await client.prompt("resume me")
        async with asyncio.timeout(20):
            async for event in client.events():
                received.append(event)
                if client.reconnects == 0 and sum(e["type"] == "delta" for e in received) == 3:
                    # Cut the connection mid-turn (no close frame): the client resumes on B.
                    client._ws.transport.abort()
                if event["type"] == "done":
                    break
        everything = await until_done(watcher)
    finally:
        await client.close()
        await watcher.close()
    assert client.reconnects >= 1
    assert timeline(received) == timeline(everything)


def _replica_of_slot_owner(ports: list[int], key: str) -> int:
    """The port of a replica of the primary that owns ``key``'s slot."""
    cluster = RedisCluster(host="127.0.0.1", port=ports[0])
    try:
        primary = cluster.get_node_from_key(key)
        for port in ports:
            info = redis.Redis(port=port, decode_responses=True).info("replication")
            if info.get("role") == "slave" and int(info.get("master_port", 0)) == primary.port:
                return port
    finally:
        cluster.close()
    raise AssertionError(f"no replica of the owner of {key}")


async def test_turn_survives_failover_of_its_shard(redis_cluster_with_replicas, pod_factory):
    """A manual failover of the thread's primary mid-turn: the turn completes,
    and a listener on the other pod sees every event exactly once (its shard
    subscription is lost with the demoted primary and refilled from the log)."""
    ports = redis_cluster_with_replicas
    slow = {"REDIS_CLUSTER": 1, "CHAT_FAKE_TOKEN_DELAY_MS": 20, "CHAT_FAKE_REPLY_TOKENS": 150}
    pod_a = pod_factory(_Seed(ports[0]), **slow)
    pod_b = pod_factory(_Seed(ports[1]), **slow)
    thread = "clfail"
    replica = _replica_of_slot_owner(ports, f"chat:{{{thread}}}:live")
    listener = ChatClient([pod_b.ws, pod_a.ws], thread)
    await listener.connect()
    sender = await connect(pod_a.ws, thread)
    received: list[dict] = []
    try:
        await recv_event(sender)
        await send(sender, {"type": "prompt", "content": "through a failover"})
        async with asyncio.timeout(60):
            async for event in listener.events():
                received.append(event)
                if sum(e["type"] == "delta" for e in received) == 5:
                    await asyncio.to_thread(
                        redis.Redis(port=replica).execute_command, "CLUSTER", "FAILOVER"
                    )
                if event["type"] == "done":
                    break
    finally:
        await listener.close()
        await sender.close()
    wait_until(
        lambda: (
            redis.Redis(port=replica, decode_responses=True).info("replication")["role"] == "master"
        ),
        10,
        what="the replica to be promoted",
    )
    assert received[-1]["status"] == "complete"
    cluster = RedisCluster(host="127.0.0.1", port=replica, decode_responses=True)
    try:
        log = cluster.xrange(f"chat:{{{thread}}}:events")
    finally:
        cluster.close()
    got = [(e["id"], e["n"]) for e in received if "id" in e]
    assert got == [(entry_id, int(f["n"])) for entry_id, f in log]
    text = "".join(e["text"] for e in received if e["type"] == "delta")
    assert text == expected_reply("through a failover", 150)


def _errorstat(port: int, code: str) -> int:
    """How many ``code`` error replies (ASK, MOVED, TRYAGAIN) a node has sent."""
    stats = redis.Redis(port=port, decode_responses=True).info("errorstats")
    return int(stats.get(f"errorstat_{code}", {}).get("count", 0))


def _reshard_slot(slot: int, source: int, target: int, others: list[int], first: list[str]) -> None:
    """Move ``slot`` from the primary on ``source`` to the one on ``target`` as
    ``redis-cli --cluster reshard`` does, but one key at a time (``first`` ones
    first), waiting for the pods to meet each stage: ASK while the slot is
    half-moved, then MOVED once every primary says the target owns it."""
    src = redis.Redis(port=source, decode_responses=True)
    dst = redis.Redis(port=target, decode_responses=True)
    src_id, dst_id = src.execute_command("CLUSTER MYID"), dst.execute_command("CLUSTER MYID")
    asks, moved = _errorstat(source, "ASK"), _errorstat(source, "MOVED")
    dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
    src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)

    def migrate(key: str) -> None:
        src.execute_command("MIGRATE", "127.0.0.1", target, key, 0, 5000)
        time.sleep(0.02)  # pacing only: the pods keep working between keys

    for key in first:
        migrate(key)
    # Half-moved: the turn's lease renewals find the lock gone from the source
    # and are sent on to the target with ASK (every 0.5 s: CHAT_LOCK_TTL_MS).
    wait_until(lambda: _errorstat(source, "ASK") > asks, 10, what="a pod to be sent ASK")
    while batch := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 10):
        for key in batch:
            migrate(key)
    assert src.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 0
    # Target first, as redis-cli does; the source then drops the slot's shard
    # subscribers (SUNSUBSCRIBE) and answers MOVED to the turn's next write.
    for port in (target, source, *others):
        redis.Redis(port=port).execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
    wait_until(lambda: _errorstat(source, "MOVED") > moved, 10, what="a pod to be sent MOVED")


def _shard_subscribers(port: int, channel: str) -> int:
    """How many connections of this node are subscribed to the shard ``channel``."""
    [(_, count)] = redis.Redis(port=port, decode_responses=True).pubsub_shardnumsub(channel)
    return int(count)


async def test_turn_survives_live_resharding_of_its_slot(redis_cluster, pod_factory):
    """The thread's slot migrates to another primary mid-turn, key by key
    (IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE): the pods are sent ASK, then
    MOVED, and lose their shard subscription to SUNSUBSCRIBE. The turn still
    completes, both pods' clients see one identical, gap-free timeline equal to
    the event log, and the next turn runs on the slot's new owner."""
    ports, thread, tokens = redis_cluster, "clmove", 200
    events, live = f"chat:{{{thread}}}:events", f"chat:{{{thread}}}:live"
    slot = int(redis.Redis(port=ports[0]).execute_command("CLUSTER KEYSLOT", f"{{{thread}}}"))
    cluster = RedisCluster(host="127.0.0.1", port=ports[0], decode_responses=True)
    try:
        source = int(cluster.get_node_from_key(events).port)
    finally:
        cluster.close()
    target, *others = [p for p in ports if p != source]
    slow = {
        "REDIS_CLUSTER": 1, "CHAT_FAKE_TOKEN_DELAY_MS": 20, "CHAT_FAKE_REPLY_TOKENS": tokens,
        "CHAT_LOCK_TTL_MS": 1500,  # a lease renewal (single-key, so ASK-able) every 0.5 s
    }  # fmt: skip
    pod_a = pod_factory(_Seed(others[0]), **slow)
    pod_b = pod_factory(_Seed(source), **slow)
    sender = ChatClient([pod_a.ws], thread)
    listener = ChatClient([pod_b.ws], thread)
    await sender.connect()
    await listener.connect()
    seen: dict[str, list[dict]] = {"a": [], "b": []}

    async def read(name: str, client: ChatClient) -> None:
        async for event in client.events():
            seen[name].append(event)

    def count(name: str, kind: str) -> int:
        return sum(e["type"] == kind for e in seen[name])

    def finished(turns: int) -> bool:
        return count("a", "done") == count("b", "done") == turns

    def streaming() -> bool:
        return count("a", "delta") >= 3

    def subscribers() -> tuple[int, int]:
        """The pods' shard subscriptions to the thread's channel: (target, source)."""
        return _shard_subscribers(target, live), _shard_subscribers(source, live)

    readers = [asyncio.create_task(read("a", sender)), asyncio.create_task(read("b", listener))]
    try:
        await sender.prompt("across a reshard")
        await asyncio.to_thread(wait_until, streaming, 10, what="the turn to stream")
        first = [f"chat:{{{thread}}}:lock", f"chat:{{{thread}}}:turn"]
        await asyncio.to_thread(_reshard_slot, slot, source, target, others, first)
        assert count("a", "done") == count("b", "done") == 0  # it moved mid-turn
        await asyncio.to_thread(wait_until, lambda: finished(1), 15, what="the turn's done on both")
        # Both pods subscribe to the thread's channel again, on the new owner.
        await asyncio.to_thread(
            wait_until, lambda: subscribers() == (2, 0), 10, what="both pods on the new owner"
        )
        cluster = RedisCluster(host="127.0.0.1", port=ports[0], decode_responses=True)
        try:
            assert int(cluster.get_node_from_key(events).port) == target
            assert cluster.exists(f"chat:{{{thread}}}:lock") == 0
            history = cluster.xrange(f"chat:{{{thread}}}:history")
            assert [(f["role"], f["status"]) for _, f in history] == [
                ("user", "complete"), ("assistant", "complete")
            ]  # fmt: skip
            assert history[1][1]["content"] == expected_reply("across a reshard", tokens)

            await listener.prompt("after the reshard")  # from the other pod, on the new owner
            await asyncio.to_thread(
                wait_until, lambda: finished(2), 15, what="the next turn's done"
            )
            log = cluster.xrange(events)
            history = cluster.xrange(f"chat:{{{thread}}}:history")
            assert cluster.exists(f"chat:{{{thread}}}:lock") == 0
        finally:
            cluster.close()
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await sender.close()
        await listener.close()

    assert timeline(seen["a"]) == timeline(seen["b"])
    got = [(e["id"], e["n"]) for e in seen["b"] if "id" in e]
    assert got == [(entry_id, int(f["n"])) for entry_id, f in log]
    assert [n for _, n in got] == list(range(1, len(got) + 1))  # no gap, no duplicate
    dones = [e for e in seen["b"] if e["type"] == "done"]
    assert [d["status"] for d in dones] == ["complete", "complete"]
    for done, prompt in zip(dones, ["across a reshard", "after the reshard"], strict=True):
        text = "".join(
            e["text"]
            for e in seen["b"]
            if e["type"] == "delta" and e["generation_id"] == done["generation_id"]
        )
        assert text == expected_reply(prompt, tokens)
    assert [f["role"] for _, f in history] == ["user", "assistant", "user", "assistant"]
    assert history[3][1]["content"] == expected_reply("after the reshard", tokens)


async def test_turn_scripts_batch_and_answer_on_every_shard(redis_cluster):
    """The turn scripts' contract on a Cluster, each thread on another shard:
    APPEND_DELTA takes several deltas and END_TURN the last ones, each delta
    its own numbered event, and each call's events are one sharded message
    (BATCH); END_TURN answers from the thread's own slot whether prompts
    wait, whether the thread wants a title, and the usage charges to move."""
    cluster = AsyncCluster(host="127.0.0.1", port=redis_cluster[0], decode_responses=True)
    subscriber = ShardedSubscriber(cluster, f"redis://127.0.0.1:{redis_cluster[0]}")
    scripts = Scripts(cluster)
    store = TurnStore(cluster, scripts, "SPUBLISH", retention=1000, dedup_ttl_s=60)
    lock = TurnLock(scripts, ttl_ms=5000)
    user = keys.user_id("alice")
    try:
        for name in _threads_on_every_shard(redis_cluster, 3):
            thread = keys.thread_id(name)
            await Threads(cluster, scripts).open(thread, user)
            await subscriber.subscribe(keys.live(thread))
            assert (await subscriber.get_message(5))["type"] == "subscribe"
            lease = await lock.acquire(thread)
            assert lease is not None
            ask = Message("", "user", "q", user, 1, "complete")
            begun = await store.begin(thread, lease, ask, Loading(thread, "g", "fake"), "pod")
            assert isinstance(begun, Begun)
            published = [(await subscriber.get_message(5))["data"]]  # message and loading
            deltas = [Delta(thread, "g", seq, f"{seq} ") for seq in range(5)]
            assert await store.append_deltas(thread, lease, deltas[:3]) is False
            published.append((await subscriber.get_message(5))["data"])
            reply = Message("", "assistant", "0 1 2 3 4 ", "assistant", 2, "complete")
            usage = {"input_tokens": 3, "output_tokens": 5}
            ended = await store.end(
                thread, lease, reply, Done(thread, "g", "complete", usage=usage), deltas[3:]
            )
            published.append((await subscriber.get_message(5))["data"])
            assert ended is not None and not ended.queued and ended.untitled
            assert list(ended.charges) == ["g"] and ended.charges["g"].endswith(" 3 5")
            assert all(m.startswith(BATCH) for m in published)
            frames = [e for m in published for e in parse_message(m)]
            assert [e.n for e in frames if e] == list(range(1, 10))
            kinds = [orjson.loads(e.frame)["type"] for e in frames if e]
            assert kinds == ["message", "loading", *["delta"] * 5, "message", "done"]
            stored = await cluster.xrange(keys.events(thread))
            assert [e.frame for e in frames if e] == [
                f'{{"id":"{i}","n":{f["n"]},{f["data"][1:]}' for i, f in stored
            ]
            assert frames[-2] and ended.message_id == frames[-2].id
    finally:
        await subscriber.aclose()
        await cluster.aclose()


# --- the user socket on a Cluster ---------------------------------------------
# A user's keys and channel (chat:user:{U}:...) and a thread's (chat:{T}:...)
# hash to different slots: presence and typing stay on the thread's slot, the
# inbox cards are SPUBLISHed per member after each commit, socket leases are
# renewed with one call per user.

LEASE_MS = 1500  # CHAT_SOCKET_LEASE_MS: renewals every 500 ms
MAX_USER_SOCKETS = 2


@pytest.fixture(scope="module")
def cluster_pods(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[list[int], list[Server]]]:
    """One 3-primary cluster and two authenticated pods on it (seeded on
    different nodes), shared by the module's user-socket tests: each test has
    its own users and threads."""
    require_redis()
    workdir = tmp_path_factory.mktemp("cluster-usersock")
    settings = {
        **POD_SETTINGS, **AUTH_ENV, "REDIS_CLUSTER": 1, "CHAT_SOCKET_LEASE_MS": LEASE_MS,
        "CHAT_MAX_SOCKETS_PER_USER": MAX_USER_SOCKETS,
    }  # fmt: skip
    with contextlib.contextmanager(_start_cluster)(3, 0) as ports:
        made = [
            procs.pod(f"pod{i}", _Seed(port).url, workdir / f"pod{i}.log", **settings)
            for i, port in enumerate(ports[:2])
        ]
        track_pods(request).extend(made)
        try:
            _start_all(made)
            yield ports, made
        finally:
            for pod in made:
                pod.stop()


def _start_all(pods: list[Server]) -> None:
    """Start the pods not running (a test may have killed one), side by side."""
    down = [pod for pod in pods if pod.proc is None or pod.proc.poll() is not None]
    with ThreadPoolExecutor(max(1, len(down))) as pool:
        list(pool.map(Server.start, down))


def _one_per_primary(ports: list[int], prefix: str, key: Callable[[str], str]) -> list[str]:
    """Fresh names, one whose ``key(name)`` lives on each primary, in ``ports`` order."""
    cluster = RedisCluster(host="127.0.0.1", port=ports[0])
    found: dict[int, str] = {}
    try:
        while len(found) < len(ports):
            name = f"{prefix}-{uuid.uuid4().hex[:8]}"
            found.setdefault(int(cluster.get_node_from_key(key(name)).port), name)
    finally:
        cluster.close()
    return [found[port] for port in ports]


async def _user_socket(pod: Server, user: str) -> tuple[Any, Event]:
    """A user socket (/v1/ws) of ``user`` and its first event."""
    ws = await websockets.connect(
        f"{pod.ws}/v1/ws", open_timeout=10, max_queue=None, additional_headers=bearer(user)
    )
    return ws, await recv_event(ws)


async def _next_of(ws: Any, kind: str, thread: str) -> Event:
    """The next ``kind`` event about ``thread``, others skipped."""
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            event = await recv_any(ws)
            about = (
                event.get("thread", {}).get("id") if kind == "thread" else event.get("thread_id")
            )
            if event["type"] == kind and about == thread:
                return event


async def _presence(ws: Any, thread: str) -> list[str]:
    return list((await _next_of(ws, "presence", thread))["users"])


async def _card_where(ws: Any, thread: str, check: Callable[[Event], bool]) -> Event:
    """The first card of ``thread`` to come for which ``check`` holds."""
    while not check(card := dict((await _next_of(ws, "thread", thread))["thread"])):
        pass
    return card


def _replied(card: Event) -> bool:
    return bool(card["last_message"] and card["last_message"]["role"] == "assistant")


async def _turn_seen(ws: Any, thread: str, seen: list[Event]) -> list[Event]:
    """A turn's events on a joined user socket (after ``seen``), until both
    its ``done`` and its thread's card after the reply have come (in
    whichever order)."""
    async with asyncio.timeout(TIMEOUT_S):
        while not (
            any(e["type"] == "done" for e in seen)
            and any(e["type"] == "thread" and _replied(e["thread"]) for e in seen)
        ):
            event = await recv_event(ws)
            if event.get("thread_id") == thread or event.get("thread", {}).get("id") == thread:
                seen.append(event)
    return seen


def _leases(ports: list[int], user: str) -> list[float]:
    """The lease ends (Redis clock, ms) of ``user``'s counted sockets."""
    cluster = RedisCluster(host="127.0.0.1", port=ports[0])
    try:
        return [
            s for _, s in cluster.zrange(keys.user_sockets(UserId(user)), 0, -1, withscores=True)
        ]
    finally:
        cluster.close()


def _redis_ms(port: int) -> float:
    seconds, micros = redis.Redis(port=port).time()
    return seconds * 1000 + micros / 1000


async def test_socket_leases_are_renewed_per_user_and_the_limit_stays_exact(
    cluster_pods: tuple[list[int], list[Server]],
) -> None:
    """Three users whose socket counts live on three shards, each at the limit
    with a socket on each pod: every pod renews every lease (one call per
    user: a call may not touch two slots), so two leases later each user's
    next socket is still refused, and one freed socket lets exactly one in."""
    ports, pods = cluster_pods
    await asyncio.to_thread(_start_all, pods)  # both, even after the kill test below
    users = _one_per_primary(ports, "pl", lambda u: keys.user_sockets(UserId(u)))
    sockets = {u: [(await _user_socket(pod, u))[0] for pod in pods] for u in users}
    admitted = max(end for u in users for end in _leases(ports, u))

    def renewed() -> bool:
        leases = [_leases(ports, u) for u in users]
        return _redis_ms(ports[0]) > admitted and all(
            len(ends) == MAX_USER_SOCKETS and min(ends) > admitted for ends in leases
        )

    # Past the first leases' end, every socket still counts, with a later lease.
    await asyncio.to_thread(wait_until, renewed, 3 * LEASE_MS / 1000, what="every lease renewed")
    for user in users:
        ws, first = await _user_socket(pods[0], user)
        assert first["code"] == "rate_limited", first
        assert (await close_code(ws))[1] == 1013
    await sockets[users[0]][0].close()
    await asyncio.to_thread(
        wait_until, lambda: len(_leases(ports, users[0])) == 1, 5, what="the socket released"
    )
    again, first = await _user_socket(pods[1], users[0])
    assert first["type"] == "inbox"
    for pod in pods:
        assert "not renewed" not in pod.logs()
    for ws in (again, *sockets[users[0]][1:], *sockets[users[1]], *sockets[users[2]]):
        await ws.close()


async def test_user_sockets_on_two_pods_share_presence_typing_and_cards(
    cluster_pods: tuple[list[int], list[Server]],
) -> None:
    """Owner A on pod A, member B and viewer V on pod B, their keys on three
    shards, their thread's on a slot of its own: presence (the viewer too),
    typing and a turn's inbox cards reach both pods; a read marker clears A's
    unread on both of A's sockets; a revoked viewer is told and leaves the
    presence; B's pod killed -9 drops B from A's presence within the lease."""
    ports, (pod_a, pod_b) = cluster_pods
    a, b, v = _one_per_primary(ports, "pa", lambda u: keys.user_inbox(UserId(u)))
    _, _, thread = _one_per_primary(ports, "pt", lambda t: keys.live(ThreadId(t)))
    inbox_a, first = await _user_socket(pod_a, a)
    assert first == {"type": "inbox", "threads": [], "next_cursor": None}
    tab_a, _ = await _user_socket(pod_b, a)  # A's second socket, on the other pod
    inbox_b, _ = await _user_socket(pod_b, b)
    inbox_v, _ = await _user_socket(pod_b, v)
    async with httpx.AsyncClient(base_url=pod_a.http, headers=bearer(a), timeout=10) as alice:
        assert (await alice.post("/v1/threads", json={"id": thread})).status_code == 201
        for ws in (inbox_a, tab_a):
            assert (await _next_of(ws, "thread", thread))["thread"]["role"] == "owner"
        assert (await alice.put(f"/v1/threads/{thread}/members/{b}")).status_code == 204
        viewer = await alice.put(f"/v1/threads/{thread}/members/{v}", json={"role": "viewer"})
        assert viewer.status_code == 204
    for ws, role in ((inbox_b, "member"), (inbox_v, "viewer")):
        added = (await _next_of(ws, "thread", thread))["thread"]
        assert (added["role"], added["unread"], added["generating"]) == (role, 0, False)

    # Presence: each joins on their user socket; both pods show everyone
    # joined, the viewer too.
    await send(inbox_a, {"type": "join", "thread_id": thread})
    await _next_of(inbox_a, "ready", thread)
    assert await _presence(inbox_a, thread) == [a]
    await send(inbox_b, {"type": "join", "thread_id": thread})
    await _next_of(inbox_b, "ready", thread)
    assert await _presence(inbox_b, thread) == sorted([a, b])
    assert await _presence(inbox_a, thread) == sorted([a, b])
    await send(inbox_v, {"type": "join", "thread_id": thread})
    await _next_of(inbox_v, "ready", thread)
    assert await _presence(inbox_v, thread) == sorted([a, b, v])
    assert await _presence(inbox_a, thread) == sorted([a, b, v])
    await send(inbox_v, {"type": "prompt", "thread_id": thread, "content": "may I?"})
    assert (await _next_of(inbox_v, "error", thread))["code"] == "forbidden"

    # Typing: the other pod hears it, and at most once per 2 s however many
    # come; the typist never hears their own.
    for _ in range(20):
        await send(inbox_b, {"type": "typing", "thread_id": thread})
    await send(inbox_b, {"type": "ping"})
    assert (await recv_event(inbox_b))["type"] == "pong"  # the flood was handled
    await send(inbox_a, {"type": "typing", "thread_id": thread})
    assert await _next_of(inbox_b, "typing", thread) == {
        "type": "typing", "thread_id": thread, "user_id": a
    }  # fmt: skip

    # A turn of B's, sent after the flood: on A's socket, whatever the flood
    # published comes before the turn's first event (one channel, in order).
    # Both pods stream the turn, and each member's inbox gets the card after
    # it on their own shard: A and V have the prompt and the reply unread, B
    # (its author) the reply.
    await send(inbox_b, {"type": "prompt", "thread_id": thread, "content": "across shards"})
    before: list[Event] = []
    async with asyncio.timeout(TIMEOUT_S):
        while not before or before[-1]["type"] != "message":
            before.append(await recv_any(inbox_a))
    typed = [e for e in before if e["type"] == "typing"]
    assert typed == [{"type": "typing", "thread_id": thread, "user_id": b}]
    seen_a, seen_b, seen_v = await asyncio.gather(
        _turn_seen(inbox_a, thread, [before[-1]]),
        _turn_seen(inbox_b, thread, []),
        _turn_seen(inbox_v, thread, []),
    )
    assert timeline(seen_a) == timeline(seen_b) == timeline(seen_v)
    reply = [e for e in seen_a if e["type"] == "message"][-1]["message"]
    assert reply["content"] == expected_reply("across shards", 30)
    for seen, unread in ((seen_a, 2), (seen_b, 1), (seen_v, 2)):
        card = [e["thread"] for e in seen if e["type"] == "thread" and _replied(e["thread"])][-1]
        assert (card["unread"], card["generating"]) == (unread, False), card
        assert card["last_message"]["id"] == reply["id"]
    assert (await _card_where(tab_a, thread, _replied))["last_message"]["id"] == reply["id"]

    # A reads on pod A: both of A's sockets hear unread 0 (the card is
    # published on A's shard after the marker's commit on the thread's).
    await send(inbox_a, {"type": "read", "thread_id": thread, "message_id": reply["id"]})
    for ws in (inbox_a, tab_a):
        assert (await _card_where(ws, thread, lambda c: c["unread"] != 2))["unread"] == 0
    # A fresh snapshot (the user's thread list on B's shard, the card from
    # the thread's) agrees.
    again, snapshot = await _user_socket(pod_a, b)
    [summary] = snapshot["threads"]
    assert (summary["id"], summary["unread"], summary["role"]) == (thread, 1, "member")
    await again.close()

    # Revoked, V's inbox says so (on V's shard) and V leaves the presence;
    # B leaves and joins again: A's pod shows each change.
    async with httpx.AsyncClient(base_url=pod_a.http, headers=bearer(a), timeout=10) as alice:
        assert (await alice.delete(f"/v1/threads/{thread}/members/{v}")).status_code == 204
    assert await _next_of(inbox_v, "thread_removed", thread) == {
        "type": "thread_removed", "thread_id": thread, "reason": "revoked"
    }  # fmt: skip
    assert await _presence(inbox_a, thread) == sorted([a, b])
    await send(inbox_b, {"type": "leave", "thread_id": thread})
    assert await _presence(inbox_a, thread) == [a]
    await send(inbox_b, {"type": "join", "thread_id": thread})
    assert await _presence(inbox_a, thread) == sorted([a, b])

    # kill -9 of B's pod: B leaves A's presence within CHAT_SOCKET_LEASE_MS
    # (plus the time to send it). Pod B stays down: a test that needs it
    # starts it again.
    killed = time.monotonic()
    pod_b.kill()
    assert await _presence(inbox_a, thread) == [a]
    assert time.monotonic() - killed < LEASE_MS / 1000 + 1.0
    await inbox_a.close()
