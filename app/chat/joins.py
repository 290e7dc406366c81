"""A socket's start on a thread, in one round trip.

Everything a socket needs of its thread before it goes live is one script
(JOIN_THREAD, on the thread's slot, so on a Redis Cluster too): the thread's
creation on first use, the caller's membership, the event number and last
event id (the fan-out hub's baseline), the running turn, the waiting
prompts, the active leaf, the catch-up (a resume's missed events, or a
running turn's so far) and the socket's presence entry. What lives on the
creator's slot stays outside it: the thread quota, checked before a counted
creation (one more script, and the join runs again), and on a Cluster the
creator's thread lists (app.chat.threads; with one Redis the script adds
them itself).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from app.chat import keys
from app.chat.errors import Forbidden, NotFound
from app.chat.keys import ThreadId, UserId
from app.chat.limits import Admission, Limits
from app.chat.queue import waiting_of
from app.chat.records import Queued
from app.chat.redis_types import RedisClient, lua_entries, lua_hash, texts
from app.chat.scripts import Scripts
from app.chat.threads import Threads
from app.chat.timeline import TimelineEvent, frame_from_entry
from app.chat.turns import TurnRecord, turn_record


@dataclass(frozen=True, slots=True)
class PresenceEntry:
    """The presence entry a join adds: its lease, the entry, and the nudge
    published on the thread's channel (app.chat.presence)."""

    lease_ms: int
    entry: str
    nudge: str


@dataclass(frozen=True, slots=True)
class JoinState:
    """What a join read, all at one point of the thread's timeline."""

    epoch: str
    owner: str
    created: bool
    event_n: int
    last_event_id: str | None
    leaf: str | None
    turn: TurnRecord | None
    queue: list[Queued]
    # With ``after``: whether every missed event is in ``replay``.
    recovered: bool | None
    replay: list[TimelineEvent]
    # The presence entries after the socket's own was added.
    present: list[str]


class Joins:
    """Joins of sockets to threads, for one pod."""

    def __init__(
        self, redis: RedisClient, scripts: Scripts, threads: Threads, limits: Limits,
        publish: str, members_only: bool,
    ) -> None:  # fmt: skip
        self._redis = redis
        self._scripts = scripts
        self._threads = threads
        self._limits = limits
        self._publish = publish
        self._members_only = "1" if members_only else "0"
        # With one Redis (PUBLISH) the script adds a new thread to its
        # creator's lists; on a Cluster (SPUBLISH) they are another slot.
        self._one_redis = publish == "PUBLISH"

    @property
    def admits(self) -> bool:
        """Whether a join can count its socket against its user's socket
        limit itself (``join``'s ``admission``): with one Redis only, where
        the user's keys and the thread's are on the same server."""
        return self._one_redis

    async def join(
        self, thread: ThreadId, user: UserId, after: str | None, epoch: str | None,
        presence: PresenceEntry, create: bool = True, admission: Admission | None = None,
    ) -> JoinState:  # fmt: skip
        """Join ``thread`` (creating it, owned by ``user``, when ``create``
        and new): NotFound when it was deleted recently, Forbidden when
        ``user`` is not a member (or, without ``create``, it does not exist),
        RateLimited over the thread quota. With ``admission`` (one Redis
        only) the socket is first counted against its user's socket limit,
        in the same script: RateLimited or Forbidden as Limits.claim_socket."""
        counted = create and self._threads.counts_creations
        state = await self._run(
            thread, user, after, epoch, presence, create and not counted, admission
        )
        if state is None and counted:
            # A new thread, counted against its creator's quota first.
            await self._threads.reserve(user, thread)
            try:
                state = await self._run(thread, user, after, epoch, presence, True, admission)
            except BaseException:
                await self._threads.unreserve(user, thread)
                raise
            if not (isinstance(state, JoinState) and (state.created or state.owner == user)):
                await self._threads.unreserve(user, thread)
        if state is None:
            raise Forbidden("you are not a member of this thread")
        return state

    async def _run(
        self, thread: ThreadId, user: UserId, after: str | None, epoch: str | None,
        presence: PresenceEntry, create: bool, admission: Admission | None,
    ) -> JoinState | None:  # fmt: skip
        """One JOIN_THREAD; None when the thread does not exist (not created)."""
        now_ms = int(time.time() * 1000)
        lists = self._threads.creator_lists(user) if self._one_redis and create else []
        admit_keys, admit_args = (admission.keys, admission.args) if admission else ([], ["", 0, 0])
        reply = await self._scripts.join_thread(
            keys=[
                keys.meta(thread), keys.members(thread), keys.fence(thread), keys.turn(thread),
                keys.queue(thread), keys.history(thread), keys.events(thread),
                keys.presence(thread), keys.live(thread), *admit_keys, *lists,
            ],
            args=[
                secrets.token_hex(8), user, now_ms, self._publish, "1" if create else "0",
                self._members_only, after or "", epoch or "", presence.lease_ms,
                presence.entry, presence.nudge, *admit_args,
            ],
        )  # fmt: skip
        status = reply[0]
        if status == "refused":
            refusal = self._limits.refusal(reply[1], reply[2])
            if refusal is not None:
                raise refusal
        if status == "deleted":
            raise NotFound("this thread was deleted")
        if status == "forbidden":
            raise Forbidden("you are not a member of this thread")
        if status == "absent":
            return None
        _, epoch_now, owner, created, n, last, leaf, turn, queue, recovered, replay, users = reply
        if int(created) and not self._one_redis:
            await self._threads.created(thread, user, now_ms)
        return JoinState(
            epoch=epoch_now, owner=owner, created=bool(int(created)), event_n=int(n),
            last_event_id=last or None, leaf=leaf or None, turn=turn_record(lua_hash(turn)),
            queue=waiting_of(lua_entries(queue)),
            recovered=None if recovered == "" else recovered == "1",
            replay=[frame_from_entry(i, f) for i, f in lua_entries(replay)],
            present=texts(users),
        )  # fmt: skip
