"""Presence and typing: who has a socket on a thread, on any pod, and who is
typing. Neither is a timeline event: nothing here is stored in the timeline
or replayed; both reach sockets as ephemeral frames of their followers.

Every socket on a thread is an entry ``<user>|<socket>`` in the thread's
presence set, with a lease on the Redis clock (app.chat.scripts' _PRESENCE),
added by the socket's join in the same script as its reads
(app.chat.joins). A pod renews its entries every third of
CHAT_SOCKET_LEASE_MS with a lease of two thirds, so one late renewal never
drops a live socket, and a crashed pod's users are gone within
CHAT_SOCKET_LEASE_MS: the same heartbeat reads every thread the pod follows
and tells its sockets when the set of users changed. With one Redis that is
one RENEW_PRESENCE call for all threads (per RENEW_BATCH entries); on a
Cluster one call per thread, pipelined.

A join or a leave publishes a nudge on the thread's channel. Each pod
coalesces the nudges: it reads every thread nudged within a window
(PRESENCE_WINDOW_S) once, all in one round trip, however many nudges came,
and sends its sockets a ``presence`` only when the users changed. A
reconnect storm of a thousand sockets thus costs each socket a few presence
frames, not a thousand, and the pod a few reads, not a thousand.

Typing is throttled per user and thread, across pods (a ``SET NX PX`` of
TYPING_INTERVAL_MS), after a local check that drops floods before Redis.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import orjson
from redis.asyncio import Redis

from app.chat import keys
from app.chat.fanout import FanoutHub
from app.chat.follower import Follower
from app.chat.joins import PresenceEntry
from app.chat.keys import ThreadId, UserId
from app.chat.redis_types import RedisClient, texts
from app.chat.scripts import Scripts, renewals, run_many
from app.chat.timeline import TimelineEvent, ephemeral

log = logging.getLogger(__name__)

PRESENCE_WINDOW_S = 0.2
TYPING_INTERVAL_MS = 2000
NUDGE = orjson.dumps({"control": "presence"}).decode()


class Presence:
    """This pod's share of every thread's presence, and typing."""

    def __init__(
        self, redis: RedisClient, scripts: Scripts, hub: FanoutHub, publish: str, lease_ms: int
    ) -> None:
        self._redis = redis
        self._scripts = scripts
        self._publish = publish
        self._lease_ms = lease_ms * 2 // 3
        self._interval_s = lease_ms / 3000
        # Whether every thread's keys are on one Redis (not a Cluster).
        self._one_redis = isinstance(redis, Redis)
        # Followers present on each thread, with their entries.
        self._local: dict[ThreadId, dict[Follower, str]] = {}
        # What each follower was last shown.
        self._shown: dict[Follower, list[str]] = {}
        # Each thread's entries at its last read, until a follower enters:
        # every entry names one socket, so the same list read again means
        # nobody joined or left since, and every local follower was shown
        # these users already (``_read``).
        self._last_read: dict[ThreadId, list[str]] = {}
        self._pending: set[ThreadId] = set()
        self._typed: dict[tuple[ThreadId, str], float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        # Exits so far: a renewal that saw none while on its way has no
        # entry of a departed socket to take back out.
        self._exits = 0
        hub.on_presence = self.nudged

    async def start(self) -> None:
        self._heartbeat = asyncio.create_task(self._renew_forever(), name="presence")

    async def stop(self) -> None:
        tasks = [*self._tasks, *([self._heartbeat] if self._heartbeat else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def joining(self, user: UserId) -> PresenceEntry:
        """A new presence entry of ``user``, for a join to add (app.chat.joins:
        in the same step as the join's reads)."""
        return PresenceEntry(self._lease_ms, f"{user}|{secrets.token_hex(6)}", NUDGE)

    def entered(self, follower: Follower, entry: str, present: list[str]) -> None:
        """A socket's join added ``entry``: renew it from now on, and send the
        socket who is there (``present``, the entries after the join)."""
        self._local.setdefault(follower.thread, {})[follower] = entry
        # Shown what its join read, which the next read of the thread may
        # not match even when the thread's last read does.
        self._last_read.pop(follower.thread, None)
        self._show(follower.thread, _users(present), [follower])

    async def exit(self, follower: Follower) -> None:
        """A socket left a thread (closed, or ``leave``)."""
        thread = follower.thread
        local = self._local.get(thread, {})
        entry = local.pop(follower, None)
        self._exits += 1
        self._shown.pop(follower, None)
        if not local:
            self._local.pop(thread, None)
            self._last_read.pop(thread, None)
        if entry is not None:
            await self._call(thread, "remove", [entry], nudge=True)

    def nudged(self, thread: ThreadId) -> None:
        """Someone joined or left the thread (from the hub): read it again
        once the window closes, whatever else comes meanwhile, together with
        every other thread nudged in the window (one round trip for all: a
        reconnect storm's thousand joins are not a thousand reads at once,
        which would take every connection of the pool)."""
        if thread in self._local and thread not in self._pending:
            self._pending.add(thread)
            if len(self._pending) == 1:
                task = asyncio.create_task(self._refresh_later())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def typing(self, thread: ThreadId, user: UserId) -> bool:
        """Tell the thread's other users ``user`` types; False when throttled
        (at most one per user per TYPING_INTERVAL_MS, across pods)."""
        now = time.monotonic()
        last = self._typed.get((thread, user))
        if last is not None and now - last < TYPING_INTERVAL_MS / 1000:
            return False  # a flood never reaches Redis
        self._typed[(thread, user)] = now
        if len(self._typed) > 10000:  # forget old throttles
            horizon = now - TYPING_INTERVAL_MS / 1000
            self._typed = {k: t for k, t in self._typed.items() if t > horizon}
        throttle = keys.typing(thread, user)
        if not await self._redis.set(throttle, "1", nx=True, px=TYPING_INTERVAL_MS):
            return False
        frame = orjson.dumps({"control": "typing", "user_id": user}).decode()
        await self._redis.execute_command(self._publish, keys.live(thread), frame)
        return True

    async def _call(
        self, thread: ThreadId, action: str, entries: list[str], nudge: bool = False
    ) -> list[str]:
        present = await self._scripts.presence(
            keys=[keys.presence(thread), keys.live(thread)],
            args=[self._lease_ms, self._publish, NUDGE if nudge else "", action, *entries],
        )
        return _users(texts(present))

    async def _refresh_later(self) -> None:
        try:
            await asyncio.sleep(PRESENCE_WINDOW_S)
        finally:
            threads = [t for t in self._pending if t in self._local]
            self._pending.clear()
        try:
            await self._read(threads)
        except Exception as exc:  # the next heartbeat tries again
            log.warning("presence of %d threads not read: %s", len(threads), exc)

    def _show(
        self, thread: ThreadId, users: list[str], followers: list[Follower] | None = None
    ) -> None:
        """Send ``users`` to the thread's local followers not shown them yet."""
        frame = None
        for follower in followers or list(self._local.get(thread, ())):
            if self._shown.get(follower) != users and follower in self._local.get(thread, ()):
                self._shown[follower] = users
                frame = frame or _frame(thread, users)
                follower.deliver(frame)

    async def renew(self) -> None:
        """Renew this pod's entries and show every changed set (one round trip)."""
        await self._read(list(self._local))

    async def _read(self, threads: list[ThreadId]) -> None:
        """Renew this pod's entries of ``threads`` and show every changed set:
        with one Redis one call per RENEW_BATCH entries, however many threads
        (app.chat.scripts.renewals); on a Cluster one pipelined round trip of
        a call per thread."""
        groups = [
            (keys.presence(thread), list(self._local.get(thread, {}).values()))
            for thread in threads
        ]
        if not groups:
            return
        calls = renewals(self._lease_ms, groups, self._one_redis)
        exits_before = self._exits
        if self._one_redis:
            answers = [await self._scripts.renew_presence(keys=k, args=a) for k, a in calls]
        else:
            answers = await run_many(self._redis, self._scripts.renew_presence, calls)
        if self._exits != exits_before:
            await self._remove_renewed_after_exit(threads, groups)
        # Each call answers a list of sets, one per key (on a Cluster, one).
        replies = [present for answer in answers for present in answer]
        last_read = self._last_read
        for thread, present in zip(threads, replies, strict=True):
            entries = texts(present)
            # Unchanged (the heartbeat's usual answer, for every thread): no
            # one to show anything, and no per-thread work.
            if entries != last_read.get(thread) and thread in self._local:
                last_read[thread] = entries
                self._show(thread, _users(entries))

    async def _remove_renewed_after_exit(
        self, threads: list[ThreadId], groups: list[tuple[str, list[str]]]
    ) -> None:
        """A socket that left while its entry's renewal was on its way: its
        exit's removal may have reached Redis first, and the renewal put the
        entry back for a whole lease (the user shown present after leaving).
        Remove it again (a removal that came second already did: harmless)."""
        for thread, (_, renewed) in zip(threads, groups, strict=True):
            current = set(self._local.get(thread, {}).values())
            gone = [entry for entry in renewed if entry not in current]
            if gone:
                await self._call(thread, "remove", gone, nudge=True)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.renew()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("presence not renewed: %s", exc)


def _users(entries: list[str]) -> list[str]:
    return sorted({entry.rpartition("|")[0] for entry in entries})


def _frame(thread: ThreadId, users: list[str]) -> TimelineEvent:
    return ephemeral(
        orjson.dumps({"type": "presence", "thread_id": thread, "users": users}).decode()
    )
