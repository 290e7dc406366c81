"""The reaper: turns whose pod died are closed from the log; live ones are left alone."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from app.chat import keys, tasks
from app.chat.errors import LockLost
from app.chat.keys import ThreadId
from app.chat.lock import Lease
from app.chat.reaper import Reaper
from app.chat.records import Delta, Loading, Message
from app.chat.service import ChatService
from app.chat.turns import Begun
from tests.conftest import USER, Listener, wait_until

MakeService = Callable[..., Awaitable[ChatService]]


@pytest.fixture
async def service(make_service: MakeService) -> ChatService:
    return await make_service()


async def dead_turn(
    service: ChatService, thread: ThreadId, generation_id: str, pieces: list[str]
) -> Lease:
    """A turn as a pod leaves it when it dies mid-reply: begun, some deltas
    published, in the index, and then no one renews its lease."""
    await service.threads.open(thread, USER)
    lease = await service.lock.acquire(thread)
    assert lease is not None
    await service.turns.index_add(thread)
    message = Message(
        id="", role="user", content="q", user_id=USER, created_at=1, status="complete"
    )
    loading = Loading(thread_id=thread, generation_id=generation_id, model="fake")
    begun = await service.turns.begin(thread, lease, message, loading, "dead-pod")
    assert isinstance(begun, Begun)
    for seq, text in enumerate(pieces):
        delta = Delta(thread_id=thread, generation_id=generation_id, seq=seq, text=text)
        await service.turns.append_deltas(thread, lease, [delta])
    return lease


async def test_sweep_closes_a_dead_pods_turn(service: ChatService, redis: Any) -> None:
    thread = keys.thread_id("orphan")
    dead = await dead_turn(service, thread, "g", ["The ", "answer ", "is"])
    await redis.delete(keys.lock(thread))  # the lease ran out
    reaper = service.reaper(holder="r1")

    async with Listener(redis, keys.live(thread)) as live:
        assert await reaper.sweep() == 1
        frames = [orjson.loads(f) for f in await live.drain()]

    history = await redis.xrange(keys.history(thread), "-", "+")
    assert len(history) == 2
    message_id, fields = history[-1]
    assert fields["role"] == "assistant"
    assert fields["content"] == "The answer is"
    assert fields["status"] == "interrupted"

    assert [f["type"] for f in frames] == ["message", "done"]
    assert frames[0]["message"]["id"] == message_id
    assert frames[0]["message"]["content"] == "The answer is"
    assert frames[1]["status"] == "interrupted"
    assert frames[1]["message_id"] == message_id and frames[1]["generation_id"] == "g"

    assert await service.turns.record(thread) is None
    assert await redis.zscore(keys.TURN_INDEX, thread) is None
    assert await redis.exists(keys.lock(thread)) == 0
    # The dead turn, should it wake up, can never write again.
    with pytest.raises(LockLost):
        await service.turns.append_deltas(
            thread, dead, [Delta(thread_id=thread, generation_id="g", seq=3, text="zombie")]
        )
    # A second sweep finds nothing to do.
    assert await reaper.sweep() == 0
    assert len(await redis.xrange(keys.history(thread), "-", "+")) == 2


async def test_sweep_leaves_a_live_turn_alone(service: ChatService, redis: Any) -> None:
    thread = keys.thread_id("alive")
    lease = await dead_turn(service, thread, "g", ["still ", "going"])
    before = await redis.xrange(keys.events(thread), "-", "+")
    assert await service.reaper(holder="r1").sweep() == 0
    assert await redis.xrange(keys.events(thread), "-", "+") == before
    record = await service.turns.record(thread)
    assert record is not None and record.generation_id == "g"
    assert await redis.get(keys.lock(thread)) == lease.token
    assert await redis.zscore(keys.TURN_INDEX, thread) is not None


async def test_a_queue_starter_leaves_a_dead_turn_to_the_worker(
    service: ChatService, redis: Any
) -> None:
    """Beside a standalone worker, a pod's sweep only starts queues: a dead
    pod's turn stays as it is (the worker closes it), and the starter holds
    a lease of its own, not the worker's."""
    thread = keys.thread_id("for-the-worker")
    await dead_turn(service, thread, "g", ["left ", "open"])
    await redis.delete(keys.lock(thread))  # the lease ran out
    before = await redis.xrange(keys.events(thread), "-", "+")
    starter = service.reaper(holder="pod:a", close_orphans=False)
    run = asyncio.create_task(starter.run_forever())
    try:
        await wait_until(lambda: redis.get(keys.QUEUE_LEADER), what="the starter's lease")
        assert await redis.get(keys.QUEUE_LEADER) == "pod:a"
        assert await redis.get(keys.REAPER_LEADER) is None
        assert await starter.sweep() == 0
    finally:
        await tasks.stop(run, 1.0)
    assert await redis.xrange(keys.events(thread), "-", "+") == before
    record = await service.turns.record(thread)
    assert record is not None and record.generation_id == "g"
    assert await redis.zscore(keys.TURN_INDEX, thread) is not None
    assert await redis.exists(keys.lock(thread)) == 0  # released again


