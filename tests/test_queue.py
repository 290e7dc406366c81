"""The prompt queue (app.chat.queue) through ChatService, on fakeredis: what
each prompt_policy does with a prompt sent while a turn runs, the order and
uniqueness of queued turns, cancelling, the queue limit, a new prompt never
overtaking waiting ones, the reaper starting what waits on a free thread,
and a removed member's prompts never running."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from app.chat import keys
from app.chat.errors import Forbidden, NotFound, QueueFull, ThreadBusy
from app.chat.records import Message
from app.chat.service import ChatService
from tests.conftest import USER, wait_until

MakeService = Callable[..., Awaitable[ChatService]]
T = keys.thread_id("queued")
BOB = keys.user_id("bob")


async def log(redis: Any) -> list[dict[str, Any]]:
    return [orjson.loads(f["data"]) for _, f in await redis.xrange(keys.events(T))]


async def turns_done(redis: Any, count: int) -> None:
    async def done() -> bool:
        events = await log(redis)
        idle = not await redis.exists(keys.lock(T), keys.queue(T))
        return idle and sum(e["type"] == "done" for e in events) >= count

    await wait_until(done, timeout=10, what=f"{count} turns to end")


def prompts(events: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    """(content, queue_id) of the user messages, in order."""
    return [
        (e["message"]["content"], e["message"].get("queue_id"))
        for e in events
        if e["type"] == "message" and e["message"]["role"] == "user"
    ]


async def test_queued_prompts_run_once_in_order(make_service: MakeService, redis: Any) -> None:
    service = await make_service(tokens=40, delay_ms=5, chat_prompt_policy="queue")
    await service.open(T, USER, None, None)
    await service.prompt(T, USER, "running", None)
    for content in ("one", "two", "three"):
        assert await service.prompt(T, USER, content, f"c-{content}") is None
    waiting = await service.queue.waiting(T)
    assert [q.content for q in waiting] == ["one", "two", "three"]
    # A repeat of a queued prompt's client_msg_id: the original queued event, nothing new.
    repeat = await service.prompt(T, USER, "two", "c-two")
    assert repeat is not None and orjson.loads(repeat)["queue_id"] == waiting[1].queue_id
    await turns_done(redis, 4)
    events = await log(redis)
    assert prompts(events) == [("running", None)] + [
        (q.content, q.queue_id) for q in waiting
    ]  # fmt: skip
    assert [e["queue_id"] for e in events if e["type"] == "queued"] == [
        q.queue_id for q in waiting
    ]  # fmt: skip

    # The last turn leaves the reaper's index once its usage is settled, a
    # moment after its done.
    async def unindexed() -> bool:
        return await redis.zscore(keys.TURN_INDEX, T) is None

    await wait_until(unindexed, what="the thread to leave the turn index")


async def test_reject_refuses_and_interrupt_cancels(make_service: MakeService, redis: Any) -> None:
    service = await make_service(tokens=200, delay_ms=5)
    await service.open(T, USER, None, None)
    await service.prompt(T, USER, "running", None)
    with pytest.raises(ThreadBusy):
        await service.prompt(T, USER, "refused", None)
    await service.threads.set_prompt_policy(T, USER, "interrupt")
    await service.prompt(T, USER, "instead", None)
    await turns_done(redis, 2)
    events = await log(redis)
    assert [e["status"] for e in events if e["type"] == "done"] == ["cancelled", "complete"]
    assert [p[0] for p in prompts(events)] == ["running", "instead"]


async def test_cancel_full_and_who_may(make_service: MakeService, redis: Any) -> None:
    service = await make_service(
        tokens=200, delay_ms=5, chat_prompt_policy="queue", chat_max_queued=2, chat_auth="jwt",
        chat_auth_secret="x" * 40,
    )  # fmt: skip
    await service.open(T, USER, None, None)
    await service.threads.add_member(T, USER, BOB)
    await service.prompt(T, USER, "running", None)
    await service.prompt(T, BOB, "bob's", None)
    await service.prompt(T, USER, "alice's", None)
    with pytest.raises(QueueFull) as full:
        await service.prompt(T, BOB, "one too many", None)
    assert full.value.retryable is True
    bobs, alices = await service.queue.waiting(T)
    with pytest.raises(Forbidden):
        await service.cancel_queued(T, BOB, alices.queue_id)
    await service.cancel_queued(T, USER, bobs.queue_id)  # the owner may cancel any
    with pytest.raises(NotFound):
        await service.cancel_queued(T, USER, bobs.queue_id)
    await service.cancel(T, None)
    await turns_done(redis, 2)
    events = await log(redis)
    assert [e["queue_id"] for e in events if e["type"] == "unqueued"] == [bobs.queue_id]
    assert [p[0] for p in prompts(events)] == ["running", "alice's"]


async def test_a_new_prompt_does_not_overtake_waiting_ones(
    make_service: MakeService, redis: Any
) -> None:
    """Prompts wait in the queue of a free thread (its pod died before starting
    them): a new prompt queues behind them, and they start."""
    service = await make_service(tokens=5, delay_ms=1, chat_prompt_policy="queue")
    await service.open(T, USER, None, None)
    lease = await service.lock.acquire(T)  # a turn holds the thread...
    assert lease is not None
    await service.prompt(T, USER, "waited first", None)
    await service.lock.release(T, lease)  # ...and its pod died without starting the queue
    await service.prompt(T, USER, "came later", None)
    await turns_done(redis, 2)
    assert [p[0] for p in prompts(await log(redis))] == ["waited first", "came later"]


async def test_the_reaper_starts_what_waits_on_a_free_thread(
    make_service: MakeService, redis: Any
) -> None:
    service = await make_service(tokens=5, delay_ms=1, chat_prompt_policy="queue")
    await service.open(T, USER, None, None)
    lease = await service.lock.acquire(T)
    assert lease is not None
    await service.prompt(T, USER, "stranded", None)
    await redis.delete(keys.lock(T))  # the lease ran out; nobody started the queue
    assert await redis.zscore(keys.TURN_INDEX, T) is not None  # the reaper's hint
    await service.reaper("test").sweep()
    await turns_done(redis, 1)
    assert [p[0] for p in prompts(await log(redis))] == ["stranded"]


async def test_a_removed_members_prompts_never_run(make_service: MakeService, redis: Any) -> None:
    """A removal is final for every later commit: a prompt of theirs already
    past the membership check is refused by the queue and by the turn's
    commit themselves, and one waiting in the queue leaves it (``revoked``)
    when its turn comes."""
    service = await make_service(
        tokens=200, delay_ms=5, chat_prompt_policy="queue", chat_auth="jwt",
        chat_auth_secret="x" * 40,
    )  # fmt: skip
    await service.open(T, USER, None, None)
    await service.threads.add_member(T, USER, BOB)
    await service.prompt(T, USER, "running", None)
    await service.prompt(T, BOB, "bob waits", None)
    (waiting,) = await service.queue.waiting(T)
    await service.threads.remove_member(T, USER, BOB)
    in_flight = Message(
        id="", role="user", content="bob in flight", user_id=BOB, created_at=0, status="complete"
    )
    with pytest.raises(Forbidden):  # past _check_writer: ENQUEUE_PROMPT refuses
        await service._open(T, BOB, in_flight, "", None)
    await service.cancel(T, None)
    await turns_done(redis, 1)
    with pytest.raises(Forbidden):  # the thread is free: BEGIN_TURN refuses
        await service._open(T, BOB, in_flight, "", None)
    events = await log(redis)
    assert [(e["queue_id"], e["reason"]) for e in events if e["type"] == "unqueued"] == [
        (waiting.queue_id, "revoked")
    ]  # fmt: skip
    assert [p[0] for p in prompts(events)] == ["running"]
    assert not await redis.exists(keys.lock(T), keys.queue(T))
