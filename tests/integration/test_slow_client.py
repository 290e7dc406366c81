"""A reader that stops reading is dropped once its bounded send queue
(CHAT_SEND_QUEUE) overflows: closed with 1013 so that it resumes with
``after``, while a normal reader of the same thread on the same pod receives
the whole turn intact and is never held up.

How the pod's sends are made to block for real: a pod can only see that a
client is slow when writing to its socket blocks, which takes the kernel's
socket buffers on both sides to be full. So the prompt itself is larger than
the largest send buffer the kernel lets a socket grow to (tcp_wmem), plus
2 MB: its ``message`` event alone cannot be wholly in flight to a socket that
does not read, and that socket's writer blocks in it. The reply (one delta
per token) then overflows the 8-slot queue within a few tokens.

Two stalled readers: ``late`` starts reading as soon as the pod reports the
drop, drains the backlog and must find the close frame with 1013 at its end
(the pod waits CHAT's close timeout, 1 s, for the close frame to go out);
``dead`` (a 4 KB receive window) never reads until the pod is done with it, so no
close frame can reach it: the pod must cut its connection instead of holding
it (and its buffers) forever.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import orjson
import pytest
import websockets

from app.llm.fake import expected_reply
from tests.integration.helpers import assert_matches_log, deltas_text, metric, unique, until_done
from tests.procs import wait_until

pytestmark = pytest.mark.integration


def _max_send_buffer() -> int:
    """The largest TCP send buffer this kernel grows a socket to (Linux), else 4 MiB."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        return 4 << 20


TOKENS = 3000
PROMPT_BYTES = _max_send_buffer() + 2_000_000
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
            lambda: metric(pod, "durable_chat_sockets_open") == 3,
            10,
            what="three open sockets",
        )
        await fast.send(orjson.dumps({"type": "prompt", "content": prompt}).decode())
        reading = asyncio.create_task(until_done(fast, timeout=30))
        await asyncio.to_thread(
            wait_until,
            lambda: metric(pod, "durable_chat_slow_client_drops") >= 2,
            20,
            what="both stalled readers dropped",
        )
        # `late` reads now, while the pod still waits for its close frame to go out.
        late_frames, _ = await asyncio.to_thread(_read_frames, late, 10)
        seen = await reading
        # `dead` reads only once the pod is done with it (its handler has
        # returned: the close frame sent, or the connection cut); reading
        # earlier would drain it in time for a graceful close.
        await asyncio.to_thread(
            wait_until,
            lambda: metric(pod, "durable_chat_sockets_open") == 1,
            10,
            what="`dead` let go",
        )
        dead_frames, dead_bytes = await asyncio.to_thread(_read_frames, dead, 5)
    finally:
        await fast.close()
        late.close()
        dead.close()

    assert late_frames[-1][0] == 0x8, "the late reader got no close frame at the end"
    assert int.from_bytes(late_frames[-1][1][:2], "big") == 1013
    late_events = _check_prefix(late_frames)
    assert late_events[-1]["type"] != "done", "it was dropped, yet got the whole turn"

    # The pod cut `dead`'s connection (CHAT's close timeout after the drop)
    # rather than keep it and its backlog: the read above ended instead of
    # timing out, with what the kernel's buffers held, `ready` and part of
    # the `message`; neither the rest nor a close frame could have arrived.
    assert dead_bytes < PROMPT_BYTES, "the pod kept the connection of a reader that never reads"
    whole = [orjson.loads(payload)["type"] for opcode, payload in dead_frames if opcode == 0x1]
    assert len(whole) == len(dead_frames), "no close frame can have arrived"
    assert whole in (["ready"], ["ready", "presence"]), f"only `ready` (and `presence`): {whole}"
    _check_prefix(dead_frames)

    # The normal reader got every event, in order, and the whole reply.
    assert seen[0]["message"]["content"] == prompt
    assert seen[-1]["status"] == "complete"
    generation = next(e["generation_id"] for e in seen if e["type"] == "loading")
    text = deltas_text(seen, generation)
    assert text == seen[-2]["message"]["content"] == expected_reply(prompt, TOKENS)
    assert sum(e["type"] == "delta" for e in seen) == TOKENS
    assert_matches_log(seen, redis_server, thread)
