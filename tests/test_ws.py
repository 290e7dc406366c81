"""A thread socket's greeting (app.ws.ThreadStream): ``ready``, the catch-up
and the join's ``presence``, written at once where the socket allows, on a
real uvicorn (websockets-sansio, as a pod serves)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from starlette.websockets import WebSocket

from app import uvicorn_adapter, ws
from app.chat.follower import Follower
from app.chat.keys import ThreadId, UserId
from app.chat.records import Joined
from app.chat.service import Opened
from app.chat.timeline import TimelineEvent, ephemeral
from app.protocol import ready_frame
from tests.test_uvicorn_adapter import RawClient, serving

THREAD = ThreadId("t1")


def delta(n: int, text: str) -> TimelineEvent:
    frame = orjson.dumps({"id": f"{n}-0", "n": n, "type": "delta", "text": text}).decode()
    return TimelineEvent(f"{n}-0", (n, 0), n, frame)


async def greeting(
    replay: list[TimelineEvent], monkeypatch: pytest.MonkeyPatch
) -> tuple[list[str], list[str], int]:
    """Serve one thread socket whose join read ``replay`` and left its
    presence frame in the queue. Returns the frames it should send, those a
    raw client read, and how many shared writes carried them."""
    joined = Joined(thread_id=THREAD, epoch="e", last_event_id="9-0", generating=False,
                    generation_id=None, recovered=True)  # fmt: skip
    presence = ephemeral('{"type":"presence","thread_id":"t1","users":["u"]}')
    expected = [ready_frame(joined), *(event.frame for event in replay), presence.frame]
    writes: list[bytes] = []
    write = uvicorn_adapter.FrameWriter.write

    def counted(self: uvicorn_adapter.FrameWriter, frame: bytes) -> None:
        writes.append(frame)
        write(self, frame)

    monkeypatch.setattr(uvicorn_adapter.FrameWriter, "write", counted)
    test_over = asyncio.Event()

    async def endpoint(socket: WebSocket) -> None:
        socket.app.state.frames = ws.SharedFrames()
        await socket.accept()
        follower = Follower(THREAD, 16, "u")
        follower.deliver(presence)
        service: Any = None  # a greeting asks nothing of the service
        opened = Opened(joined, replay, follower)
        stream = ws.ThreadStream(ws.SocketOut(socket), service, THREAD, UserId("u"), opened)
        writer = asyncio.create_task(stream.write_forever())
        await test_over.wait()
        writer.cancel()

    received = []
    async with serving(endpoint, "websockets-sansio") as port, asyncio.timeout(10):
        raw = await RawClient.connect(port)
        try:
            for _ in expected:
                frame = await raw.frame()
                length = frame[1] & 0x7F
                received.append(frame[{126: 4, 127: 10}.get(length, 2) :].decode())
        finally:
            raw.close()
            test_over.set()
    return expected, received, len(writes)


async def test_a_short_greeting_is_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    replay = [delta(8, "a"), delta(9, "b")]
    expected, received, writes = await greeting(replay, monkeypatch)
    assert received == expected  # ready, the catch-up, then presence
    assert writes == 1


async def test_a_long_catch_up_takes_the_asgi_sends_in_the_same_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    replay = [delta(n, "x" * 2000) for n in range(1, 10)]
    assert sum(len(event.frame) for event in replay) > ws.GREETING_CHARS
    expected, received, writes = await greeting(replay, monkeypatch)
    assert received == expected
    assert writes == 0
