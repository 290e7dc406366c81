"""PROTOCOL.md's guarantees under failure, on real processes: pods killed and
drained mid-turn, cancels across pods, resumes, repeated prompts, slow
readers, and a Redis that goes away and comes back."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from app.client import ChatClient
from app.llm.fake import expected_reply
from tests.integration.conftest import wait_until
from tests.integration.helpers import collect_until, connect, recv_event, send, timeline

pytestmark = pytest.mark.integration

SLOW = {"CHAT_FAKE_TOKEN_DELAY_MS": 20, "CHAT_FAKE_REPLY_TOKENS": 200}
FAST_REAPER = {"CHAT_LOCK_TTL_MS": 1500, "CHAT_REAPER_INTERVAL_MS": 300}


async def _ready(base: str, thread: str, query: str = "") -> tuple[Any, dict[str, Any]]:
    ws = await connect(base, thread, query)
    ready = await recv_event(ws)
    assert ready["type"] == "ready"
    return ws, ready


async def _until_deltas(ws: Any, count: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while sum(e["type"] == "delta" for e in events) < count:
        events.append(await recv_event(ws))
    return events


def _assistant_messages(redis_server: Any, thread: str) -> list[dict[str, str]]:
    entries = redis_server.client().xrange(f"chat:{{{thread}}}:history")
    return [fields for _, fields in entries if fields["role"] == "assistant"]


async def test_kill_9_of_the_turns_pod_is_recovered_by_the_reaper(redis_server, pod_factory):
    doomed = pod_factory(redis_server, **SLOW, **FAST_REAPER)
    survivor = pod_factory(redis_server, **SLOW, **FAST_REAPER)
    sender, _ = await _ready(doomed.ws, "kill1")
    watcher, _ = await _ready(survivor.ws, "kill1")
    try:
        await send(sender, {"type": "prompt", "content": "die mid-sentence"})
        seen = await _until_deltas(watcher, 3)
        doomed.kill()
        killed_at = time.monotonic()
        seen += await collect_until(watcher, timeout=15)
        recovered_in = time.monotonic() - killed_at
        final, done = seen[-2], seen[-1]
        assert final["message"]["status"] == "interrupted"
        assert done["status"] == "interrupted" and done["message_id"] == final["id"]
        streamed = "".join(e["text"] for e in seen if e["type"] == "delta")
        assert final["message"]["content"] == streamed
        assert streamed and expected_reply("die mid-sentence", 200).startswith(streamed)
        assert recovered_in < 1.5 + 0.3 + 2.0  # lock TTL + one reaper interval + margin
        # The thread is free again.
        await send(watcher, {"type": "prompt", "content": "next"})
        assert (await collect_until(watcher))[-1]["status"] == "complete"
    finally:
        await watcher.close()
    assistants = _assistant_messages(redis_server, "kill1")
    assert [a["status"] for a in assistants] == ["interrupted", "complete"]


async def test_sigterm_lets_a_short_turn_finish_and_clients_resume_elsewhere(
    redis_server, pod_factory
):
    draining = pod_factory(redis_server, CHAT_FAKE_TOKEN_DELAY_MS=20, CHAT_FAKE_REPLY_TOKENS=60)
    other = pod_factory(redis_server, CHAT_FAKE_TOKEN_DELAY_MS=20, CHAT_FAKE_REPLY_TOKENS=60)
    observer, _ = await _ready(other.ws, "drain1")
    client = ChatClient([draining.ws, other.ws], "drain1")
    await client.connect()
    received: list[dict[str, Any]] = []
    try:
        await client.prompt("finish me")
        exit_code: asyncio.Task[int] | None = None
        async with asyncio.timeout(20):
            async for event in client.events():
                received.append(event)
                if exit_code is None and sum(e["type"] == "delta" for e in received) == 2:
                    exit_code = asyncio.create_task(asyncio.to_thread(draining.terminate))
                if event["type"] == "done":
                    break
        assert exit_code is not None and await exit_code == 0
        everything = await collect_until(observer)
    finally:
        await client.close()
        await observer.close()
    assert client.reconnects >= 1  # closed 1012 by the draining pod, resumed on the other
    assert timeline(received) == timeline(everything)
    assert received[-1]["status"] == "complete"
    text = "".join(e["text"] for e in received if e["type"] == "delta")
    assert text == expected_reply("finish me", 60)
    assert "Application shutdown complete" in draining.logs()


async def test_sigterm_interrupts_a_turn_longer_than_the_grace(redis_server, pod_factory):
    draining = pod_factory(redis_server, **SLOW, CHAT_DRAIN_GRACE_S=0.5)
    other = pod_factory(redis_server, **SLOW)
    sender, _ = await _ready(draining.ws, "drain2")
    watcher, _ = await _ready(other.ws, "drain2")
    try:
        await send(sender, {"type": "prompt", "content": "too long"})
        seen = await _until_deltas(watcher, 2)
        assert await asyncio.to_thread(draining.terminate) == 0
        seen += await collect_until(watcher)
    finally:
        await watcher.close()
    assert seen[-1]["status"] == "interrupted"
    streamed = "".join(e["text"] for e in seen if e["type"] == "delta")
    assert seen[-2]["message"]["content"] == streamed != ""
    assert [a["status"] for a in _assistant_messages(redis_server, "drain2")] == ["interrupted"]


async def test_cancel_from_the_other_pod(redis_server, pod_factory):
    runner = pod_factory(redis_server, **SLOW)
    other = pod_factory(redis_server, **SLOW)
    sender, _ = await _ready(runner.ws, "cancel1")
    canceller, _ = await _ready(other.ws, "cancel1")
    try:
        await send(sender, {"type": "prompt", "content": "stop me"})
        seen = await _until_deltas(canceller, 2)
        generation = next(e["generation_id"] for e in seen if e["type"] == "loading")
        asked = time.monotonic()
        await send(canceller, {"type": "cancel", "generation_id": generation})
        seen += await collect_until(canceller)
        took = time.monotonic() - asked
        sender_seen = await collect_until(sender)
    finally:
        await sender.close()
        await canceller.close()
    assert seen[-1]["status"] == "cancelled" and seen[-2]["message"]["status"] == "cancelled"
    assert took < 1.0  # the rest of the reply would take about 4 s
    streamed = "".join(e["text"] for e in seen if e["type"] == "delta")
    assert seen[-2]["message"]["content"] == streamed
    assert timeline(sender_seen)[-1] == timeline(seen)[-1]


async def test_reconnect_to_the_other_pod_mid_turn_and_after(redis_server, pod_factory):
    pod_a = pod_factory(redis_server, CHAT_FAKE_TOKEN_DELAY_MS=10, CHAT_FAKE_REPLY_TOKENS=80)
    pod_b = pod_factory(redis_server, CHAT_FAKE_TOKEN_DELAY_MS=10, CHAT_FAKE_REPLY_TOKENS=80)
    observer, _ = await _ready(pod_b.ws, "resume1")
    first, ready = await _ready(pod_a.ws, "resume1")
    await send(first, {"type": "prompt", "content": "resume me"})
    before = await _until_deltas(first, 3)
    await first.close()
    last_id = before[-1]["id"]
    again, ready2 = await _ready(pod_b.ws, "resume1", f"?after={last_id}&epoch={ready['epoch']}")
    try:
        assert ready2["recovered"] is True
        after = await collect_until(again)
        everything = await collect_until(observer)
        assert timeline(before + after) == timeline(everything)
    finally:
        await again.close()
        await observer.close()
    # After the turn: nothing more to replay, then live.
    done_id = everything[-1]["id"]
    late, ready3 = await _ready(pod_a.ws, "resume1", f"?after={done_id}&epoch={ready['epoch']}")
    try:
        assert ready3["recovered"] is True and ready3["last_event_id"] == done_id
        await send(late, {"type": "ping"})
        assert (await recv_event(late))["type"] == "pong"  # no replayed event came first
        # A `resume` on a live socket replays from the given id.
        await send(late, {"type": "resume", "after": before[-1]["id"], "epoch": ready["epoch"]})
        replay = [await recv_event(late) for _ in range(len(after))]
        assert timeline(replay) == timeline(after)
    finally:
        await late.close()
    # Another epoch never resumes silently.
    stale, ready4 = await _ready(pod_b.ws, "resume1", f"?after={last_id}&epoch=not-this-one")
    await stale.close()
    assert ready4["recovered"] is False


async def test_resume_beyond_retention_is_refused_loudly(redis_server, pod_factory):
    pod = pod_factory(
        redis_server, CHAT_EVENT_RETENTION=100, CHAT_FAKE_REPLY_TOKENS=40,
        CHAT_FAKE_TOKEN_DELAY_MS=0, CHAT_DELTA_WINDOW_MS=0,
    )  # fmt: skip
    ws, ready = await _ready(pod.ws, "trim1")
    try:
        await send(ws, {"type": "prompt", "content": "first"})
        first_turn = await collect_until(ws)
        for i in range(4):  # about 45 events a turn: the first turn is trimmed away
            await send(ws, {"type": "prompt", "content": f"more {i}"})
            await collect_until(ws)
        old = first_turn[1]["id"]
        await send(ws, {"type": "resume", "after": old, "epoch": ready["epoch"]})
        gap = await recv_event(ws)
        assert (gap["type"], gap["code"]) == ("error", "resume_gap")
    finally:
        await ws.close()
    assert redis_server.client().xlen("chat:{trim1}:events") < 200
    late, ready2 = await _ready(pod.ws, "trim1", f"?after={old}&epoch={ready['epoch']}")
    await late.close()
    assert ready2["recovered"] is False


async def test_repeated_prompt_on_another_pod_is_appended_once(redis_server, pod_factory):
    pod_a, pod_b = pod_factory(redis_server), pod_factory(redis_server)
    a, _ = await _ready(pod_a.ws, "idem1")
    b, _ = await _ready(pod_b.ws, "idem1")
    try:
        frame = {"type": "prompt", "content": "once", "client_msg_id": "abc-123"}
        await send(a, frame)
        original = (await collect_until(a))[0]
        await collect_until(b)
        await send(b, frame)
        repeated = await recv_event(b)
        assert repeated == original
        await send(b, {"type": "ping"})
        assert (await recv_event(b))["type"] == "pong"  # no second turn started
    finally:
        await a.close()
        await b.close()
    roles = [f["role"] for _, f in redis_server.client().xrange("chat:{idem1}:history")]
    assert roles == ["user", "assistant"]


def _open_unread_socket(port: int, thread: str) -> socket.socket:
    """A WebSocket that completes its handshake and then never reads: a tiny
    TCP receive window (set before connecting) makes the pod's sends block."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", port))
    raw.sendall(
        f"GET /v1/threads/{thread}/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
    )
    return raw


