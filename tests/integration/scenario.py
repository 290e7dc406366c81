"""Clients that record a fault scenario, and the checks every scenario ends
with (test_sentinel, test_sick_network, test_deaf_subscriber, test_full_redis):
each client's timeline is the Redis log, every turn is whole, and no lock or
turn record is left behind."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from app.client import ChatClient
from tests.integration.helpers import assert_idle, assert_matches_log, assert_turns_well_formed


class Recorder:
    """A ChatClient (reconnecting across ``urls``) whose every event is kept."""

    def __init__(self, urls: Sequence[str], thread: str) -> None:
        self.thread = thread
        self.client = ChatClient(list(urls), thread)
        self.events: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Recorder:
        await self.client.connect()
        self._task = asyncio.create_task(self._consume())
        return self

    async def _consume(self) -> None:
        async for event in self.client.events():
            self.events.append(event)

    def count(self, kind: str) -> int:
        return sum(e["type"] == kind for e in self.events)

    def dones(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == "done"]

    async def wait(self, predicate: Callable[[Recorder], bool], timeout: float, what: str) -> None:
        """Until ``predicate(self)`` holds; fails after ``timeout`` seconds, or
        at once if the client gave up."""
        async with asyncio.timeout(timeout):
            while not predicate(self):
                if self._task is not None and self._task.done():
                    self._task.result()  # its error, if any
                    raise AssertionError(f"{self.thread}: the client stopped before {what}")
                await asyncio.sleep(0.02)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.client.close()


async def recorders(urls: Sequence[str], threads: Sequence[str]) -> list[Recorder]:
    return [await Recorder(urls, thread).start() for thread in threads]


async def close_all(recs: Sequence[Recorder]) -> None:
    for rec in recs:
        await rec.close()


def assert_consistent(recs: Sequence[Recorder], truth: Any, turns: int | None = None) -> None:
    """The end of every scenario: each client saw exactly the Redis log from
    its first event on, every turn in the log is whole (and there are
    ``turns`` of them, if given), and nothing is left locked or running.
    ``truth`` has ``client()``: a RedisServer, or the primary of a group."""
    for rec in recs:
        assert_matches_log(rec.events, truth, rec.thread)
        whole = assert_turns_well_formed(truth, rec.thread)
        if turns is not None:
            assert whole == turns, (rec.thread, whole)
        assert_idle(truth, rec.thread)


async def readyz(pod: Any, timeout: float = 5.0) -> int:
    """The pod's /readyz status (0 when it does not answer at all)."""
    try:
        async with httpx.AsyncClient() as http:
            return (await http.get(f"{pod.http}/readyz", timeout=timeout)).status_code
    except httpx.HTTPError:
        return 0


async def until_status(
    pod: Any, wanted: Callable[[int], bool], timeout: float, what: str, each_s: float = 5.0
) -> float:
    """Seconds until the pod's /readyz status satisfies ``wanted``; each
    request may take ``each_s`` (0 when it does not answer in time)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() - start < timeout:
        if wanted(await readyz(pod, each_s)):
            return loop.time() - start
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
