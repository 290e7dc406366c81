"""Small helpers for the core-contract integration tests (test_single_writer,
test_history_durability, test_seed_protocol, test_edge, test_redis_layout)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.integration.helpers import collect_until, connect, recv_event, send

REFUSED = (403, 1008)  # HTTP 403 on the upgrade, or close 1008 after it


def unique(prefix: str) -> str:
    """A thread id no other test uses."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


async def open_ready(base: str, thread: str, query: str = "") -> tuple[Any, dict[str, Any]]:
    """A protocol-v1 socket and its ``ready`` event."""
    ws = await connect(base, thread, query)
    ready = await recv_event(ws)
    assert ready["type"] == "ready", ready
    return ws, ready


async def refusal(url: str, timeout: float = 10.0, **connect_kwargs: Any) -> int:
    """How the server refuses a socket at ``url``: the HTTP status of the
    upgrade (403), or the close code it sends before any frame. Fails if the
    socket is served a frame instead."""
    try:
        ws = await websockets.connect(url, open_timeout=timeout, max_queue=None, **connect_kwargs)
    except InvalidStatus as exc:
        return exc.response.status_code
    try:
        frame = await asyncio.wait_for(ws.recv(), timeout)
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else 1006
    finally:
        await ws.close()
    raise AssertionError(f"socket at {url} was served instead of refused: {frame!r}")


async def turn(ws: Any, content: str, **extra: Any) -> list[dict[str, Any]]:
    """Send a prompt and return every event up to its ``done``."""
    await send(ws, {"type": "prompt", "content": content, **extra})
    return await collect_until(ws)


async def history(ws: Any, **params: Any) -> dict[str, Any]:
    """A ``get_history`` answer (other events in between fail the test)."""
    await send(ws, {"type": "get_history", **params})
    event = await recv_event(ws)
    assert event["type"] == "history", event
    return event


def decode(frame: str | bytes) -> Any:
    return orjson.loads(frame)