def _close_code_at_end(raw: socket.socket) -> int | None:
    """Read everything the pod sent until it closed; the close frame's code."""
    raw.settimeout(10)
    data = bytearray()
    while chunk := raw.recv(1 << 20):
        data += chunk
    at = data.rfind(b"\x88")  # FIN + close opcode; the pod's last frame
    return int.from_bytes(data[at + 2 : at + 4], "big") if at >= 0 else None


async def test_a_slow_reader_is_dropped_without_slowing_the_others(redis_server, pod_factory):
    pod = pod_factory(
        redis_server, CHAT_SEND_QUEUE=8, CHAT_MAX_PROMPT_CHARS=200_000,
        CHAT_FAKE_REPLY_TOKENS=3, CHAT_FAKE_TOKEN_DELAY_MS=0,
    )  # fmt: skip
    slow = _open_unread_socket(pod.port, "slow1")
    fast, _ = await _ready(pod.ws, "slow1")
    big = "x" * 150_000  # each user message event is this large: megabytes in all
    try:
        for i in range(40):
            await send(fast, {"type": "prompt", "content": f"{i} {big}"})
            seen = await collect_until(fast, timeout=20)
            assert seen[-1]["status"] == "complete"  # the fast reader is never held up
        async with httpx.AsyncClient() as http:
            scraped = (await http.get(f"{pod.http}/metrics")).text
        assert "durable_chat_slow_client_drops_total 1.0" in scraped
        assert await asyncio.to_thread(_close_code_at_end, slow) == 1013
    finally:
        await fast.close()
        slow.close()


