"""Token usage: per user per UTC day, the daily budget, and moving charges.

A turn's tokens are counted twice: into its thread's totals (``input_tokens``
and ``output_tokens`` in ``chat:{T}:meta``) by the turn's final commit, and
into its user's day (``chat:user:{U}:usage:<day>``). On a Redis Cluster the
user's keys live on another slot than the thread's, so no one script can
write both. The final commit therefore also writes the charge into the
thread's usage outbox (``chat:{T}:usage``), atomically with the reply; then
``settle`` moves each charge to its user's day with APPLY_USAGE, which is
idempotent (it marks the generation in the day's hash), and removes it from
the outbox. A pod that dies between the two leaves the thread in the turn
index (it is removed only after settling), so the reaper settles it: no
charge is lost, none is counted twice.

The budget (CHAT_USER_TOKENS_PER_DAY) is checked before a turn starts, by
RESERVE_BUDGET on the user's slot: one atomic step for every pod, which also
holds room for the turn while it runs, so concurrent prompts cannot all pass
on the same remaining room.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from app.chat import keys
from app.chat.errors import BudgetExceeded
from app.chat.keys import ThreadId, UserId
from app.chat.redis_types import RedisClient
from app.chat.redis_types import fields as hash_of
from app.chat.scripts import Scripts

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
# A user's day is kept a while after it ends (GET /v1/usage shows today only;
# operators may look back).
DAY_TTL_S = 8 * 86_400
# Room held by a running turn expires by itself this long after it was taken,
# if the turn's pod died without the reaper settling it (a backstop).
RESERVATION_MS = 15 * 60_000


def utc_day(now_ms: int | None = None) -> int:
    """Days since 1970-01-01 UTC: the number in a day's key."""
    return (int(time.time() * 1000) if now_ms is None else now_ms) // DAY_MS


def until_next_day_ms(now_ms: int | None = None) -> int:
    now = int(time.time() * 1000) if now_ms is None else now_ms
    return DAY_MS - now % DAY_MS


def _spent(limit: int) -> BudgetExceeded:
    return BudgetExceeded(
        f"you used today's budget of {limit} tokens; it resets at 00:00 UTC",
        retry_after_ms=until_next_day_ms(),
    )


@dataclass(frozen=True, slots=True)
class DayUsage:
    """A user's tokens of one UTC day, and their limit (0: none)."""

    day: int
    input_tokens: int
    output_tokens: int
    turns: int
    limit: int

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens


class UsageStore:
    """Per-user daily counters, the budget check, and settling thread outboxes."""

    def __init__(self, redis: RedisClient, scripts: Scripts, tokens_per_day: int) -> None:
        self._redis = redis
        self._scripts = scripts
        self.limit = tokens_per_day

    async def reserve(self, user: UserId, generation_id: str, tokens: int) -> None:
        """Admit one more turn of ``user`` and hold ``tokens`` of room for it,
        or raise BudgetExceeded. Nothing to do without a limit."""
        if not self.limit:
            return
        allowed, busy = await self._scripts.reserve_budget(
            keys=[keys.user_usage(user, utc_day()), keys.user_inflight(user)],
            args=[self.limit, generation_id, tokens, RESERVATION_MS],
        )
        if allowed:
            return
        if busy:
            raise BudgetExceeded(
                "your replies still running may use the rest of today's token budget; "
                "try again when they end",
                retry_after_ms=2000,
            )
        raise _spent(self.limit)

    async def check(self, user: UserId) -> None:
        """BudgetExceeded when ``user`` already spent today's budget (a quick
        read, holding nothing: for prompts that may only wait in a queue)."""
        if self.limit and (await self.today(user)).total >= self.limit:
            raise _spent(self.limit)

    async def release(self, user: UserId, generation_id: str) -> None:
        """Give back the room of a turn that did not start."""
        if self.limit:
            await self._redis.hdel(keys.user_inflight(user), generation_id)

    async def settle(self, thread: ThreadId, pending: dict[str, str] | None = None) -> int:
        """Move the thread's pending charges (read here unless given: a turn's
        end has them) to their users' days; how many."""
        outbox = keys.usage_outbox(thread)
        if pending is None:
            pending = hash_of(await self._redis.hgetall(outbox))
        for generation_id, charge in pending.items():
            try:
                user_raw, day, input_tokens, output_tokens = charge.split(" ")
                user = keys.user_id(user_raw)
            except (ValueError, keys.InvalidId):
                log.warning("dropping a malformed usage charge of %s: %r", thread, charge)
                await self._redis.hdel(outbox, generation_id)
                continue
            await self._scripts.apply_usage(
                keys=[keys.user_usage(user, int(day)), keys.user_inflight(user)],
                args=[generation_id, input_tokens, output_tokens, DAY_TTL_S],
            )
            await self._redis.hdel(outbox, generation_id)
        return len(pending)

    async def today(self, user: UserId) -> DayUsage:
        day = utc_day()
        counts = await self._redis.hmget(
            keys.user_usage(user, day), "input_tokens", "output_tokens", "turns"
        )
        values = [int(v or 0) for v in counts]
        return DayUsage(day, values[0], values[1], values[2], self.limit)
