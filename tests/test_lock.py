"""The per-thread turn lock: a lease with a fencing number."""

from __future__ import annotations

import asyncio
from typing import Any

from app.chat import keys
from app.chat.keys import ThreadId
from app.chat.lock import Lease, TurnLock
from app.chat.scripts import Scripts
from tests.conftest import Clock

T = keys.thread_id("locked")


async def test_acquire_gives_a_lease_with_the_first_fence(lock: TurnLock, redis: Any) -> None:
    lease = await lock.acquire(T)
    assert isinstance(lease, Lease) and lease.fence == 1
    assert await redis.get(keys.lock(T)) == lease.token
    assert 0 < await redis.pttl(keys.lock(T)) <= lock.ttl_ms


async def test_second_acquire_while_held_is_refused(lock: TurnLock, redis: Any) -> None:
    first = await lock.acquire(T)
    assert first is not None
    assert await lock.acquire(T) is None
    # The refused attempt took no fencing number and did not touch the lock.
    assert await redis.get(keys.fence(T)) == "1"
    assert await redis.get(keys.lock(T)) == first.token


async def test_fences_increase_with_each_grant(lock: TurnLock) -> None:
    fences = []
    for _ in range(5):
        lease = await lock.acquire(T)
        assert lease is not None
        fences.append(lease.fence)
        assert await lock.release(T, lease)
    assert fences == [1, 2, 3, 4, 5]


async def test_tokens_are_unique(lock: TurnLock) -> None:
    tokens = set()
    for _ in range(5):
        lease = await lock.acquire(T)
        assert lease is not None
        tokens.add(lease.token)
        await lock.release(T, lease)
    assert len(tokens) == 5


async def test_locks_of_threads_are_independent(lock: TurnLock) -> None:
    a = await lock.acquire(keys.thread_id("a"))
    b = await lock.acquire(keys.thread_id("b"))
    assert a is not None and b is not None
    assert a.fence == 1 and b.fence == 1


async def test_release_only_by_owner(lock: TurnLock, redis: Any) -> None:
    lease = await lock.acquire(T)
    assert lease is not None
    impostor = Lease(token="not-the-owner", fence=lease.fence)
    assert await lock.release(T, impostor) is False
    assert await redis.get(keys.lock(T)) == lease.token
    assert await lock.release(T, lease) is True
    assert await redis.exists(keys.lock(T)) == 0
    # Releasing twice is harmless and says so.
    assert await lock.release(T, lease) is False


async def test_renew_only_by_owner(scripts: Scripts, redis: Any) -> None:
    short = TurnLock(scripts, ttl_ms=1000)
    lease = await short.acquire(T)
    assert lease is not None
    await redis.pexpire(keys.lock(T), 100)
    assert await short.renew(T, Lease("someone-else", lease.fence)) is False
    assert await redis.pttl(keys.lock(T)) <= 100
    assert await short.renew(T, lease) is True
    assert await redis.pttl(keys.lock(T)) > 100


async def test_renew_after_loss_is_false(lock: TurnLock, redis: Any) -> None:
    lease = await lock.acquire(T)
    assert lease is not None
    await redis.delete(keys.lock(T))
    assert await lock.renew(T, lease) is False
    assert await redis.exists(keys.lock(T)) == 0  # renew never recreates the lock


async def test_expired_lease_lets_a_new_grant_in_with_a_larger_fence(
    scripts: Scripts, clock: Clock
) -> None:
    short = TurnLock(scripts, ttl_ms=1000)
    first = await short.acquire(T)
    assert first is not None
    clock.advance(0.9)
    assert await short.acquire(T) is None
    clock.advance(0.2)
    second = await short.acquire(T)
    assert second is not None and second.fence > first.fence
    # The old owner can neither renew nor release the new grant.
    assert await short.renew(T, first) is False
    assert await short.release(T, first) is False
    assert await short.release(T, second) is True


async def test_deleted_lock_lets_a_new_grant_in(lock: TurnLock, redis: Any) -> None:
    first = await lock.acquire(T)
    assert first is not None
    await redis.delete(keys.lock(T))
    second = await lock.acquire(T)
    assert second is not None and second.fence == first.fence + 1


async def test_concurrent_acquires_grant_exactly_one(lock: TurnLock) -> None:
    thread: ThreadId = keys.thread_id("race")
    results = await asyncio.gather(*(lock.acquire(thread) for _ in range(20)))
    granted = [r for r in results if r is not None]
    assert len(granted) == 1
