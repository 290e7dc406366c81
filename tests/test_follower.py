"""One socket's subscription: the send-order rule and the bounded queue."""

from __future__ import annotations

import asyncio
import contextlib

from app.chat import keys
from app.chat.follower import (
    ACCESS_REVOKED,
    SERVER_DEAF,
    THREAD_DELETED,
    THREAD_RESET,
    TOO_SLOW,
    Follower,
)
from app.chat.timeline import TimelineEvent

T = keys.thread_id("f")


def event(entry_id: str, n: int = 1) -> TimelineEvent:
    return TimelineEvent(entry_id, keys.event_id(entry_id), n, f'{{"id":"{entry_id}"}}')


def test_claim_sends_only_events_after_the_last_sent() -> None:
    follower = Follower(T, max_queue=8)
    assert follower.claim(event("5-0")) is True
    assert follower.sent == (5, 0)
    assert follower.claim(event("5-0")) is False  # the same again: overlap
    assert follower.claim(event("4-9")) is False  # older
    assert follower.claim(event("5-1")) is True
    assert follower.claim(event("10-0")) is True
    assert follower.claim(event("9-99")) is False
    assert follower.sent == (10, 0)


def test_claim_compares_ids_numerically() -> None:
    follower = Follower(T, max_queue=8)
    assert follower.claim(event("9-0"))
    assert follower.claim(event("10-0"))  # "10-0" < "9-0" as text, not as an id
    assert not follower.claim(event("9-5"))


def test_restart_from_refilters() -> None:
    follower = Follower(T, max_queue=8)
    follower.restart_from((7, 0))
    assert not follower.claim(event("7-0"))
    assert not follower.claim(event("6-3"))
    assert follower.claim(event("7-1"))
    follower.restart_from((3, 0))  # a resume from an older point sends again
    assert follower.claim(event("4-0"))
    follower.restart_from(None)
    assert follower.claim(event("1-0"))


async def test_deliver_queues_in_order() -> None:
    follower = Follower(T, max_queue=8)
    for i in range(3):
        follower.deliver(event(f"{i + 1}-0", i + 1))
    assert [(await follower.next_event()).n for _ in range(3)] == [1, 2, 3]
    assert follower.closing is None and not follower.must_close.done()


async def test_overflow_closes_the_follower() -> None:
    follower = Follower(T, max_queue=8)
    for i in range(8):
        follower.deliver(event(f"{i + 1}-0", i + 1))
    assert follower.closing is None
    follower.deliver(event("9-0", 9))
    assert follower.closing == TOO_SLOW
    assert follower.must_close.done()
    assert follower.queued == 8
    # Once closing, nothing more is queued even when there is room.
    await follower.next_event()
    follower.deliver(event("10-0", 10))
    assert follower.queued == 7


async def test_reset_control_closes_and_cancel_does_not() -> None:
    follower = Follower(T, max_queue=8)
    follower.control({"control": "cancel", "generation_id": "g"})
    assert follower.closing is None
    follower.control({"control": "reset"})
    assert follower.closing == THREAD_RESET and follower.must_close.done()


async def test_a_deaf_pod_moves_its_followers() -> None:
    follower = Follower(T, max_queue=8)
    follower.control({"control": "move"})
    assert follower.closing == SERVER_DEAF and follower.must_close.done()


def test_first_close_reason_wins() -> None:
    follower = Follower(T, max_queue=8)
    follower.close_for("first")
    follower.close_for("second")
    assert follower.closing == "first"


async def test_deleted_thread_closes_the_follower() -> None:
    follower = Follower(T, max_queue=8, user="alice")
    follower.control({"control": "deleted"})
    assert follower.closing == THREAD_DELETED and follower.must_close.done()


async def test_revoke_closes_only_the_removed_users_follower() -> None:
    alice = Follower(T, max_queue=8, user="alice")
    bob = Follower(T, max_queue=8, user="bob")
    for follower in (alice, bob):
        follower.control({"control": "revoke", "user_id": "bob"})
    assert alice.closing is None and not alice.must_close.done()
    assert bob.closing == ACCESS_REVOKED and bob.must_close.done()


async def test_next_event_waits_for_a_delivery() -> None:
    follower = Follower(T, max_queue=8)
    waiting = asyncio.ensure_future(follower.next_event())
    await asyncio.sleep(0)
    assert not waiting.done()
    follower.deliver(event("1-0", 1))
    assert (await asyncio.wait_for(waiting, 1)).n == 1
    assert follower.queued == 0


async def test_a_cancelled_wait_loses_no_event() -> None:
    follower = Follower(T, max_queue=8)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(follower.next_event(), 0.01)
    follower.deliver(event("1-0", 1))
    assert (await follower.next_event()).n == 1


async def test_must_close_resolves_when_asked_for_before_or_after_the_close() -> None:
    early = Follower(T, max_queue=8)
    watched = early.must_close
    assert not watched.done()
    early.close_for(TOO_SLOW)
    assert watched.done()
    late = Follower(T, max_queue=8)
    late.close_for(TOO_SLOW)
    assert late.must_close.done()
