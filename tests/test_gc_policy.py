"""The pod's garbage-collection policy (app.gc_policy): what settles is
frozen, and the full collection reclaims cycles among frozen objects."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from app.gc_policy import CollectionPolicy
from tests.conftest import wait_until


class Node:
    """A tracked object that can sit in a reference cycle."""

    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture(autouse=True)
def thawed() -> Iterator[None]:
    """Each test starts and ends with nothing frozen (the suite's process
    must not keep objects out of its own collector's sight)."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def cycle() -> weakref.ref[Node]:
    """A two-node reference cycle nobody else holds, and a weak reference to it."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


async def running(policy: CollectionPolicy) -> asyncio.Task[None]:
    task = asyncio.create_task(policy.run_forever())
    await asyncio.sleep(0)  # its hook is in place
    return task


async def stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_what_a_collection_promotes_is_frozen_at_once() -> None:
    task = await running(CollectionPolicy(full_every_s=0))
    try:
        kept = [Node() for _ in range(100)]
        assert any(o is kept[0] for o in gc.get_objects())
        gc.collect(1)  # they reach the oldest generation, as a burst's sockets do
        assert not any(o is kept[0] for o in gc.get_objects())  # out of the collector's sight
        assert gc.get_freeze_count() > 0
    finally:
        await stopped(task)
    gc.unfreeze()
    gc.collect(1)  # with the policy stopped, nothing is frozen any more
    assert gc.get_freeze_count() == 0 and any(o is kept[0] for o in gc.get_objects())


async def test_young_collections_freeze_nothing() -> None:
    task = await running(CollectionPolicy(full_every_s=0))
    try:
        gc.collect(0)
        assert gc.get_freeze_count() == 0
    finally:
        await stopped(task)


def test_a_frozen_cycle_is_reclaimed_only_by_the_full_collection() -> None:
    dead = cycle()
    gc.freeze()  # as a socket's objects are frozen while it lives, then dropped
    gc.collect()
    assert dead() is not None  # frozen: no ordinary collection sees it
    policy = CollectionPolicy(full_every_s=0)
    policy.collect_all()
    assert dead() is None
    assert policy.kept == gc.get_freeze_count() > 0  # the survivors are frozen again


async def test_the_full_collection_comes_once_enough_was_frozen_since_the_last() -> None:
    dead = cycle()
    gc.freeze()  # a dropped cycle among frozen objects
    policy = CollectionPolicy(full_every_s=0.02)
    task = await running(policy)
    gc.disable()  # no collection of its own promotes anything meanwhile
    try:
        few = [Node() for _ in range(policy.kept // 10)]
        gc.collect(1)  # frozen by the policy, but not a quarter of what was frozen before
        await asyncio.sleep(0.2)
        assert dead() is not None
        many = [Node() for _ in range(policy.kept // 4)]
        gc.collect(1)  # now enough to be worth a full collection
        await wait_until(lambda: dead() is None, what="the full collection")
        assert policy.frozen_since_full == 0 and few and many
    finally:
        gc.enable()
        await stopped(task)
