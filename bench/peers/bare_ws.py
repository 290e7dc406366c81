"""Baseline: a bare uvicorn WebSocket broadcast, no Redis, no framework.

The upper bound of the WebSocket leg of the path on this machine: a raw ASGI
application keeps, per thread, the set of its local sockets, and a turn sends
each frame (JSON-encoded once) to each of them in turn. There is no Redis and
no cross-process delivery: the benchmark sends each thread's prompt to every
process, and each process streams the turn to its own sockets.

Client protocol: ``/ws/<thread>``; ``{"type":"ready"}`` once registered; the
client sends ``{"type":"prompt","content":...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from bench.peers.common import Frame, TurnConfig, run_turn, serve

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class BareBroadcast:
    """The ASGI app: rooms of raw ASGI ``send`` callables."""

    def __init__(self) -> None:
        self.rooms: dict[str, set[Send]] = {}
        self.config = TurnConfig.from_env()
        self.turns: set[asyncio.Task[None]] = set()

    async def publish(self, thread: str, frame: Frame) -> None:
        message = {"type": "websocket.send", "text": json.dumps(frame, separators=(",", ":"))}
        for send in list(self.rooms.get(thread, ())):
            with contextlib.suppress(Exception):  # a socket closing meanwhile
                await send(message)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = (await receive())["type"]
                if event == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "websocket" or not scope["path"].startswith("/ws/"):
            return
        thread = scope["path"][len("/ws/") :]
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        room = self.rooms.setdefault(thread, set())
        room.add(send)
        try:
            await send({"type": "websocket.send", "text": '{"type":"ready"}'})
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
                data = json.loads(message.get("text") or "{}")
                if data.get("type") == "prompt":
                    task = asyncio.create_task(
                        run_turn(thread, data["content"], self.publish, self.config)
                    )
                    self.turns.add(task)
                    task.add_done_callback(self.turns.discard)
        finally:
            room.discard(send)
            if not room:
                self.rooms.pop(thread, None)


if __name__ == "__main__":
    serve(lambda _redis: BareBroadcast(), __doc__)
