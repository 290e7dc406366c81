"""app.chat.usage on fakeredis: the daily budget, and charges moved exactly once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.chat import keys
from app.chat.errors import BudgetExceeded
from app.chat.scripts import Scripts
from app.chat.usage import DAY_MS, UsageStore, until_next_day_ms, utc_day
from tests.conftest import USER

T = keys.thread_id("t-usage")


def store(redis: Any, scripts: Scripts, limit: int = 1000) -> UsageStore:
    return UsageStore(redis, scripts, limit)


async def charge(redis: Any, generation_id: str, input_tokens: int, output_tokens: int) -> None:
    """What END_TURN leaves in the thread's outbox."""
    await redis.hset(
        keys.usage_outbox(T), generation_id,
        f"{USER} {utc_day()} {input_tokens} {output_tokens}",
    )  # fmt: skip


async def test_settle_moves_each_charge_to_the_users_day_once(redis: Any, scripts: Scripts) -> None:
    usage = store(redis, scripts)
    await charge(redis, "g1", 10, 5)
    await charge(redis, "g2", 1, 2)
    assert await usage.settle(T) == 2
    assert await redis.exists(keys.usage_outbox(T)) == 0
    # A pod that died after applying but before clearing the outbox: the
    # reaper settles again, and nothing is counted twice.
    await charge(redis, "g1", 10, 5)
    assert await usage.settle(T) == 1
    today = await usage.today(USER)
    assert (today.input_tokens, today.output_tokens, today.turns) == (11, 7, 2)
    assert today.total == 18 and today.limit == 1000
    assert await redis.ttl(keys.user_usage(USER, utc_day())) > 86_400


async def test_a_malformed_charge_is_dropped(redis: Any, scripts: Scripts) -> None:
    await redis.hset(keys.usage_outbox(T), "g", "not a charge")
    await store(redis, scripts).settle(T)
    assert await redis.exists(keys.usage_outbox(T)) == 0


async def test_over_the_limit_waits_for_the_next_utc_day(redis: Any, scripts: Scripts) -> None:
    usage = store(redis, scripts, limit=100)
    await charge(redis, "g1", 60, 40)
    await usage.settle(T)
    with pytest.raises(BudgetExceeded) as refused:
        await usage.reserve(USER, "g2", 10)
    assert refused.value.retryable is True
    assert refused.value.code == "budget_exceeded"
    assert refused.value.retry_after_ms is not None
    assert 0 < refused.value.retry_after_ms <= until_next_day_ms() + 1000


async def test_running_turns_hold_room(redis: Any, scripts: Scripts) -> None:
    usage = store(redis, scripts, limit=100)
    await usage.reserve(USER, "a", 60)
    # Under the limit, but the first turn may use what is left.
    with pytest.raises(BudgetExceeded) as refused:
        await usage.reserve(USER, "b", 60)
    assert refused.value.retry_after_ms == 2000
    await usage.reserve(USER, "c", 30)  # fits beside the first
    await usage.release(USER, "c")
    # The first turn ends: its charge replaces its reservation.
    await charge(redis, "a", 5, 5)
    await usage.settle(T)
    assert await redis.hkeys(keys.user_inflight(USER)) == []
    await usage.reserve(USER, "b", 60)


async def test_only_one_concurrent_turn_is_admitted_when_room_is_short(
    redis: Any, scripts: Scripts
) -> None:
    usage = store(redis, scripts, limit=100)

    async def attempt(i: int) -> bool:
        try:
            await usage.reserve(USER, f"g{i}", 500)
        except BudgetExceeded:
            return False
        return True

    admitted = await asyncio.gather(*(attempt(i) for i in range(20)))
    assert sum(admitted) == 1


async def test_no_limit_reserves_nothing(redis: Any, scripts: Scripts) -> None:
    usage = store(redis, scripts, limit=0)
    for i in range(3):
        await usage.reserve(USER, f"g{i}", 10**9)
    assert await redis.exists(keys.user_inflight(USER)) == 0
    assert (await usage.today(USER)).limit == 0


async def test_an_expired_reservation_stops_counting(redis: Any, scripts: Scripts) -> None:
    usage = store(redis, scripts, limit=100)
    # A pod died holding room for a turn, long ago.
    await redis.hset(keys.user_inflight(USER), "dead", "1 90")
    await usage.reserve(USER, "new", 90)
    assert await redis.hkeys(keys.user_inflight(USER)) == ["new"]


def test_days_are_utc() -> None:
    assert utc_day(0) == 0 and utc_day(DAY_MS - 1) == 0 and utc_day(DAY_MS) == 1
    assert until_next_day_ms(DAY_MS + 5) == DAY_MS - 5
