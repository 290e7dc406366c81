"""Stopping background work for sure, in bounded time.

``task.cancel(); await task`` can wait forever, and a pod that does so on
shutdown never exits. On Python 3.11 a cancellation can be lost:
``asyncio.wait_for`` (which redis-py and fakeredis use around socket reads and
writes) returns its inner result when the inner call finished in the same
loop iteration as the cancel, and the CancelledError is gone (fixed in 3.12,
python/cpython#86296). The cancelled loop then carries on to its next sleep
or Redis call, which a blackholed Redis never answers. ``stop`` therefore
cancels again until the task has ended, and gives up after a bound;
``within`` runs a clean-up step (closing a connection, unsubscribing) under
the same bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import Any

log = logging.getLogger(__name__)

# How often a task that swallowed a cancellation is cancelled again.
RECANCEL_S = 0.05
# On shutdown, how long stopping one background task or closing one
# connection may take (a blackholed Redis answers nothing, ever).
RELEASE_S = 1.0


async def stop(task: asyncio.Future[Any], timeout_s: float, quiet: bool = False) -> bool:
    """Cancel ``task`` (again and again) until it ends; False if it is still
    running after ``timeout_s`` (it is then left behind, and said so). An
    exception it ended with is logged, unless ``quiet`` (an expected end)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not task.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            log.warning("%s ignored cancellation for %.1fs: left behind", _name(task), timeout_s)
            return False
        task.cancel()
        await asyncio.wait([task], timeout=min(RECANCEL_S, remaining))
    if not task.cancelled() and task.exception() is not None and not quiet:
        log.warning("%s ended with %r while stopping", _name(task), task.exception())
    return True


async def stop_all(
    tasks: Sequence[asyncio.Future[Any]], timeout_s: float, quiet: bool = False
) -> None:
    """``stop`` every task, side by side: the bound is ``timeout_s`` for all."""
    if tasks:
        await asyncio.gather(*(stop(task, timeout_s, quiet) for task in tasks))


async def within(step: Awaitable[Any], timeout_s: float, what: str) -> None:
    """Run a clean-up ``step`` for at most ``timeout_s``; a step that fails or
    overruns is logged and abandoned, never raised: shutdown goes on."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait([task], timeout=timeout_s)
    if not done:
        log.warning("%s did not finish within %.1fs: abandoned", what, timeout_s)
        await stop(task, RECANCEL_S * 4)
    elif not task.cancelled() and task.exception() is not None:
        log.warning("%s failed: %r", what, task.exception())


def _name(task: asyncio.Future[Any]) -> str:
    return task.get_name() if isinstance(task, asyncio.Task) else repr(task)
