"""Peer: python-socketio's ``AsyncServer`` with ``AsyncRedisManager``, under uvicorn.

The textbook multi-process Socket.IO chat: each client joins its thread's
room; a ``prompt`` event starts a turn on the server that received it, and
every frame of the turn is ``emit``-ted to the room. The Redis manager
delivers the emit to the room's members on this process directly and
publishes it (pickled) on the one ``socketio`` channel, from which every other
process emits it to its own members of the room.

Client protocol (Engine.IO 4 over a WebSocket, ``/socket.io/?EIO=4&transport=websocket``):
``42["join","<thread>"]`` → ``42["ready",{...}]``; ``42["prompt",{"thread","content"}]``;
frames arrive as ``42["chat",{...}]``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import socketio

from bench.peers.common import Frame, TurnConfig, ping_interval_s, run_turn, serve


def create_app(redis_url: str) -> Any:
    manager = socketio.AsyncRedisManager(redis_url)
    sio = socketio.AsyncServer(
        async_mode="asgi", client_manager=manager, cors_allowed_origins="*", logger=False,
        engineio_logger=False, ping_interval=ping_interval_s(25.0),  # Engine.IO's default
    )  # fmt: skip
    config = TurnConfig.from_env()
    turns: set[asyncio.Task[None]] = set()

    async def publish(thread: str, frame: Frame) -> None:
        await sio.emit("chat", frame, room=thread)

    @sio.on("join")
    async def join(sid: str, thread: str) -> None:
        await sio.enter_room(sid, thread)
        await sio.emit("ready", {"type": "ready", "thread_id": thread}, to=sid, ignore_queue=True)

    @sio.on("prompt")
    async def prompt(sid: str, data: dict[str, str]) -> None:
        task = asyncio.create_task(run_turn(data["thread"], data["content"], publish, config))
        turns.add(task)
        task.add_done_callback(turns.discard)

    return socketio.ASGIApp(sio)


if __name__ == "__main__":
    serve(create_app, __doc__)
