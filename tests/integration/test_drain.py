"""SIGTERM mid-turn, as Kubernetes sends it: the pod closes its sockets with
1012 (clients resume elsewhere with ``after``), lets running turns finish
within CHAT_DRAIN_GRACE_S, commits the rest as ``interrupted`` itself (no
reaper needed), and exits 0."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
from typing import Any

import pytest

from app.client import ChatClient
from app.llm.fake import expected_reply
from app.process import EXIT_MARGIN_S
from tests.integration.helpers import (
    Stopwatch,
    assert_idle,
    assert_matches_log,
    assert_turns_well_formed,
    close_code,
    deltas_text,
    open_ready,
    stored_history,
    timeline,
    unique,
    until_deltas,
    until_done,
)

pytestmark = pytest.mark.integration

CLOSE_RESTART = 1012


async def test_a_turn_shorter_than_the_grace_completes_and_clients_resume_elsewhere(
    redis_server, pod_factory
):
    env = {"CHAT_FAKE_TOKEN_DELAY_MS": 20, "CHAT_FAKE_REPLY_TOKENS": 60}  # about 1.3 s
    draining = pod_factory(redis_server, **env)
    other = pod_factory(redis_server, **env)
    thread = unique("drain")
    observer, _ = await open_ready(other.ws, thread)
    sender, _ = await open_ready(draining.ws, thread)
    client = ChatClient([draining.ws, other.ws], thread)
    await client.connect()
    received: list[dict[str, Any]] = []
    exit_code: asyncio.Task[int] | None = None
    try:
        await sender.send('{"type":"prompt","content":"finish me"}')
        async with asyncio.timeout(20):
            async for event in client.events():
                received.append(event)
                if exit_code is None and sum(e["type"] == "delta" for e in received) == 2:
                    exit_code = asyncio.create_task(asyncio.to_thread(draining.terminate))
                if event["type"] == "done":
                    break
        before_close, code = await close_code(sender)
        everything = await until_done(observer)
        assert exit_code is not None
        assert await exit_code == 0
    finally:
        await client.close()
        await observer.close()
        await sender.close()
    assert code == CLOSE_RESTART
    assert before_close == everything[: len(before_close)]  # a prefix, in order
    # The client was closed 1012 and resumed on the other pod: every event
    # exactly once, the same as a client that never moved.
    assert client.reconnects >= 1
    assert [e.get("recovered") for e in received if e["type"] == "ready"][1:] == [True]
    assert timeline(received) == timeline(everything)
    assert received[-1]["status"] == "complete"
    generation = next(e["generation_id"] for e in everything if e["type"] == "loading")
    assert deltas_text(received, generation) == expected_reply("finish me", 60)
    assert_matches_log(received, redis_server, thread)
    assert assert_turns_well_formed(redis_server, thread) == 1
    assert_idle(redis_server, thread)
    # The pod ended the turn itself and only then stopped.
    logs = draining.logs()
    ended = logs.find(f"turn {generation} ended complete")
    assert 0 <= ended < logs.find(f"pod {draining.env['CHAT_POD_ID']} stopped"), logs[-2000:]


async def test_a_turn_longer_than_the_grace_is_committed_interrupted(redis_server, pod_factory):
    slow = {"CHAT_FAKE_TOKEN_DELAY_MS": 20, "CHAT_FAKE_REPLY_TOKENS": 200}  # about 4 s
    draining = pod_factory(redis_server, **slow, CHAT_DRAIN_GRACE_S=0.5)
    other = pod_factory(redis_server, **slow)
    threads = [unique("grace"), unique("grace")]
    senders = [(await open_ready(draining.ws, t))[0] for t in threads]
    watchers = [(await open_ready(other.ws, t))[0] for t in threads]
    try:
        for sender in senders:  # two turns on the draining pod at once
            await sender.send('{"type":"prompt","content":"too long to wait for"}')
        seen = list(await asyncio.gather(*(until_deltas(w, 2) for w in watchers)))
        clock = Stopwatch()
        assert await asyncio.to_thread(draining.terminate) == 0
        took = clock.elapsed
        # Committed by the draining pod before it exited (the lock lease is
        # 15 s and no other reaper ran): nothing is left to recover.
        for thread in threads:
            assert_idle(redis_server, thread)
        closes = [await close_code(s) for s in senders]
        for i, watcher in enumerate(watchers):
            seen[i] += await until_done(watcher, timeout=5)
    finally:
        for ws in senders + watchers:
            await ws.close()
    assert [code for _, code in closes] == [CLOSE_RESTART, CLOSE_RESTART]
    assert took < 0.5 + 2.5, f"the drain took {took:.1f}s, as if it waited for the turns"
    for thread, events in zip(threads, seen, strict=True):
        generation = next(e["generation_id"] for e in events if e["type"] == "loading")
        final, done = events[-2], events[-1]
        streamed = deltas_text(events, generation)
        assert final["message"]["status"] == "interrupted" and done["status"] == "interrupted"
        assert final["message"]["content"] == streamed != ""
        assert streamed != expected_reply("too long to wait for", 200)
        assert done["message_id"] == final["id"]
        assert_matches_log(events, redis_server, thread)
        stored = stored_history(redis_server, thread)
        assert [(m["role"], m["status"]) for m in stored] == [
            ("user", "complete"),
            ("assistant", "interrupted"),
        ]
        assert stored[1]["content"] == streamed
        assert assert_turns_well_formed(redis_server, thread) == 1


def _stalled_reader(port: int, thread: str) -> socket.socket:
    """A socket of ``thread`` that completed its upgrade and then never reads
    again (a 4 KB window): the pod's writes to it block, its close handshake
    never completes."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /v1/threads/{thread}/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    assert sock.recv(12) == b"HTTP/1.1 101"
    return sock


