"""The reaper: closes turns whose pod died, so no thread stays stuck.

A turn whose pod is gone stops renewing its lease; once the lease has run
out (CHAT_LOCK_TTL_MS) the reaper takes the thread's lock itself, with a new
fencing number (so the dead turn, should it wake up, can never write again),
commits the text and the finished tool calls the turn had published as an
``interrupted`` assistant message, publishes ``done`` and frees the thread,
then moves the thread's pending token charges to their users (app.chat.usage:
also those of a turn that ended but whose pod died before moving them). It runs every
CHAT_REAPER_INTERVAL_MS, so a thread is free again within the lease plus one
interval. In a pod it then starts the thread's next queued prompt, if any
(and does the same for a thread whose pod drained with prompts waiting):
threads with waiting prompts stay in the turn index for that.

It runs inside every pod (app.main) or on its own as ``durable-chat worker``
(workers.reaper); either way only the holder of a short leader lease in Redis
sweeps, so pods do not race each other (if they did, the lock would still let
only one close a turn). It needs only the turn lock and the turn store, never
a model or a fan-out hub.

The standalone worker has no model, so it cannot start a queued prompt: with
it, pods run the same sweep as a queue starter only (``close_orphans=False``,
behind a lease of its own), which leaves dead turns to the worker and starts
the next queued prompt of a thread that has none running.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from app import metrics
from app.chat import keys
from app.chat.errors import LockLost
from app.chat.keys import ThreadId
from app.chat.lock import Lease, TurnLock
from app.chat.scripts import Scripts
from app.chat.turns import TurnStore
from app.chat.usage import UsageStore

log = logging.getLogger(__name__)


class Reaper:
    """Sweeps the turn index for turns whose lease expired."""

    def __init__(
        self,
        scripts: Scripts,
        lock: TurnLock,
        turns: TurnStore,
        usage: UsageStore,
        *,
        interval_ms: int,
        holder: str,
        start_next: Callable[[ThreadId, Lease | None], Awaitable[bool]] | None = None,
        close_orphans: bool = True,
    ) -> None:
        self._scripts = scripts
        # In a pod: starts a thread's next queued prompt (taking over the
        # lease it is given), for threads whose pod died or drained with
        # prompts waiting. The standalone worker has no model, so none.
        self._start_next = start_next
        # False in pods beside a standalone worker: they only start queues.
        self._close_orphans = close_orphans
        self._leader_key = keys.REAPER_LEADER if close_orphans else keys.QUEUE_LEADER
        self._lock = lock
        self._turns = turns
        self._usage = usage
        self._holder = holder
        self._interval_s = interval_ms / 1000

    async def run_forever(self) -> None:
        lease_ms = int(self._interval_s * 3000)
        while True:
            try:
                leader = await self._scripts.leader_lease(
                    keys=[self._leader_key], args=[self._holder, lease_ms]
                )
                if leader:
                    await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down, or a bug: log and try again later
                log.warning("reaper sweep failed: %s", exc)
            await asyncio.sleep(self._interval_s)

    async def sweep(self) -> int:
        """Close every turn whose lease has expired and start the next queued
        prompts; returns how many turns were closed."""
        closed = 0
        for thread in await self._turns.index_threads():
            # A lock still held is a live turn, or one whose lease has not run
            # out yet; a free one may be taken by a new turn at any moment.
            lease = await self._lock.acquire(thread)
            if lease is None:
                continue
            held: Lease | None = lease
            try:
                # Read under the lock: no turn can begin or end meanwhile.
                record = await self._turns.record(thread)
                if record is not None and not self._close_orphans:
                    continue  # a dead pod's turn: the standalone worker closes it
                if record is not None:
                    log.info(
                        "closing turn %s left open by pod %s", record.generation_id, record.pod,
                        extra={"thread_id": thread, "generation_id": record.generation_id},
                    )  # fmt: skip
                    await self._turns.close_orphan(thread, lease, record)
                    held = None  # released by the close
                    metrics.TURNS_REAPED.inc()
                    closed += 1
                # A turn leaves the index only once its charges are settled.
                await self._usage.settle(thread)
                started = False
                if self._start_next is not None:
                    held, taken = None, held  # start_next takes the lease over
                    started = await self._start_next(thread, taken)
                if not started:
                    await self._turns.index_remove(thread)
            except (LockLost, RedisError) as exc:
                log.warning(
                    "could not close the turn of thread %s: %s", thread, exc,
                    extra={"thread_id": thread},
                )  # fmt: skip
            finally:
                if held is not None:
                    await self._lock.release(thread, held)
        return closed
