"""Peer: encode/broadcaster (Redis pub/sub backend) on Starlette, under uvicorn.

The pattern of broadcaster's own chat example: each WebSocket subscribes to
its thread's channel (``broadcast.subscribe``; one Redis subscription per
process and channel, one asyncio queue per socket) and forwards what arrives;
a ``prompt`` starts a turn on the process that received it, whose frames are
``broadcast.publish``-ed (one PUBLISH each) to the thread's channel.

Chosen over Django Channels + channels_redis because it is the same shape as
durable-chat's hub (one pub/sub subscription per process per thread, local
fan-out to sockets) with nothing else around it, so the comparison is about
fan-out; Channels' ``group_send`` instead pushes one copy per member channel
through Redis lists, and needs a Django project around it.

Client protocol: ``/ws/<thread>``; the server sends ``{"type":"ready"}`` once
subscribed; the client sends ``{"type":"prompt","content":...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

from broadcaster import Broadcast
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from bench.peers.common import Frame, TurnConfig, run_turn, serve


def create_app(redis_url: str) -> Starlette:
    broadcast = Broadcast(redis_url)
    config = TurnConfig.from_env()
    turns: set[asyncio.Task[None]] = set()

    async def publish(thread: str, frame: Frame) -> None:
        await broadcast.publish(channel=thread, message=json.dumps(frame, separators=(",", ":")))

    # Workaround: broadcaster 0.3.1's subscribe() is not safe for two sockets
    # subscribing to a new channel at once (each installs its own set of
    # queues, one socket never receives anything and its exit raises
    # KeyError), so subscriptions are entered one at a time.
    subscribing = asyncio.Lock()

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        thread = ws.path_params["thread"]
        async with contextlib.AsyncExitStack() as stack:
            async with subscribing:
                subscriber = await stack.enter_async_context(broadcast.subscribe(channel=thread))
            await ws.send_text(json.dumps({"type": "ready", "thread_id": thread}))

            async def receive() -> None:
                with contextlib.suppress(WebSocketDisconnect):
                    async for text in ws.iter_text():
                        data = json.loads(text)
                        if data.get("type") == "prompt":
                            task = asyncio.create_task(
                                run_turn(thread, data["content"], publish, config)
                            )
                            turns.add(task)
                            task.add_done_callback(turns.discard)

            async def send() -> None:
                with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                    async for event in subscriber:
                        if event is not None:
                            await ws.send_text(event.message)

            tasks = [asyncio.create_task(receive()), asyncio.create_task(send())]
            _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await broadcast.connect()
        try:
            # Workaround, public API only: broadcaster 0.3.1's Redis backend
            # wakes its listener before redis-py records a first subscription;
            # the listener then finds nothing subscribed, stops, and never
            # wakes again, so nothing is ever delivered. Holding one
            # subscription for the process's lifetime closes that window.
            async with broadcast.subscribe(channel="bench:keepalive"):
                yield
        finally:
            await broadcast.disconnect()

    return Starlette(routes=[WebSocketRoute("/ws/{thread}", endpoint)], lifespan=lifespan)


if __name__ == "__main__":
    serve(create_app, __doc__)
