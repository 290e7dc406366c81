"""Abuse limits (app.chat.limits) on fakeredis: the prompt token bucket and the
socket counts, shared by two Limits objects standing for two pods."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from app.chat import keys
from app.chat import scripts as scripts_module
from app.chat.errors import Forbidden, PodFull, RateLimited
from app.chat.limits import Limits
from app.chat.scripts import Scripts
from app.settings import Settings
from tests.conftest import Clock, count_calls, wait_until

ALICE = keys.user_id("alice")
BOB = keys.user_id("bob")


@pytest.fixture
def pods(
    redis: Any, scripts: Scripts, make_settings: Callable[..., Settings]
) -> Callable[..., tuple[Limits, Limits]]:
    """Two pods' limits on one Redis, auth on (per-user limits apply)."""

    def make(**overrides: Any) -> tuple[Limits, Limits]:
        values: dict[str, Any] = {"chat_auth": "jwt", "chat_auth_secret": "s" * 32, **overrides}
        return (
            Limits(redis, scripts, make_settings(chat_pod_id="a", **values)),
            Limits(redis, scripts, make_settings(chat_pod_id="b", **values)),
        )

    return make


async def test_the_prompt_bucket_is_shared_by_pods(pods: Callable[..., Any]) -> None:
    a, b = pods(chat_rate_prompts_per_min=6, chat_rate_prompt_burst=3)
    await a.take_prompt(ALICE)
    await b.take_prompt(ALICE)
    await a.take_prompt(ALICE)
    with pytest.raises(RateLimited) as refused:
        await b.take_prompt(ALICE)
    # 6 a minute: one token every 10 s.
    assert refused.value.retryable and 9000 <= (refused.value.retry_after_ms or 0) <= 10000
    assert refused.value.code == "rate_limited"
    await b.take_prompt(BOB)  # another user has a bucket of their own


async def test_the_bucket_refills_with_time(
    pods: Callable[..., Any], redis: Any, clock: Clock
) -> None:
    a, _ = pods(chat_rate_prompts_per_min=600, chat_rate_prompt_burst=1)  # one per 100 ms
    await a.take_prompt(ALICE)
    with pytest.raises(RateLimited) as refused:
        await a.take_prompt(ALICE)
    assert 0 < (refused.value.retry_after_ms or 0) <= 100
    clock.advance(0.15)
    await a.take_prompt(ALICE)
    # An idle bucket expires: no key is left behind for long.
    assert 0 < await redis.pttl(keys.user_prompt_bucket(ALICE)) <= 1200


async def test_zero_means_no_prompt_limit(pods: Callable[..., Any], redis: Any) -> None:
    a, _ = pods(chat_rate_prompts_per_min=0)
    for _ in range(50):
        await a.take_prompt(ALICE)
    assert await redis.exists(keys.user_prompt_bucket(ALICE)) == 0


async def test_auth_off_applies_no_per_user_limit(
    redis: Any, scripts: Scripts, make_settings: Callable[..., Settings]
) -> None:
    limits = Limits(
        redis,
        scripts,
        make_settings(chat_rate_prompts_per_min=1, chat_max_sockets_per_user=1),
    )
    for _ in range(5):
        await limits.take_prompt(keys.user_id("anonymous"))
        await limits.claim_socket(keys.user_id("anonymous"))
    assert await redis.keys("*") == []


async def test_sockets_per_user_across_pods(pods: Callable[..., Any], redis: Any) -> None:
    a, b = pods(chat_max_sockets_per_user=3)
    held = [await a.claim_socket(ALICE), await b.claim_socket(ALICE), await a.claim_socket(ALICE)]
    with pytest.raises(RateLimited) as refused:
        await b.claim_socket(ALICE)
    assert refused.value.retry_after_ms is not None and refused.value.retry_after_ms >= 1000
    await b.claim_socket(BOB)
    assert b.local_sockets == 2  # the refused one is not counted locally either
    await a.release_socket(held[0])
    await b.claim_socket(ALICE)
    assert await redis.zcard(keys.user_sockets(ALICE)) == 3


