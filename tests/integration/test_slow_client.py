"""A reader that stops reading is dropped once its bounded send queue
(CHAT_SEND_QUEUE) overflows: closed with 1013 so that it resumes with
``after``, while a normal reader of the same thread on the same pod receives
the whole turn intact and is never held up.

How the pod's sends are made to block for real: a pod can only see that a
client is slow when writing to its socket blocks, which takes the kernel's
socket buffers on both sides to be full (a few MB on loopback). So the
prompt itself is 4 MB: its ``message`` event alone fills the buffers of a
socket that does not read, and the writer of that socket blocks on the next
event. The reply (one delta per token) then overflows the 8-slot queue
within a few tokens.

Two stalled readers: ``late`` starts reading as soon as the pod reports the
drop, drains the backlog and must find the close frame with 1013 at its end
(the pod waits CHAT's close timeout, 1 s, for the close frame to go out);
``dead`` never reads until the turn is over: the pod must let go of its
connection (a close frame if the kernel's buffers had room for it, else a
cut) instead of holding it and its backlog forever.
"""

from __future__ import annotations

import asyncio
import re
import socket

import httpx
import orjson
import pytest
import websockets

from app.llm.fake import expected_reply
from tests.integration.conftest import wait_until
from tests.integration.contract_helpers import unique
from tests.integration.failure_helpers import (
    assert_matches_log,
    deltas_text,
    until_done,
)

pytestmark = pytest.mark.integration

TOKENS = 3000
PROMPT_BYTES = 4_000_000
ENV = {
    "CHAT_SEND_QUEUE": 8,
    "CHAT_FAKE_TOKEN_DELAY_MS": 0,
    "CHAT_FAKE_REPLY_TOKENS": TOKENS,
    "CHAT_DELTA_WINDOW_MS": 0,  # every token is its own delta
    "CHAT_MAX_PROMPT_CHARS": PROMPT_BYTES + 100,
    "CHAT_MAX_FRAME_BYTES": PROMPT_BYTES + 10_000,
}


def _open_stalled(port: int, thread: str, small_window: bool) -> socket.socket:
    """A raw WebSocket that completes its upgrade and then is not read."""
    raw = socket.socket()
    if small_window:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", port))
    raw.sendall(
        f"GET /v1/threads/{thread}/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
    )
    return raw


def _read_frames(raw: socket.socket, timeout: float) -> tuple[list[tuple[int, bytes]], int]:
    """The pod's (unmasked) frames after its 101 response, as (opcode,
    payload), read until a close frame or the end of the connection; and how
    many bytes came. A frame cut off by the end of the connection is left out.
    A timeout here means the pod kept a stalled connection open."""
    raw.settimeout(timeout)
    data = bytearray()
    frames: list[tuple[int, bytes]] = []
    i: int | None = None
    while not frames or frames[-1][0] != 0x8:
        try:
            chunk = raw.recv(1 << 20)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            break
        data += chunk
        if i is None:
            if b"\r\n\r\n" not in data:
                continue
            assert data.startswith(b"HTTP/1.1 101"), bytes(data[:80])
            i = data.index(b"\r\n\r\n") + 4
        while i + 2 <= len(data):
            opcode, length, at = data[i] & 0x0F, data[i + 1] & 0x7F, i + 2
            if length == 126:
                length, at = int.from_bytes(data[at : at + 2], "big"), at + 2
            elif length == 127:
                length, at = int.from_bytes(data[at : at + 8], "big"), at + 8
            if at + length > len(data):
                break
            frames.append((opcode, bytes(data[at : at + length])))
            i = at + length
    return frames, len(data)


def _check_prefix(frames: list[tuple[int, bytes]]) -> list[dict]:
    """The stalled socket's events before it was dropped: ready, then the
    timeline in order with contiguous numbers (no gap, no duplicate)."""
    events = [orjson.loads(payload) for opcode, payload in frames if opcode == 0x1]
    assert events and events[0]["type"] == "ready"
    numbers = [e["n"] for e in events if "n" in e]
    assert numbers == list(range(1, len(numbers) + 1)), numbers[:20]
    return events


def _drops(pod_http: str) -> float:
    text = httpx.get(f"{pod_http}/metrics").text
    found = re.search(r"^durable_chat_slow_client_drops_total (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def test_a_reader_that_stops_reading_is_closed_1013(redis_server, pod_factory):
    pod = pod_factory(redis_server, **ENV)
    thread = unique("slow")
    late = _open_stalled(pod.port, thread, small_window=False)
    dead = _open_stalled(pod.port, thread, small_window=True)
    fast = await websockets.connect(
        f"{pod.ws}/v1/threads/{thread}/ws", max_size=None, max_queue=None, open_timeout=10
    )
    prompt = "x" * PROMPT_BYTES
    try:
        assert orjson.loads(await fast.recv())["type"] == "ready"
        # Both stalled sockets are open (counted by the pod) before the prompt.
        await asyncio.to_thread(
            wait_until,
            lambda: "durable_chat_sockets_open 3.0" in httpx.get(f"{pod.http}/metrics").text,
            10,
            what="three open sockets",
        )
        await fast.send(orjson.dumps({"type": "prompt", "content": prompt}).decode())
        reading = asyncio.create_task(until_done(fast, timeout=30))
        await asyncio.to_thread(
            wait_until, lambda: _drops(pod.http) >= 2, 20, what="both stalled readers dropped"
        )
        # `late` reads now, while the pod still waits for its close frame to go out.
        late_frames, _ = await asyncio.to_thread(_read_frames, late, 10)
        seen = await reading
        dead_frames, _ = await asyncio.to_thread(_read_frames, dead, 5)
    finally:
        await fast.close()
        late.close()
        dead.close()

    assert late_frames[-1][0] == 0x8, "the late reader got no close frame at the end"
    assert int.from_bytes(late_frames[-1][1][:2], "big") == 1013
    late_events = _check_prefix(late_frames)
    assert late_events[-1]["type"] != "done", "it was dropped, yet got the whole turn"

    # The pod let go of `dead` (it did not keep the connection and its
    # backlog): the read above ended instead of timing out. What arrived is
    # what the kernel's buffers held when the pod dropped it, which depends on
    # the machine's TCP buffer sizes: a gap-free prefix of the turn, and a
    # 1013 close frame at the end if there was room for it, else a cut.
    if dead_frames[-1][0] == 0x8:
        assert int.from_bytes(dead_frames[-1][1][:2], "big") == 1013
    dead_events = _check_prefix(dead_frames)
    assert dead_events[-1]["type"] != "done", "it was dropped, yet got the whole turn"

    # The normal reader got every event, in order, and the whole reply.
    assert seen[0]["message"]["content"] == prompt
    assert seen[-1]["status"] == "complete"
    generation = next(e["generation_id"] for e in seen if e["type"] == "loading")
    text = deltas_text(seen, generation)
    assert text == seen[-2]["message"]["content"] == expected_reply(prompt, TOKENS)
    assert sum(e["type"] == "delta" for e in seen) == TOKENS
    assert_matches_log(seen, redis_server, thread)
