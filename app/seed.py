"""The original Durable Objects demo's text protocol, on the same threads.

``GET /websocket?threadID=<id>``: a frame starting with ``(GET_HISTORY)`` is
answered with the whole history as a JSON array of ``{role, content}``; any
other frame is a prompt, whose turn reaches every seed socket of the thread
as ``[LOADING]``, the reply's pieces, then ``[DONE]``. It shares admission,
joining and supervision with protocol v1 (app.ws).
"""

from __future__ import annotations

import contextlib

import orjson
from fastapi import APIRouter, WebSocket
from redis.exceptions import RedisError
from starlette.websockets import WebSocketDisconnect

from app.chat.errors import ChatError
from app.chat.follower import Follower
from app.chat.keys import ThreadId, UserId
from app.chat.service import ChatService
from app.chat.timeline import TimelineEvent
from app.ws import admit, open_thread, supervise

router = APIRouter()

SEED_GET_HISTORY = "(GET_HISTORY)"
SEED_LOADING = "[LOADING]"
SEED_DONE = "[DONE]"


@router.websocket("/websocket")
async def seed_socket(ws: WebSocket) -> None:
    """The original Durable Objects demo's text protocol, on the same threads."""
    admitted = await admit(ws, ws.query_params.get("threadID", ""))
    if admitted is None:
        return
    service, thread, user = admitted
    opened = await open_thread(ws, service, thread, user, None, None)
    if opened is None:
        return
    follower: Follower = opened.follower

    async def read_forever() -> None:
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                text = message.get("text")
                if text:
                    await _seed_handle(ws, service, thread, user, text)

    try:
        await supervise(ws, follower, read_forever(), _seed_writer(ws, follower, opened.replay))
    finally:
        await service.close(follower)


async def _seed_handle(
    ws: WebSocket, service: ChatService, thread: ThreadId, user: UserId, text: str
) -> None:
    try:
        if text.startswith(SEED_GET_HISTORY):
            messages = await service.history.all(thread)
            history = [{"role": m.role, "content": m.content} for m in messages]
            await ws.send_text(orjson.dumps(history).decode())
        elif len(text) > service.settings.chat_max_prompt_chars:
            await ws.send_text("[ERROR] too_large: prompt too long")
        else:
            await service.prompt(thread, user, text, None)
    except ChatError as exc:
        await ws.send_text(f"[ERROR] {exc.code}: {exc}")
    except (RedisError, OSError):
        await ws.send_text("[ERROR] unavailable: storage is unavailable; retry")


async def _seed_writer(ws: WebSocket, follower: Follower, replay: list[TimelineEvent]) -> None:
    """Turn timeline events into the seed's text frames."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        for event in replay:
            if follower.claim(event):
                await _seed_send(ws, event)
        while True:
            live = await follower.next_event()
            if follower.claim(live):
                await _seed_send(ws, live)


async def _seed_send(ws: WebSocket, event: TimelineEvent) -> None:
    data = orjson.loads(event.frame)
    kind = data["type"]
    if kind == "loading":
        await ws.send_text(SEED_LOADING)
    elif kind == "delta":
        await ws.send_text(data["text"])
    elif kind == "done":
        await ws.send_text(SEED_DONE)