async def test_no_socket_is_admitted_while_the_user_is_erased(
    pods: Callable[..., Any], redis: Any
) -> None:
    a, _ = pods()
    await redis.set(keys.user_erasing(ALICE), "1")
    with pytest.raises(Forbidden):
        await a.claim_socket(ALICE)
    assert a.local_sockets == 0 and not await redis.exists(keys.user_sockets(ALICE))
    await a.claim_socket(BOB)
    await redis.delete(keys.user_erasing(ALICE))
    await a.claim_socket(ALICE)


async def test_a_crashed_pods_sockets_stop_counting(
    pods: Callable[..., Any], redis: Any, clock: Clock
) -> None:
    a, b = pods(chat_max_sockets_per_user=1, chat_socket_lease_ms=1000)
    await a.claim_socket(ALICE)  # pod a then dies: no release, no renewal
    clock.advance(0.9)
    with pytest.raises(RateLimited):
        await b.claim_socket(ALICE)
    clock.advance(0.2)
    await b.claim_socket(ALICE)


async def test_renewed_leases_keep_live_sockets_counted(
    pods: Callable[..., Any], redis: Any, clock: Clock
) -> None:
    a, b = pods(chat_max_sockets_per_user=1, chat_socket_lease_ms=1000)
    await a.claim_socket(ALICE)
    for _ in range(3):
        clock.advance(0.9)
        await a.renew_leases()
    with pytest.raises(RateLimited):
        await b.claim_socket(ALICE)


async def test_many_users_leases_are_renewed_in_one_call(
    pods: Callable[..., Any], redis: Any, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one Redis a pod's renewals are one script call per RENEW_BATCH
    sockets, however many users they belong to (not one call per user)."""
    monkeypatch.setattr(scripts_module, "RENEW_BATCH", 5)
    a, b = pods(chat_max_sockets_per_user=2, chat_socket_lease_ms=1000)
    users = [keys.user_id(f"u{i}") for i in range(6)]
    for user in users:
        await a.claim_socket(user)
        await a.claim_socket(user)
    calls = count_calls(monkeypatch, a._scripts, "renew_sockets")
    for _ in range(3):
        clock.advance(0.9)
        await a.renew_leases()
    assert len(calls) == 3 * 2  # 12 sockets: 3 users (6) in a call, then the 3 others
    for user in users:  # every lease still counts
        with pytest.raises(RateLimited):
            await b.claim_socket(user)


async def test_the_pod_ceiling_is_local(pods: Callable[..., Any]) -> None:
    a, b = pods(chat_max_sockets_per_pod=2, chat_max_sockets_per_user=0)
    first = await a.claim_socket(ALICE)
    await a.claim_socket(BOB)
    with pytest.raises(PodFull) as refused:
        await a.claim_socket(keys.user_id("carol"))
    assert refused.value.code == "rate_limited" and refused.value.retryable
    await b.claim_socket(keys.user_id("carol"))  # another pod has room
    await a.release_socket(first)
    await a.claim_socket(keys.user_id("carol"))


async def test_the_heartbeat_task_starts_and_stops(pods: Callable[..., Any], redis: Any) -> None:
    a, _ = pods(chat_max_sockets_per_user=2, chat_socket_lease_ms=1000)  # renewed every 1/3 s
    await a.start()
    assert "socket-leases" in {t.get_name() for t in asyncio.all_tasks()}
    await a.claim_socket(ALICE)
    [(_, claimed)] = await redis.zrange(keys.user_sockets(ALICE), 0, -1, withscores=True)

    async def renewed() -> bool:
        [(_, expiry)] = await redis.zrange(keys.user_sockets(ALICE), 0, -1, withscores=True)
        return bool(expiry > claimed)

    await wait_until(renewed, what="the heartbeat to renew the lease")
    await a.stop()
    assert "socket-leases" not in {t.get_name() for t in asyncio.all_tasks()}
    await a.stop()  # idempotent
