"""Threads as a whole: creation (and its epoch), ownership, membership, titles,
deletion, the thread quota and a user's thread list.

A thread comes into being when someone opens it (a socket) or creates it
(REST): its creator owns it and is its first member. The owner adds and
removes members and renames or deletes the thread; a member may leave; only
members read or write it. With auth off (``open_access``) everyone is the
same user and these checks pass. Every change that must not act on a deleted
thread (rename, membership, delete itself) is one script that checks the
thread exists first, so a change racing a delete can never recreate a key.

A user's list ``chat:user:{U}:threads`` lives on the user's shard, not the
thread's, so it is kept beside the thread's own commits, not inside them: a
crash in between leaves it a little stale, and reading a page prunes entries
of threads that are gone or no longer the user's.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import orjson
from redis.exceptions import RedisError

from app.chat import keys
from app.chat.errors import Conflict, Forbidden, InvalidRequest, NotFound, RateLimited
from app.chat.inbox import Notices
from app.chat.keys import ThreadId, UserId
from app.chat.records import PromptPolicy
from app.chat.redis_types import RedisClient, scored, text, text_set, texts
from app.chat.scripts import Scripts

log = logging.getLogger(__name__)

MAX_TITLE_CHARS = 200
DELETED_FRAME = orjson.dumps({"control": "deleted"}).decode()


@dataclass(frozen=True, slots=True)
class ThreadInfo:
    """What a socket learns about a thread when it opens it."""

    epoch: str
    owner: str
    created: bool


@dataclass(frozen=True, slots=True)
class ThreadSummary:
    """A thread as listed: ``active_at`` is the last activity (ms since the epoch)."""

    id: ThreadId
    title: str
    owner: str
    created_at: int
    updated_at: int
    active_at: int
    prompt_policy: PromptPolicy
    # The tokens every turn of the thread used (added by each turn's final commit).
    input_tokens: int = 0
    output_tokens: int = 0


class Threads:
    """Thread metadata, members, quota and per-user thread lists."""

    def __init__(
        self,
        redis: RedisClient,
        scripts: Scripts,
        publish: str = "PUBLISH",
        *,
        max_threads: int = 0,
        max_members: int = 100,
        open_access: bool = False,
        default_policy: PromptPolicy = "reject",
    ) -> None:
        self._redis = redis
        self._scripts = scripts
        self._publish = publish
        self._max_threads = 0 if open_access else max_threads
        self._max_members = max_members
        self._open = open_access
        self._owner_only = "0" if open_access else "1"
        self._default_policy: PromptPolicy = default_policy
        self._notices = Notices(redis, scripts, publish)

    # --- creating -------------------------------------------------------------

    async def open(self, thread: ThreadId, user: UserId) -> ThreadInfo:
        """Create the thread if it is new (``user`` owns it); return its info.
        NotFound when it was deleted recently; RateLimited over the quota."""
        if self._max_threads and not await self._redis.exists(keys.meta(thread)):
            info = await self._create(thread, user, "")
        else:
            info = await self._ensure(thread, user, "")
        if info is None:
            raise NotFound("this thread was deleted")
        return info

    async def create(self, thread: ThreadId, user: UserId, title: str) -> ThreadInfo:
        """Create a new thread owned by ``user``; Conflict if the id is taken."""
        info = await self._create(thread, user, _checked_title(title) if title else "")
        if info is None:
            raise Conflict("a thread with this id was deleted recently; choose another id")
        if not info.created:
            raise Conflict("a thread with this id exists")
        return info

    async def _create(self, thread: ThreadId, user: UserId, title: str) -> ThreadInfo | None:
        if self._max_threads:
            await self.reserve(user, thread)
        try:
            info = await self._ensure(thread, user, title)
        except BaseException:
            await self.unreserve(user, thread)
            raise
        if info is None or (not info.created and info.owner != user):
            await self.unreserve(user, thread)
        return info

    async def _ensure(self, thread: ThreadId, user: UserId, title: str) -> ThreadInfo | None:
        now_ms = int(time.time() * 1000)
        epoch, owner, created = await self._scripts.ensure_thread(
            keys=[keys.meta(thread), keys.members(thread), keys.fence(thread)],
            args=[secrets.token_hex(8), user, now_ms, title, self._publish],
        )
        if int(created) < 0:
            return None
        if int(created):
            await self.created(thread, user, now_ms)
        return ThreadInfo(epoch=epoch, owner=owner, created=bool(int(created)))

    def creator_lists(self, user: UserId) -> list[str]:
        """The lists of ``user`` a thread they create joins: their thread
        list, and their owned threads when counted."""
        owned = [] if self._open else [keys.user_owned(user)]  # auth off: no one to count
        return [keys.user_threads(user), *owned]

    async def created(self, thread: ThreadId, user: UserId, now_ms: int) -> None:
        """A thread ``user`` created was committed: its card to their inbox
        and the thread into their lists (both on the user's slot)."""
        await self._notices.changed(thread, [user])
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in self.creator_lists(user):
                pipe.zadd(key, {thread: now_ms})
            await pipe.execute()

    @property
    def counts_creations(self) -> bool:
        """Whether a new thread is counted against its creator's quota first."""
        return bool(self._max_threads)

    async def reserve(self, user: UserId, thread: ThreadId) -> None:
        """Count ``thread`` against ``user``'s quota before creating it;
        RateLimited when they own the most allowed, Forbidden while their
        data is being erased."""
        args: list[str | int] = [thread, self._max_threads, int(time.time() * 1000)]
        lists = [keys.user_owned(user), keys.user_erasing(user)]
        reserved = await self._scripts.reserve_thread(keys=lists, args=args)
        if reserved == -1:
            raise Forbidden("this user's data is being erased")
        if reserved:
            return
        if (
            await self._prune_owned(user)
            and await self._scripts.reserve_thread(keys=lists, args=args) == 1
        ):
            return
        raise RateLimited(
            f"you own {self._max_threads} threads, the most allowed: delete one first",
            retryable=False,
        )

    async def unreserve(self, user: UserId, thread: ThreadId) -> None:
        """Release a reservation whose thread was not created by ``user``."""
        if self._max_threads:
            try:
                await self._redis.zrem(keys.user_owned(user), thread)
            except (RedisError, OSError) as exc:  # pruned when the quota is next full
                log.warning("thread reservation of %s not released: %s", user, exc)

    async def _prune_owned(self, user: UserId) -> int:
        """Drop quota entries of threads the user does not own (gone, or a
        reservation whose creation never happened); how many were dropped.
        An entry reserved by a creation still in flight may be dropped too:
        the quota can then be passed by the few creations racing it."""
        owned = texts(await self._redis.zrange(keys.user_owned(user), 0, -1))
        async with self._redis.pipeline(transaction=False) as pipe:
            for thread in owned:
                pipe.hget(keys.meta(ThreadId(thread)), "owner")
            owners = await pipe.execute()
        stale = [t for t, owner in zip(owned, owners, strict=True) if owner != user]
        if stale:
            await self._redis.zrem(keys.user_owned(user), *stale)
        return len(stale)

    # --- access ---------------------------------------------------------------

    async def is_member(self, thread: ThreadId, user: UserId) -> bool:
        return bool(await self._redis.sismember(keys.members(thread), user))

    async def require_member(self, thread: ThreadId, user: UserId) -> str:
        """The thread's owner, once ``user`` may read it: NotFound when the
        thread does not exist, Forbidden when ``user`` is not a member."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hmget(keys.meta(thread), "epoch", "owner")
            pipe.sismember(keys.members(thread), user)
            (epoch, owner), member = await pipe.execute()
        if epoch is None:
            raise NotFound("no such thread")
        if not member and not self._open:
            raise Forbidden("you are not a member of this thread")
        return str(owner or "")

    async def require_owner(self, thread: ThreadId, user: UserId) -> None:
        """NotFound, or Forbidden unless ``user`` owns the thread (with auth
        off everyone does)."""
        owner = await self.require_member(thread, user)
        if owner != user and not self._open:
            raise Forbidden("only the owner may do this")

    async def describe(self, thread: ThreadId, user: UserId) -> tuple[ThreadSummary, list[str]]:
        """A member's view of a thread: its summary and its members."""
        await self.require_member(thread, user)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hmget(keys.meta(thread), *_SUMMARY_FIELDS)
            pipe.smembers(keys.members(thread))
            pipe.zscore(keys.user_threads(user), thread)
            meta, members, active_at = await pipe.execute()
        summary = _summary(thread, meta, active_at, self._default_policy)
        if summary is None:
            raise NotFound("no such thread")
        return summary, sorted(members)

    # --- owner's changes ------------------------------------------------------

    async def rename(self, thread: ThreadId, user: UserId, title: str) -> None:
        await self._update(thread, user, "title", _checked_title(title))

    async def set_prompt_policy(self, thread: ThreadId, user: UserId, policy: PromptPolicy) -> None:
        """What a prompt sent while a turn runs gets (owner only)."""
        await self._update(thread, user, "prompt_policy", policy)

    async def _update(self, thread: ThreadId, user: UserId, name: str, value: str) -> None:
        result = await self._scripts.update_thread(
            keys=[keys.meta(thread), keys.history(thread)],
            args=[user, self._owner_only, self._publish, "0", name, value],
        )
        _raise_for(result, "only the owner may change this thread")
        await self._notices.changed(thread)

    async def prompt_policy(self, thread: ThreadId) -> PromptPolicy:
        stored = text(await self._redis.hget(keys.meta(thread), "prompt_policy"))
        return _policy(stored, self._default_policy)

    async def auto_title(self, thread: ThreadId, title: str) -> bool:
        """Title an untitled thread; False when it has a title by now (an
        owner's rename always wins) or is gone."""
        result = await self._scripts.update_thread(
            keys=[keys.meta(thread), keys.history(thread)],
            args=["", "0", self._publish, "1", "title", _checked_title(title)],
        )
        if result != "ok":
            return False
        await self._notices.changed(thread)
        return True

    async def role(self, thread: ThreadId, user: UserId) -> str:
        """``user``'s role in the thread: owner, member or viewer (with auth
        off everyone is a member). Call after a membership check."""
        if self._open:
            return "member"
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hget(keys.roles(thread), user)
            pipe.hget(keys.meta(thread), "owner")
            viewer, owner = await pipe.execute()
        if viewer == "viewer":
            return "viewer"
        return "owner" if owner == user else "member"

    async def add_member(
        self, thread: ThreadId, user: UserId, member: UserId, role: str = "member"
    ) -> None:
        """The owner adds ``member`` with ``role`` (member or viewer), or
        changes the role of a member already there."""
        result = await self._change_member(thread, user, "add", member, role)
        if result == "full":
            raise Conflict(f"a thread has at most {self._max_members} members")
        if result == "owner":
            raise Conflict("the owner's role cannot change")
        _raise_for(result, "only the owner may add members")
        now_ms = int(time.time() * 1000)
        await self._redis.zadd(keys.user_threads(member), {thread: now_ms}, nx=True)
        await self._notices.changed(thread)

    async def remove_member(self, thread: ThreadId, user: UserId, member: UserId) -> None:
        """The owner removes ``member``, or ``member`` leaves. The member's open
        sockets on the thread are closed (every pod hears it on the channel)."""
        result = await self._change_member(thread, user, "remove", member)
        if result == "owner":
            raise Conflict("the owner cannot leave the thread: delete it instead")
        _raise_for(result, "only the owner may remove other members")
        await self._redis.zrem(keys.user_threads(member), thread)
        await self._notices.removed(thread, [member], "left" if member == user else "revoked")

    async def _change_member(
        self, thread: ThreadId, user: UserId, action: str, member: UserId, role: str = "member"
    ) -> str:
        revoke = orjson.dumps({"control": "revoke", "user_id": member}).decode()
        result: str = await self._scripts.change_member(
            keys=[
                keys.meta(thread), keys.members(thread), keys.live(thread),
                keys.history(thread), keys.roles(thread),
            ],
            args=[
                user, self._owner_only, action, member, self._max_members,
                self._publish, revoke, role,
            ],
        )  # fmt: skip
        return result

    async def delete(self, thread: ThreadId, user: UserId) -> None:
        """Delete the thread and every key it holds (see DELETE_THREAD for why
        its fence stays behind a while, as a tombstone); its sockets close."""
        fence = keys.fence(thread)
        doomed = [key for key in keys.all_thread_keys(thread) if key != fence]
        reply = await self._scripts.delete_thread(
            keys=[keys.meta(thread), keys.members(thread), fence, keys.live(thread), *doomed],
            args=[user, self._owner_only, self._publish, DELETED_FRAME, keys.DELETED_TTL_S],
        )
        _raise_for(reply[0], "only the owner may delete this thread")
        owner, members = reply[1], reply[2:]
        await self._notices.removed(thread, members, "deleted")
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for member in {owner, *members} - {""}:
                    pipe.zrem(keys.user_threads(UserId(member)), thread)
                if owner:
                    pipe.zrem(keys.user_owned(UserId(owner)), thread)
                pipe.zrem(keys.TURN_INDEX, thread)
                await pipe.execute()
        except (RedisError, OSError) as exc:  # the lists are pruned when read
            log.warning("lists still name deleted thread %s: %s", thread, exc)

    # --- a user's list --------------------------------------------------------

    async def last_event_id(self, thread: ThreadId) -> str | None:
        return text(await self._redis.hget(keys.meta(thread), "last_event_id"))

    async def touch_members(self, thread: ThreadId, members: Collection[str] | None = None) -> None:
        """Move the thread to the top of every member's list (activity is
        shared: anyone's prompt is news for all of them); ``members`` read
        here unless given (a turn's start has them).

        Separate commands, not part of the turn's commit: a user's list is
        hash-tagged by user, so on a Redis Cluster it lives on another shard
        than the thread. A crash in between only leaves the lists a little
        stale; the thread's own data is already committed."""
        if members is None:
            members = text_set(await self._redis.smembers(keys.members(thread)))
        now_ms = int(time.time() * 1000)
        async with self._redis.pipeline(transaction=False) as pipe:
            for member in members:
                pipe.zadd(keys.user_threads(UserId(member)), {thread: now_ms}, gt=True)
            await pipe.execute()

    async def of_user(self, user: UserId, limit: int = 100) -> list[str]:
        """The user's thread ids, most recently active first."""
        return texts(await self._redis.zrevrange(keys.user_threads(user), 0, limit - 1))

    async def page_of_user(
        self, user: UserId, limit: int, cursor: str | None
    ) -> tuple[list[ThreadSummary], str | None]:
        """One page of the user's threads, most recently active first, and the
        cursor of the next page (None at the end). A cursor is the last
        item's (activity, id): the list is ordered by score, then id, both
        descending, so the page after it is exactly what sorts below it, even
        when threads moved meanwhile."""
        after = parse_cursor(cursor) if cursor else None
        key = keys.user_threads(user)
        high = repr(after[0]) if after else "+inf"
        found: list[ThreadSummary] = []
        stale: list[str] = []
        offset = 0
        batch = limit + 1
        while len(found) <= limit:
            rows = scored(
                await self._redis.zrevrangebyscore(
                    key, high, "-inf", start=offset, num=batch, withscores=True
                )
            )
            offset += len(rows)
            fetched = len(rows)
            rows = [(t, s) for t, s in rows if not (after and s == after[0] and t >= after[1])]
            async with self._redis.pipeline(transaction=False) as pipe:
                for thread, _score in rows:
                    pipe.hmget(keys.meta(ThreadId(thread)), *_SUMMARY_FIELDS)
                    pipe.sismember(keys.members(ThreadId(thread)), user)
                replies = await pipe.execute()
            for i, (thread, score) in enumerate(rows):
                summary = _summary(ThreadId(thread), replies[2 * i], score, self._default_policy)
                if summary is None or not (replies[2 * i + 1] or self._open):
                    stale.append(thread)
                elif len(found) <= limit:
                    found.append(summary)
            if fetched < batch:
                break
        if stale:
            await self._redis.zrem(key, *stale)
        if len(found) > limit:
            last = found[limit - 1]
            return found[:limit], f"{last.active_at}~{last.id}"
        return found, None


def parse_cursor(cursor: str) -> tuple[float, ThreadId]:
    """A page cursor ``<activity>~<thread id>``, checked (InvalidRequest)."""
    score, _, thread = cursor.partition("~")
    try:
        value = float(score)
        if not math.isfinite(value):
            raise ValueError(score)
        return value, keys.thread_id(thread)
    except (ValueError, keys.InvalidId):
        raise InvalidRequest("cursor: not a cursor this server returned") from None


def _checked_title(title: str) -> str:
    title = title.strip()
    if not 1 <= len(title) <= MAX_TITLE_CHARS or not title.isprintable():
        raise InvalidRequest(f"title: 1 to {MAX_TITLE_CHARS} printable characters")
    return title


_SUMMARY_FIELDS = (
    "owner", "title", "created_at", "updated_at", "prompt_policy",
    "input_tokens", "output_tokens",
)  # fmt: skip


_POLICIES: dict[str, PromptPolicy] = {
    "reject": "reject",
    "queue": "queue",
    "interrupt": "interrupt",
}


def _policy(stored: str | None, default: PromptPolicy) -> PromptPolicy:
    return _POLICIES.get(stored or "", default)


def _summary(
    thread: ThreadId, meta: list[str | None], active_at: Any, default_policy: PromptPolicy
) -> ThreadSummary | None:
    owner, title, created_at, updated_at, policy, input_tokens, output_tokens = meta
    if owner is None:
        return None
    created = int(created_at or 0)
    return ThreadSummary(
        id=thread, title=title or "", owner=owner, created_at=created,
        updated_at=int(updated_at or created),
        active_at=int(float(active_at)) if active_at is not None else created,
        prompt_policy=_policy(policy, default_policy),
        input_tokens=int(input_tokens or 0), output_tokens=int(output_tokens or 0),
    )  # fmt: skip


def _raise_for(result: str, forbidden: str) -> None:
    if result == "not_found":
        raise NotFound("no such thread")
    if result == "forbidden":
        raise Forbidden(forbidden)
