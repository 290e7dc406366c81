"""Reading a Server-Sent Events stream at the wire level, for the SSE tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from tests.integration.helpers import EPHEMERAL, TIMEOUT_S


@dataclass
class SseEvent:
    """One SSE message (``comment`` set for a comment line instead)."""

    id: str | None = None
    event: str | None = None
    data: str | None = None
    retry: int | None = None
    comment: str | None = None

    @property
    def json(self) -> dict[str, Any]:
        assert self.data is not None
        return orjson.loads(self.data)  # type: ignore[no-any-return]


class SseReader:
    """The messages of one ``text/event-stream`` response, parsed line by line."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self, timeout: float = TIMEOUT_S, comments: bool = False) -> SseEvent:
        async with asyncio.timeout(timeout):
            event = SseEvent()
            async for line in self._lines:
                if line == "":
                    if event.data is not None and event.event not in EPHEMERAL:
                        return event
                    event = SseEvent(retry=event.retry)
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "":
                    if comments:
                        return SseEvent(comment=value)
                elif name == "data":
                    event.data = value if event.data is None else f"{event.data}\n{value}"
                elif name == "retry":
                    event.retry = int(value)
                else:
                    setattr(event, name.replace("-", "_"), value)
            raise EOFError("the stream ended")

    async def until(self, event_type: str, timeout: float = TIMEOUT_S) -> list[SseEvent]:
        """Every message up to and including the first of ``event_type``."""
        seen: list[SseEvent] = []
        async with asyncio.timeout(timeout):
            while True:
                seen.append(await self.next())
                if seen[-1].event == event_type:
                    return seen


@asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient, thread: str, **kw: Any
) -> AsyncIterator[SseReader]:
    """``GET /v1/threads/{thread}/events`` as a stream (fails unless 200)."""
    async with client.stream("GET", f"/v1/threads/{thread}/events", **kw) as response:
        if response.status_code != 200:
            await response.aread()
            raise AssertionError(f"{response.status_code}: {response.text}")
        assert response.headers["content-type"].startswith("text/event-stream")
        yield SseReader(response)
