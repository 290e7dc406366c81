"""Who may do what to a thread (app.chat.threads) on fakeredis: ownership,
members, strangers, rename, delete (and a turn running through it), the
thread quota, and paging a user's thread list."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from app.chat import keys
from app.chat.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    LockLost,
    NotFound,
    RateLimited,
)
from app.chat.keys import ThreadId
from app.chat.lock import TurnLock
from app.chat.records import Delta, Loading, Message
from app.chat.scripts import Scripts
from app.chat.threads import Threads
from app.chat.turns import Begun, TurnStore
from tests.conftest import Clock, Listener

OWNER = keys.user_id("olivia")
MEMBER = keys.user_id("max")
STRANGER = keys.user_id("sam")


@pytest.fixture
def access(redis: Any, scripts: Scripts) -> Threads:
    return Threads(redis, scripts, max_threads=3, max_members=3)


async def _thread(access: Threads, name: str = "room", title: str = "") -> ThreadId:
    thread = keys.thread_id(name)
    await access.create(thread, OWNER, title)
    return thread


async def test_the_creator_owns_the_thread_and_an_id_is_taken_once(access: Threads) -> None:
    thread = await _thread(access, title="  Plans  ")
    summary, members = await access.describe(thread, OWNER)
    assert (summary.owner, summary.title, members) == (OWNER, "Plans", [OWNER])
    with pytest.raises(Conflict):
        await access.create(thread, STRANGER, "")
    info = await access.open(thread, OWNER)  # opening it again creates nothing
    assert not info.created and info.owner == OWNER


async def test_a_stranger_reads_and_changes_nothing(access: Threads) -> None:
    thread = await _thread(access)
    with pytest.raises(Forbidden):
        await access.require_member(thread, STRANGER)
    with pytest.raises(Forbidden):
        await access.describe(thread, STRANGER)
    with pytest.raises(Forbidden):
        await access.rename(thread, STRANGER, "mine now")
    with pytest.raises(Forbidden):
        await access.add_member(thread, STRANGER, STRANGER)
    with pytest.raises(Forbidden):
        await access.remove_member(thread, STRANGER, OWNER)
    with pytest.raises(Forbidden):
        await access.delete(thread, STRANGER)
    with pytest.raises(NotFound):
        await access.require_member(keys.thread_id("nothing"), STRANGER)
    summary, _ = await access.describe(thread, OWNER)
    assert summary.title == ""


async def test_the_owner_manages_members(access: Threads, redis: Any) -> None:
    thread = await _thread(access)
    await access.add_member(thread, OWNER, MEMBER)
    assert await access.require_member(thread, MEMBER) == OWNER
    assert thread in await access.of_user(MEMBER)
    with pytest.raises(Forbidden):
        await access.add_member(thread, MEMBER, STRANGER)  # members do not invite
    with pytest.raises(Forbidden):
        await access.rename(thread, MEMBER, "x")  # nor rename
    await access.add_member(thread, OWNER, keys.user_id("third"))
    with pytest.raises(Conflict, match="at most 3"):
        await access.add_member(thread, OWNER, STRANGER)
    await access.add_member(thread, OWNER, MEMBER)  # already in: not over the limit
    with pytest.raises(Conflict, match="owner cannot leave"):
        await access.remove_member(thread, OWNER, OWNER)
    async with Listener(redis, keys.live(thread)) as channel:
        await access.remove_member(thread, OWNER, MEMBER)
        frames = await channel.drain()
    assert [orjson.loads(f) for f in frames] == [{"control": "revoke", "user_id": MEMBER}]
    with pytest.raises(Forbidden):
        await access.require_member(thread, MEMBER)
    assert thread not in await access.of_user(MEMBER)


async def test_a_member_may_leave(access: Threads) -> None:
    thread = await _thread(access)
    await access.add_member(thread, OWNER, MEMBER)
    await access.remove_member(thread, MEMBER, MEMBER)
    with pytest.raises(Forbidden):
        await access.require_member(thread, MEMBER)


@pytest.mark.parametrize("title", ["", " ", "x" * 201, "tab\there"])
async def test_bad_titles_are_refused(access: Threads, title: str) -> None:
    thread = await _thread(access)
    with pytest.raises(InvalidRequest):
        await access.rename(thread, OWNER, title)


async def test_delete_removes_every_key_and_blocks_the_id_for_a_while(
    access: Threads, redis: Any, store: TurnStore, lock: TurnLock
) -> None:
    thread = await _thread(access)
    await access.add_member(thread, OWNER, MEMBER)
    running = await lock.acquire(thread)
    assert running is not None
    begun = await store.begin(thread, running, _message(), _loading(thread, "g1"), "pod-a")
    assert isinstance(begun, Begun)
    with pytest.raises(Forbidden):
        await access.delete(thread, MEMBER)  # only the owner
    async with Listener(redis, keys.live(thread)) as channel:
        await access.delete(thread, OWNER)
        frames = await channel.drain()
    assert [orjson.loads(f) for f in frames] == [{"control": "deleted"}]
    # Only the tombstone is left, and it expires.
    assert set(await redis.keys("*")) == {keys.fence(thread)}
    assert 0 < await redis.ttl(keys.fence(thread)) <= keys.DELETED_TTL_S
    # The turn that was running cannot write another byte.
    delta = Delta(thread_id=thread, generation_id="g1", seq=0, text="zombie")
    with pytest.raises(LockLost):
        await store.append_deltas(thread, running, [delta])
    # Nor can a prompt from a socket still open on it, even with a fresh lease.
    fresh = await lock.acquire(thread)
    assert fresh is not None and fresh.fence > running.fence
    with pytest.raises(NotFound):
        await store.begin(thread, fresh, _message(), _loading(thread, "g2"), "pod-a")
    await lock.release(thread, fresh)
    assert set(await redis.keys("*")) == {keys.fence(thread)}
    assert await redis.ttl(keys.fence(thread)) > 0  # still a tombstone
    with pytest.raises(NotFound):
        await access.open(thread, MEMBER)
    with pytest.raises(Conflict, match="deleted recently"):
        await access.create(thread, OWNER, "")
    with pytest.raises(NotFound):
        await access.delete(thread, OWNER)
    with pytest.raises(NotFound):
        await access.rename(thread, OWNER, "ghost")
    with pytest.raises(NotFound):
        await access.add_member(thread, OWNER, STRANGER)
    assert set(await redis.keys("*")) == {keys.fence(thread)}
    # Once the tombstone has expired the id is free again, fences only grow.
    await redis.delete(keys.fence(thread))
    await access.open(thread, STRANGER)
    assert (await access.describe(thread, STRANGER))[0].owner == STRANGER


async def test_the_thread_quota(access: Threads, redis: Any) -> None:
    for name in ("q1", "q2", "q3"):
        await _thread(access, name)
    with pytest.raises(RateLimited) as refused:
        await access.create(keys.thread_id("q4"), OWNER, "")
    assert not refused.value.retryable
    with pytest.raises(RateLimited):
        await access.open(keys.thread_id("q4"), OWNER)  # a socket cannot create it either
    await access.open(keys.thread_id("q1"), OWNER)  # opening owned ones still works
    assert await redis.exists(keys.meta(keys.thread_id("q4"))) == 0
    await access.delete(keys.thread_id("q1"), OWNER)
    await access.create(keys.thread_id("q4"), OWNER, "")
    # A reservation whose creation never happened is pruned when it matters.
    await redis.zadd(keys.user_owned(OWNER), {"never-made": 1})
    await access.delete(keys.thread_id("q2"), OWNER)
    await access.create(keys.thread_id("q5"), OWNER, "")
    assert await redis.zcard(keys.user_owned(OWNER)) == 3
    # Opening someone else's thread costs nothing of the quota.
    other = Threads(redis, access._scripts, max_threads=3)
    await other.create(keys.thread_id("elsewhere"), STRANGER, "")
    await other.add_member(keys.thread_id("elsewhere"), STRANGER, OWNER)
    await access.open(keys.thread_id("elsewhere"), OWNER)


async def test_no_thread_is_created_while_its_creator_is_erased(
    access: Threads, redis: Any
) -> None:
    await redis.set(keys.user_erasing(OWNER), "1")
    with pytest.raises(Forbidden):
        await access.create(keys.thread_id("during"), OWNER, "")
    with pytest.raises(Forbidden):
        await access.open(keys.thread_id("during"), OWNER)
    assert not await redis.exists(keys.meta(keys.thread_id("during")), keys.user_owned(OWNER))


async def test_pages_of_a_users_threads_newest_activity_first(access: Threads, redis: Any) -> None:
    big = Threads(redis, access._scripts, max_threads=100)
    names = [f"p{i}" for i in range(7)]
    for name in names:
        await big.create(keys.thread_id(name), OWNER, name.upper())
    # Activity: p3 newest; p0..p2 share one score (ties are ordered by id).
    scores = {"p0": 10.0, "p1": 10.0, "p2": 10.0, "p3": 50.0, "p4": 40.0, "p5": 30.0, "p6": 20.0}
    await redis.zadd(keys.user_threads(OWNER), scores)
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        page, cursor = await big.page_of_user(OWNER, 2, cursor)
        seen += [s.id for s in page]
        assert len(page) <= 2
        if cursor is None:
            break
    assert seen == ["p3", "p4", "p5", "p6", "p2", "p1", "p0"]
    # Threads gone or left are dropped from the list as it is read.
    await big.delete(keys.thread_id("p3"), OWNER)
    await redis.zadd(keys.user_threads(OWNER), {"p3": 60.0, "ghost": 70.0})
    page, cursor = await big.page_of_user(OWNER, 100, None)
    assert [s.id for s in page] == ["p4", "p5", "p6", "p2", "p1", "p0"] and cursor is None
    assert await redis.zscore(keys.user_threads(OWNER), "ghost") is None
    with pytest.raises(InvalidRequest):
        await big.page_of_user(OWNER, 2, "nan~p1")
    with pytest.raises(InvalidRequest):
        await big.page_of_user(OWNER, 2, "1.0~{bad}")


async def test_activity_moves_a_thread_up_for_every_member(
    access: Threads, redis: Any, clock: Clock
) -> None:
    first = await _thread(access, "first")
    second = await _thread(access, "second")
    await access.add_member(first, OWNER, MEMBER)
    await access.add_member(second, OWNER, MEMBER)
    clock.advance(1)
    await access.touch_members(first)
    for user in (OWNER, MEMBER):
        page, _ = await access.page_of_user(user, 10, None)
        assert page[0].id == "first"


async def test_with_auth_off_access_is_open(redis: Any, scripts: Scripts) -> None:
    open_threads = Threads(redis, scripts, open_access=True, max_threads=1)
    thread, second = keys.thread_id("lobby"), keys.thread_id("lobby2")
    await open_threads.create(thread, OWNER, "")
    # A stranger (not a member) reads, renames and deletes like the owner.
    assert await open_threads.require_member(thread, STRANGER) == OWNER
    assert not await open_threads.is_member(thread, STRANGER)
    await open_threads.rename(thread, STRANGER, "anyone may")
    summary, members = await open_threads.describe(thread, STRANGER)
    assert summary.title == "anyone may" and members == [OWNER]
    # No quota either: a second thread with max_threads=1.
    await open_threads.create(second, OWNER, "")
    assert await open_threads.of_user(OWNER) == [second, thread]
    await open_threads.delete(thread, STRANGER)
    with pytest.raises(NotFound):
        await open_threads.require_member(thread, OWNER)
    assert await open_threads.of_user(OWNER) == [second]


def _message() -> Message:
    return Message(
        id="", role="user", content="hi", user_id=OWNER,
        created_at=int(time.time() * 1000), status="complete",
    )  # fmt: skip


def _loading(thread: ThreadId, generation_id: str) -> Loading:
    return Loading(thread_id=thread, generation_id=generation_id, model="fake")