async def test_redis_restart_mid_session(redis_factory, pod_factory):
    server = redis_factory(persistent=True)
    pod_a = pod_factory(server, CHAT_FAKE_TOKEN_DELAY_MS=5)
    pod_b = pod_factory(server, CHAT_FAKE_TOKEN_DELAY_MS=5)
    client = ChatClient([pod_a.ws, pod_b.ws], "outage1")
    await client.connect()
    received: list[dict[str, Any]] = []
    events = client.events()

    async def until_done() -> None:
        async with asyncio.timeout(20):
            while True:
                event = await anext(events)
                received.append(event)
                if event["type"] == "done":
                    return

    raw, _ = await _ready(pod_a.ws, "outage1")
    try:
        await client.prompt("before")
        await until_done()
        await collect_until(raw)
        server.stop()
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{pod_a.http}/readyz")).status_code == 503
            assert (await http.get(f"{pod_a.http}/healthz")).status_code == 200
        # An open socket is told to retry; a new one is turned away with 1013.
        await send(raw, {"type": "prompt", "content": "while down"})
        refused = await recv_event(raw)
        assert (refused["code"], refused["retryable"]) == ("unavailable", True)
        with pytest.raises(ConnectionClosed) as closed:
            probe = await connect(pod_b.ws, "outage1")
            await recv_event(probe)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        server.start()
        wait_until(pod_a.ready, 20, what="pod A ready again")
        wait_until(pod_b.ready, 20, what="pod B ready again")
        await client.prompt("after")
        await until_done()
    except Exception:
        print(pod_a.logs()[-3000:])
        raise
    finally:
        await client.close()
        await raw.close()
    assert pod_a.proc is not None and pod_a.proc.poll() is None
    log = server.client().xrange("chat:{outage1}:events")
    got = [(e["id"], e["n"]) for e in received if "id" in e]
    assert got == [(entry_id, int(f["n"])) for entry_id, f in log]
    assert not server.client().exists("chat:{outage1}:lock")
