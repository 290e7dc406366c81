"""The archiver: cold threads' history moves from Redis to PostgreSQL
(app.chat.archive).

Each sweep SCANs the threads' meta keys; a thread idle longer than
CHAT_ARCHIVE_AFTER_DAYS, with no turn running, has every message but its
newest CHAT_ARCHIVE_KEEP_HOT copied to PostgreSQL in one transaction, read
back, and only then trimmed from Redis (its history and its timeline, up to
the oldest message kept), in the step that moves the thread's archive
watermark there (ARCHIVE_TRIM: exports read it to stay exact). Meta,
members, read markers and the tree index stay in Redis, so the thread is
listed, joined and paged as before (app.chat.history continues a walk into
the archive).

Why a crash anywhere loses and duplicates nothing: nothing leaves Redis
before PostgreSQL has it (committed and verified), the rows are keyed by
message id (written again, they are the same rows), and the trim removes
only ids older than the oldest kept one, all of which were in the copy
(Redis stream ids only grow, so nothing older can arrive meanwhile). A
crash between commit and trim leaves the messages in both tiers: a page
reads Redis first, and the next sweep archives them again (a no-op) and
trims.

Retention (CHAT_RETENTION_DAYS) runs in the same sweep: a thread idle
longer than that is deleted whole, from Redis (as its owner's delete does:
its sockets close, its members' lists forget it) and then from the archive;
each deletion is logged and counted (durable_chat_threads_expired_total).

It runs on its own (``durable-chat archiver``, workers.archiver), or with
CHAT_ARCHIVER_IN_POD inside the pods, where only the pod holding the
reaper's leader lease sweeps (``run_as_leader``). Built from the few parts
it needs: a Redis command client, the scripts, the thread store and the
archive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from app import metrics
from app.chat import faults, keys
from app.chat.errors import NotFound
from app.chat.history import message_from_entry
from app.chat.keys import ThreadId
from app.chat.redis_types import RedisClient, text
from app.chat.redis_types import entries as entries_of
from app.chat.scripts import Scripts
from app.chat.threads import Threads
from app.settings import Settings

if TYPE_CHECKING:  # PostgreSQL's driver loads only where an archive is opened
    from app.chat.archive import Archive

log = logging.getLogger("durable_chat.archiver")

DAY_MS = 86_400_000
# Who a retention delete is made by (the delete script's caller; any id
# would do with the owner check off).
RETENTION_CALLER = "retention"


class Archiver:
    """One sweep at a time over every thread of a Redis."""

    def __init__(
        self, redis: RedisClient, scripts: Scripts, threads: Threads, archive: Archive,
        settings: Settings,
    ) -> None:  # fmt: skip
        self._redis = redis
        self._scripts = scripts
        self._threads = threads
        self._archive = archive
        self._idle_ms = int(settings.chat_archive_after_days * DAY_MS)
        days = settings.chat_retention_days
        self._retain_ms = None if days is None else int(days * DAY_MS)
        self._keep = settings.chat_archive_keep_hot
        self._crash_at = settings.chat_archive_crash_at
        self._interval_s = settings.chat_archive_interval_s

    @classmethod
    def configured(
        cls, redis: RedisClient, publish: str, archive: Archive, settings: Settings
    ) -> Archiver:
        """The archiver as the process and the pods run it: its deletes by
        retention are no member's, so its thread store checks no owner."""
        scripts = Scripts(redis)
        threads = Threads(redis, scripts, publish, open_access=True)
        return cls(redis, scripts, threads, archive, settings)

    async def run_forever(self, leader: str | None = None) -> None:
        """Sweep every CHAT_ARCHIVE_INTERVAL_S until cancelled; with
        ``leader`` (in a pod, CHAT_ARCHIVER_IN_POD: its reaper's holder
        name), only while that holder has the reaper's leader lease, so one
        pod of the deployment archives. The lease is the reaper's to take
        and renew; should it move during a sweep, two pods may sweep a
        while, which only repeats work (archiving a thread twice is the
        same rows, and its trims are exact)."""
        while True:
            try:
                if leader is None or text(await self._redis.get(keys.REAPER_LEADER)) == leader:
                    moved, expired = await self.sweep()
                    log.info("sweep done: %d messages archived, %d threads expired", moved, expired)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("archive sweep failed; next one in %ss", self._interval_s)
            await asyncio.sleep(self._interval_s)

    async def sweep(self) -> tuple[int, int]:
        """Expire every thread past retention and archive every cold one;
        how many messages moved and how many threads expired."""
        moved = expired = 0
        async for key in self._redis.scan_iter(match=keys.META_PATTERN, count=500):
            thread = keys.thread_of_meta(key if isinstance(key, str) else key.decode())
            if thread is None:
                continue
            updated = text(await self._redis.hget(keys.meta(thread), "updated_at"))
            if updated is None:
                continue
            idle_ms = time.time() * 1000 - int(updated)
            if self._retain_ms is not None and idle_ms > self._retain_ms:
                expired += await self.expire(thread, idle_ms)
                continue
            if idle_ms < self._idle_ms:
                continue
            count = await self.archive_thread(thread)
            moved += count
            if count:
                faults.crash_here("between_threads", self._crash_at)
        return moved, expired

    async def expire(self, thread: ThreadId, idle_ms: float) -> int:
        """Delete the thread from both tiers (retention); 1 when it was there."""
        try:
            await self._threads.delete(thread, keys.user_id(RETENTION_CALLER))
        except NotFound:
            return 0
        removed = await self._archive.delete_thread(thread)
        metrics.THREADS_EXPIRED.inc()
        log.info(
            "thread %s deleted by retention: idle %.1f days, %d archived messages removed",
            thread, idle_ms / DAY_MS, removed,
        )  # fmt: skip
        return 1

    async def archive_thread(self, thread: ThreadId) -> int:
        """Move the thread's cold messages; how many moved."""
        history = keys.history(thread)
        if await self._redis.exists(keys.lock(thread), keys.turn(thread)):
            return 0  # a turn runs: not idle after all
        if await self._redis.xlen(history) <= self._keep:
            return 0
        linked, legacy = await self._redis.hmget(keys.tree(thread), ["v", "legacy"])
        if linked is None or legacy is not None:
            # Messages from before trees carry no parent link: their parent
            # is the entry before them, which a trim would take away. They
            # get the links reads already gave them, stored (once).
            done = await self._scripts.link_legacy(keys=[history, keys.tree(thread)])
            if done != "linked":
                log.warning(
                    "thread %s not archived: messages without parent links follow linked"
                    " ones (written by pods older than conversation trees)", thread,
                )  # fmt: skip
                return 0
        kept = entries_of(await self._redis.xrevrange(history, count=self._keep))
        oldest_kept = kept[-1][0]
        cold = entries_of(await self._redis.xrange(history, "-", f"({oldest_kept}"))
        if not cold:
            return 0
        if any("parent" not in fields for _, fields in cold):
            log.warning("thread %s not archived: messages without parent links", thread)
            return 0
        messages = [message_from_entry(entry_id, fields) for entry_id, fields in cold]
        await self._archive.store(thread, messages)
        faults.crash_here("after_commit", self._crash_at)
        trimmed = await self._scripts.archive_trim(
            keys=[history, keys.events(thread), keys.meta(thread), keys.tree(thread)],
            args=[oldest_kept],
        )
        if not trimmed:
            # Deleted while we copied: its rows must go too.
            await self._archive.delete_thread(thread)
            return 0
        metrics.ARCHIVED_MESSAGES.inc(len(messages))
        log.info("archived %d messages of thread %s", len(messages), thread)
        return len(messages)
