"""app.chat.tasks: background work stops for sure, in bounded time, even
when a task swallows its cancellation (as asyncio.wait_for does on 3.11);
and a socket's session, which stops its reader and writer that way."""

from __future__ import annotations

import asyncio
import time

from app.chat import keys, tasks
from app.chat.follower import TOO_SLOW, Follower
from app.ws import supervise


async def _swallows_one_cancel(rounds: list[int]) -> None:
    """A loop that loses its first cancellation, as a reaper or heartbeat
    did inside a Redis call, and then sleeps on."""
    swallowed = False
    while True:
        rounds.append(1)
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed = True
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        await asyncio.sleep(3600)


async def test_a_task_that_swallows_a_cancel_is_cancelled_again():
    rounds: list[int] = []
    task = asyncio.create_task(_swallows_one_cancel(rounds))
    await asyncio.sleep(0.001)
    # What a pod did on shutdown: cancel once, then wait for ever.
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=0.2)
    assert not done, "the task should have survived one cancel"
    started = time.monotonic()
    assert await tasks.stop(task, 2.0)
    assert task.cancelled()
    assert time.monotonic() - started < 1.0


async def test_a_task_that_ignores_every_cancel_is_left_behind_in_time():
    stop_it = asyncio.Event()

    async def stubborn() -> None:
        while not stop_it.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                asyncio.current_task().uncancel()  # type: ignore[union-attr]

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    started = time.monotonic()
    assert not await tasks.stop(task, 0.3)
    assert 0.3 <= time.monotonic() - started < 1.0
    stop_it.set()
    task.cancel()
    await asyncio.wait([task], timeout=1)


async def test_a_cleanup_step_that_hangs_is_abandoned_in_time():
    started = time.monotonic()
    await tasks.within(asyncio.sleep(3600), 0.2, "a close that never returns")
    assert time.monotonic() - started < 1.0
    await tasks.within(asyncio.sleep(0, "fine"), 0.2, "a quick close")


async def test_a_cleanup_step_that_fails_is_logged_not_raised(caplog):
    async def fails() -> None:
        raise ConnectionError("gone")

    await tasks.within(fails(), 0.5, "closing Redis")
    assert "closing Redis failed" in caplog.text


class _ClosingSocket:
    """What supervise needs of a WebSocket when it closes one for resume."""

    def __init__(self) -> None:
        self.closed_with: int | None = None

    async def close(self, code: int, reason: str = "") -> None:
        self.closed_with = code


async def test_a_socket_whose_reader_swallows_a_cancel_is_still_closed_for_resume():
    # A reader inside a Redis call when its socket must close (a slow
    # client) could lose the cancel and wait on for the client's next frame:
    # the close for resume waited with it.
    follower = Follower(keys.thread_id("t"), 8, keys.user_id("u"))
    ws = _ClosingSocket()
    never = asyncio.Event()

    async def reader() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        await never.wait()  # the next frame, which never comes

    session = asyncio.create_task(supervise(ws, follower, reader(), asyncio.sleep(3600)))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    follower.close_for(TOO_SLOW)
    await asyncio.wait_for(session, 2)
    assert ws.closed_with == 1013