async def test_sweep_drops_an_index_entry_without_a_turn(service: ChatService, redis: Any) -> None:
    thread = keys.thread_id("finished")
    await service.threads.open(thread, USER)
    await service.turns.index_add(thread)  # the turn ended but its index removal was lost
    assert await service.reaper(holder="r1").sweep() == 0
    assert await redis.zscore(keys.TURN_INDEX, thread) is None
    assert await redis.exists(keys.lock(thread)) == 0
    assert await redis.xlen(keys.history(thread)) == 0


async def test_sweep_closes_several_threads(service: ChatService, redis: Any) -> None:
    names = ["d1", "d2", "d3"]
    for name in names:
        thread = keys.thread_id(name)
        await dead_turn(service, thread, f"g-{name}", [name])
        await redis.delete(keys.lock(thread))
    live = keys.thread_id("live")
    await dead_turn(service, live, "g-live", ["x"])
    assert await service.reaper(holder="r1").sweep() == 3
    for name in names:
        [(_, fields)] = await redis.xrevrange(keys.history(keys.thread_id(name)), count=1)
        assert fields["content"] == name and fields["status"] == "interrupted"
    assert await service.turns.index_threads() == ["live"]


async def test_only_the_leader_sweeps(
    make_service: MakeService, redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = await make_service(chat_reaper_interval_ms=100)
    first, second = service.reaper(holder="pod:a"), service.reaper(holder="pod:b")
    sweeps = {"pod:a": 0, "pod:b": 0}

    def counting(reaper: Reaper, holder: str) -> None:
        async def sweep() -> int:
            sweeps[holder] += 1
            return 0

        monkeypatch.setattr(reaper, "sweep", sweep)

    counting(first, "pod:a")
    counting(second, "pod:b")
    running = [asyncio.create_task(r.run_forever()) for r in (first, second)]
    try:  # three sweeps of the leader: as many chances for the other to sweep
        await wait_until(lambda: max(sweeps.values()) >= 3, what="three sweeps")
    finally:
        # As app.main stops its reaper: on Python 3.11 a plain cancel can be
        # lost (app.chat.tasks), and the reaper's loop then never ends.
        await tasks.stop_all(running, 5)
    leader = await redis.get(keys.REAPER_LEADER)
    assert leader in sweeps
    follower = "pod:b" if leader == "pod:a" else "pod:a"
    assert sweeps[leader] >= 3
    assert sweeps[follower] == 0


async def test_leadership_passes_on_when_the_lease_lapses(service: ChatService, redis: Any) -> None:
    lease = service.scripts.leader_lease
    assert await lease(keys=[keys.REAPER_LEADER], args=["a", 1000]) == 1
    assert await lease(keys=[keys.REAPER_LEADER], args=["b", 1000]) == 0
    assert await lease(keys=[keys.REAPER_LEADER], args=["a", 1000]) == 1  # kept
    await redis.delete(keys.REAPER_LEADER)  # a's pod died, its lease expired
    assert await lease(keys=[keys.REAPER_LEADER], args=["b", 1000]) == 1
    assert await lease(keys=[keys.REAPER_LEADER], args=["a", 1000]) == 0
