"""Helpers shared by the integration tests: reading a socket until an event."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import websockets

TIMEOUT_S = 15.0


async def recv_event(ws: Any, timeout: float = TIMEOUT_S) -> dict[str, Any]:
    return orjson.loads(await asyncio.wait_for(ws.recv(), timeout))


async def collect_until(
    ws: Any, stop_type: str = "done", timeout: float = TIMEOUT_S
) -> list[dict[str, Any]]:
    """Every event up to and including the first of type ``stop_type``."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            event = orjson.loads(await ws.recv())
            events.append(event)
            if event["type"] == stop_type:
                return events


async def connect(base: str, thread: str, query: str = "") -> Any:
    """A raw protocol socket, after its ``ready`` event (returned beside it)."""
    # An unbounded receive queue: a test that leaves frames unread must not
    # stall its own close handshake (websockets stops reading when it is full).
    ws = await websockets.connect(
        f"{base}/v1/threads/{thread}/ws{query}", open_timeout=10, max_queue=None
    )
    return ws


async def send(ws: Any, frame: dict[str, Any]) -> None:
    await ws.send(orjson.dumps(frame).decode())


def timeline(events: list[dict[str, Any]]) -> list[tuple[str, int, str]]:
    """The timeline part of a list of events: (id, n, type)."""
    return [(e["id"], e["n"], e["type"]) for e in events if "id" in e]
