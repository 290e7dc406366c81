"""A pod's kept model contexts (app.chat.contexts), against the real commit
scripts on fakeredis: a kept context is taken only when it is the one a
read of Redis returns, and read again whenever it might not be."""

from __future__ import annotations

import dataclasses
from typing import Any

from app.chat import keys
from app.chat.contexts import ContextCache
from app.chat.history import HistoryReader, committed
from app.chat.keys import ThreadId
from app.chat.lock import TurnLock
from app.chat.records import Message
from app.chat.scripts import Scripts
from app.chat.threads import Threads
from app.chat.turns import Begun, TurnStore
from app.llm.context import message_tokens
from tests.conftest import open_thread
from tests.test_turns import assistant_message, begin, done, user_message


async def turn(
    store: TurnStore, lock: TurnLock, redis: Any, thread: ThreadId, cache: ContextCache,
    n: int, budget: int, words: int = 40,
) -> tuple[list[Message] | None, list[Message]]:  # fmt: skip
    """One turn as a pod runs it: what the cache offers, what a read returns
    (the context the turn runs with, kept as the pod keeps it), and the
    reply committed and handed back to the cache."""
    lease, begun = await begin(store, lock, thread, generation_id=f"g{n}", content=f"ask {n}")
    assert isinstance(begun, Begun)
    asked = committed(begun.message_id, begun.parent, user_message(f"ask {n}"))
    offered = cache.context(thread, begun, asked, budget, message_tokens)
    read = await HistoryReader(redis, Scripts(redis)).context(
        thread, begun.message_id, budget, message_tokens, begun.context_start
    )
    cache.keep(thread, begun, read)
    if read[0].id != begun.context_start:
        await redis.set(keys.context_start(thread), read[0].id)
    reply = assistant_message(" ".join(f"w{n}" for _ in range(words)))
    ended = await store.end(thread, lease, reply, done(thread, f"g{n}"))
    assert ended is not None
    cache.replied(thread, committed(ended.message_id, begun.message_id, reply))
    return offered, read


def unsiblinged(messages: list[Message]) -> list[Message]:
    return [dataclasses.replace(m, siblings=None) for m in messages]


async def test_a_kept_context_is_the_one_a_read_returns_turn_after_turn(
    store: TurnStore, lock: TurnLock, redis: Any, thread: ThreadId
) -> None:
    """Through a window that outgrows its budget and starts again (REFILL)."""
    cache = ContextCache()
    offered, read = await turn(store, lock, redis, thread, cache, 0, budget=300)
    assert offered is None  # nothing kept yet
    starts = {read[0].id}
    for n in range(1, 12):
        offered, read = await turn(store, lock, redis, thread, cache, n, budget=300)
        assert offered is not None and unsiblinged(offered) == unsiblinged(read)
        starts.add(read[0].id)
    assert len(starts) > 2  # the window did start again on the way


async def test_another_pods_turn_or_a_new_start_makes_it_read(
    store: TurnStore, lock: TurnLock, redis: Any, thread: ThreadId
) -> None:
    cache, elsewhere = ContextCache(), ContextCache()
    await turn(store, lock, redis, thread, cache, 0, budget=10_000)
    await turn(store, lock, redis, thread, elsewhere, 1, budget=10_000)  # another pod's turn
    offered, read = await turn(store, lock, redis, thread, cache, 2, budget=10_000)
    assert offered is None and len(read) == 5  # the leaf moved on since: read
    await redis.delete(keys.context_start(thread))  # expired: the window may differ
    offered, _ = await turn(store, lock, redis, thread, cache, 3, budget=10_000)
    assert offered is None
    offered, read = await turn(store, lock, redis, thread, cache, 4, budget=10_000)
    assert offered is not None and unsiblinged(offered) == unsiblinged(read)


async def test_a_new_history_version_makes_every_pod_read_again(
    store: TurnStore, lock: TurnLock, redis: Any, thread: ThreadId
) -> None:
    """ERASE_AUTHOR counts its erasure in the step that redacts (on a real
    Redis: tests/integration/test_erase.py); the thread made again after a
    loss is a new epoch."""
    cache = ContextCache()
    await turn(store, lock, redis, thread, cache, 0, budget=10_000)
    await redis.hincrby(keys.meta(thread), "erasures", 1)
    offered, _ = await turn(store, lock, redis, thread, cache, 1, budget=10_000)
    assert offered is None
    await redis.hset(keys.meta(thread), "epoch", "another")
    offered, _ = await turn(store, lock, redis, thread, cache, 2, budget=10_000)
    assert offered is None
    offered, _ = await turn(store, lock, redis, thread, cache, 3, budget=10_000)
    assert offered is not None


async def test_nothing_read_from_the_archive_is_kept(
    store: TurnStore, lock: TurnLock, redis: Any, thread: ThreadId
) -> None:
    cache = ContextCache()
    await turn(store, lock, redis, thread, cache, 0, budget=10_000)
    offered, read = await turn(store, lock, redis, thread, cache, 1, budget=10_000)
    assert offered is not None
    # The archiver moved the first messages (their erasure there comes after
    # ERASE_AUTHOR's): a context reaching below the watermark is not kept.
    await redis.hset(keys.meta(thread), "archived", read[2].id)
    offered, _ = await turn(store, lock, redis, thread, cache, 2, budget=10_000)
    assert offered is not None  # kept before: still what Redis and the archive hold
    offered, _ = await turn(store, lock, redis, thread, cache, 3, budget=10_000)
    assert offered is None


async def test_the_cache_is_bounded(
    store: TurnStore, lock: TurnLock, redis: Any, threads: Threads
) -> None:
    cache = ContextCache(max_threads=2, max_chars=10_000)
    made = [await open_thread(threads, f"kept{i}") for i in range(3)]
    for thread in made:
        await turn(store, lock, redis, thread, cache, 0, budget=10_000)
    offered, _ = await turn(store, lock, redis, made[0], cache, 1, budget=10_000)
    assert offered is None  # the least recently used went first
    await turn(store, lock, redis, made[2], cache, 1, budget=100_000, words=4000)
    offered, _ = await turn(store, lock, redis, made[2], cache, 2, budget=100_000)
    assert offered is None  # a context past max_chars is not kept