async def test_a_drained_pod_exits_within_its_bound_whatever_hangs(redis_server, pod_factory):
    # Turns that stream for minutes, sockets that never read, and a Redis
    # that stops answering (SIGSTOP: connections stay open, nothing comes
    # back). A pod once waited for ever on such things; now it must exit
    # within CHAT_DRAIN_GRACE_S + EXIT_MARGIN_S of SIGTERM, and cleanly: every
    # step of its drain gives up in time, so the watchdog is not needed.
    grace = 1.0
    pod = pod_factory(
        redis_server, CHAT_DRAIN_GRACE_S=grace,
        CHAT_FAKE_TOKEN_DELAY_MS=20, CHAT_FAKE_REPLY_TOKENS=100_000,
    )  # fmt: skip
    threads = [unique("hang") for _ in range(3)]
    sockets = []
    stalled = []
    try:
        for thread in threads:
            ws, _ = await open_ready(pod.ws, thread)
            sockets.append(ws)
            await ws.send('{"type":"prompt","content":"talk for ever"}')
            await until_deltas(ws, 2)
            stalled.append(await asyncio.to_thread(_stalled_reader, pod.port, thread))
        assert redis_server.proc is not None
        redis_server.proc.send_signal(signal.SIGSTOP)
        clock = Stopwatch()
        code = await asyncio.to_thread(pod.terminate, grace + EXIT_MARGIN_S + 10)
        took = clock.elapsed
    finally:
        if redis_server.proc is not None:
            redis_server.proc.send_signal(signal.SIGCONT)
        for sock in stalled:
            sock.close()
        for ws in sockets:
            ws.transport.abort()
    logs = pod.logs()
    assert took <= grace + EXIT_MARGIN_S, f"exited after {took:.1f}s\n{logs[-3000:]}"
    assert code == 0, logs[-3000:]
    assert "did not stop within" not in logs
    assert "left to the reaper" in logs  # the turns could not commit: a reaper will
