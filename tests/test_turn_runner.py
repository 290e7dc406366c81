"""Assistant turns (app.chat.runner): streaming, coalescing, and every way a turn ends."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from app.chat import keys
from app.chat import runner as runner_module
from app.chat.fanout import FanoutHub
from app.chat.keys import ThreadId
from app.chat.lock import TurnLock
from app.chat.records import Loading, Message
from app.chat.runner import TurnContext, TurnManager, TurnRunner, TurnSetup
from app.chat.scripts import Scripts
from app.chat.turns import Begun, TurnStore
from app.llm import LLMError, ToolCall, ToolSpec, Usage
from app.llm.fake import FakeModel, expected_reply, reply_tokens
from tests.conftest import USER, wait_until

PROMPT = "tell me about durable chat"


class ScriptedModel:
    """Streams the given pieces (``delay_s`` apart), then raises ``fail`` if set."""

    def __init__(
        self, pieces: list[str], delay_s: float = 0.0, fail: Exception | None = None
    ) -> None:
        self._pieces = pieces
        self._delay_s = delay_s
        self._fail = fail

    @property
    def name(self) -> str:
        return "scripted"

    @property
    def provider(self) -> str:
        return "scripted"

    async def stream(
        self, messages: Sequence[Message], usage: Usage, tools: Sequence[ToolSpec] = ()
    ) -> AsyncIterator[str | ToolCall]:
        for piece in self._pieces:
            await asyncio.sleep(self._delay_s)
            yield piece
        if self._fail is not None:
            raise self._fail

    async def aclose(self) -> None:
        return None


@pytest.fixture
async def hub(hub_factory: Any) -> FanoutHub:
    made: FanoutHub = await hub_factory(60)
    return made


async def begin_turn(
    store: TurnStore, lock: TurnLock, thread: ThreadId, generation_id: str, prompt: str = PROMPT
) -> TurnContext:
    lease = await lock.acquire(thread)
    assert lease is not None
    message = Message(
        id="", role="user", content=prompt, user_id=USER, created_at=1, status="complete"
    )
    begun = await store.begin(
        thread, lease, message,
        Loading(thread_id=thread, generation_id=generation_id, model="m"), "pod",
    )  # fmt: skip
    assert isinstance(begun, Begun)
    await store.index_add(thread)
    context = [dataclasses.replace(message, id=begun.message_id)]
    return TurnContext(thread, lease, generation_id, context)


async def run_to_end(manager: TurnManager, timeout: float = 10.0) -> None:
    await wait_until(lambda: manager.running == 0, timeout=timeout, what="the turn to end")


async def generation_events(redis: Any, thread: ThreadId, generation_id: str) -> list[dict]:
    entries = await redis.xrange(keys.events(thread), "-", "+")
    decoded = [orjson.loads(f["data"]) for _, f in entries]
    return [e for e in decoded if e.get("generation_id") == generation_id or e["type"] == "message"]


async def until_deltas(redis: Any, thread: ThreadId, generation_id: str, count: int) -> None:
    """Wait until the turn has published ``count`` deltas."""

    async def published() -> bool:
        events = await generation_events(redis, thread, generation_id)
        return sum(e["type"] == "delta" for e in events) >= count

    await wait_until(published, what=f"{count} delta(s)")


async def outcome(redis: Any, thread: ThreadId, generation_id: str) -> tuple[list[str], dict, dict]:
    """The turn's delta texts, its committed assistant message and its done event."""
    events = await generation_events(redis, thread, generation_id)
    texts = [e["text"] for e in events if e["type"] == "delta"]
    done = [e for e in events if e["type"] == "done"]
    assert len(done) == 1, events
    assert events[-1] == done[0]  # done is the last event of the turn
    message_id = done[0]["message_id"]
    [(_, fields)] = await redis.xrange(keys.history(thread), message_id, message_id)
    return texts, fields, done[0]


def manager_for(
    model: Any, store: TurnStore, lock: TurnLock, hub: FanoutHub, window_ms: float, max_bytes: int
) -> TurnManager:
    return TurnManager(TurnSetup(model, store, lock, window_ms, max_bytes), hub)


# --- complete turns ------------------------------------------------------------------------


async def test_a_complete_turn_streams_the_whole_reply(
    redis: Any, store: TurnStore, lock: TurnLock, hub: FanoutHub, thread: ThreadId
) -> None:
    model = FakeModel(tokens=30, delay_ms=1)
    manager = manager_for(model, store, lock, hub, window_ms=5, max_bytes=2048)
    manager.start(await begin_turn(store, lock, thread, "g"))
    assert manager.running == 1
    await run_to_end(manager)

    texts, message, done = await outcome(redis, thread, "g")
    reply = expected_reply(PROMPT, 30)
    assert "".join(texts) == message["content"] == reply
    assert message["role"] == "assistant" and message["status"] == "complete"
    assert done["status"] == "complete"
    assert done["usage"] == {"input_tokens": len(PROMPT.split()), "output_tokens": 30}
    # Deltas are numbered 0, 1, 2... in order.
    events = await generation_events(redis, thread, "g")
    assert [e["seq"] for e in events if e["type"] == "delta"] == list(range(len(texts)))
    # The thread is free and off the reaper's index.
    assert await store.record(thread) is None
    assert await redis.exists(keys.lock(thread)) == 0
    assert await store.index_threads() == []
    assert hub.followed_threads == 0  # the turn stopped following its thread


async def test_tokens_are_coalesced_within_the_window(
    redis: Any, store: TurnStore, lock: TurnLock, hub: FanoutHub, thread: ThreadId
) -> None:
    tokens = 100
    manager = manager_for(
        FakeModel(tokens=tokens, delay_ms=1), store, lock, hub, window_ms=50, max_bytes=100_000
    )
    manager.start(await begin_turn(store, lock, thread, "g"))
    await run_to_end(manager)
    texts, message, _ = await outcome(redis, thread, "g")
    assert "".join(texts) == message["content"] == expected_reply(PROMPT, tokens)
    assert 1 <= len(texts) <= tokens // 5


async def test_max_bytes_one_makes_every_token_a_delta(
    redis: Any, store: TurnStore, lock: TurnLock, hub: FanoutHub, thread: ThreadId
) -> None:
    manager = manager_for(
        FakeModel(tokens=25, delay_ms=0), store, lock, hub, window_ms=1000, max_bytes=1
    )
    manager.start(await begin_turn(store, lock, thread, "g"))
    await run_to_end(manager)
    texts, message, _ = await outcome(redis, thread, "g")
    assert texts == reply_tokens(PROMPT, 25)
    assert message["content"] == expected_reply(PROMPT, 25)


async def test_a_byte_budget_flushes_before_the_window(
    redis: Any, store: TurnStore, lock: TurnLock, hub: FanoutHub, thread: ThreadId
) -> None:
    pieces = ["abcd"] * 10
    manager = manager_for(ScriptedModel(pieces), store, lock, hub, window_ms=10_000, max_bytes=8)
    manager.start(await begin_turn(store, lock, thread, "g"))
    await run_to_end(manager)
    texts, message, _ = await outcome(redis, thread, "g")
    assert texts == ["abcdabcd"] * 5
    assert message["content"] == "abcd" * 10


async def test_window_zero_flushes_every_piece(
    redis: Any, store: TurnStore, lock: TurnLock, hub: FanoutHub, thread: ThreadId
) -> None:
    manager = manager_for(
        ScriptedModel(["a", "b", "c"]), store, lock, hub, window_ms=0, max_bytes=100_000
    )
    manager.start(await begin_turn(store, lock, thread, "g"))
    await run_to_end(manager)
    texts, _, _ = await outcome(redis, thread, "g")
    assert texts == ["a", "b", "c"]


async def test_an_empty_reply_still_ends_with_done(
    redis: Any, store: TurnStore, lock: TurnLock, hub: FanoutHub, thread: ThreadId
) -> None:
    manager = manager_for(ScriptedModel([]), store, lock, hub, window_ms=5, max_bytes=10)
    manager.start(await begin_turn(store, lock, thread, "g"))
    await run_to_end(manager)
    texts, message, done = await outcome(redis, thread, "g")
    assert texts == [] and message["content"] == "" and done["status"] == "complete"


# --- turns that end early ------------------------------------------------------------------------


async def test_cancel_ends_the_turn_with_partial_content(
    redis: Any, store: TurnStore, lock: TurnLock, hub: FanoutHub, thread: ThreadId
) -> None:
    model = FakeModel(tokens=400, delay_ms=5)
    manager = manager_for(model, store, lock, hub, window_ms=5, max_bytes=2048)
    manager.start(await begin_turn(store, lock, thread, "g"))

    await until_deltas(redis, thread, "g", 2)
    assert await store.request_cancel(thread, "g") == "g"
    await run_to_end(manager, timeout=5)
    texts, message, done = await outcome(redis, thread, "g")
    full = expected_reply(PROMPT, 400)
    assert done["status"] == "cancelled" and message["status"] == "cancelled"
    assert "".join(texts) == message["content"]
    assert message["content"] and full.startswith(message["content"])
    assert len(message["content"]) < len(full)


async def test_cancel_through_the_durable_flag_alone(
    redis: Any, store: TurnStore, lock: TurnLock, thread: ThreadId
) -> None:
    """Without the hub's control frame, the turn still sees the cancel flag
    (returned by its next delta write) and stops."""
    ctx = await begin_turn(store, lock, thread, "g")
    runner = TurnRunner(ctx, TurnSetup(FakeModel(tokens=400, delay_ms=5), store, lock, 5, 2048))
    task = asyncio.create_task(runner.run())
    await until_deltas(redis, thread, "g", 1)
    await store.request_cancel(thread, "g")
    # Within a few windows: well before the lease renewal (every 1.7 s) reads the flag.
    await asyncio.wait_for(task, 1.0)
    assert runner.status == "cancelled"
    texts, message, done = await outcome(redis, thread, "g")
    assert done["status"] == "cancelled"
    assert "".join(texts) == message["content"]
    assert len(message["content"]) < len(expected_reply(PROMPT, 400))


async def test_a_cancel_for_another_generation_is_ignored(
    redis: Any, store: TurnStore, lock: TurnLock, thread: ThreadId
) -> None:
    ctx = await begin_turn(store, lock, thread, "g")
    runner = TurnRunner(ctx, TurnSetup(FakeModel(tokens=5, delay_ms=1), store, lock, 5, 2048))
    runner.control({"control": "cancel", "generation_id": "someone-else"})
    runner.control({"control": "reset"})
    await asyncio.wait_for(runner.run(), 5)
    assert runner.status == "complete"
    _, message, _ = await outcome(redis, thread, "g")
    assert message["content"] == expected_reply(PROMPT, 5)


async def test_a_model_error_keeps_the_partial_text(
    redis: Any, store: TurnStore, lock: TurnLock, hub: FanoutHub, thread: ThreadId
) -> None:
    model = ScriptedModel(
        ["It ", "was ", "going "], fail=LLMError("The model is overloaded.", retryable=True)
    )
    manager = manager_for(model, store, lock, hub, window_ms=5, max_bytes=4)
    manager.start(await begin_turn(store, lock, thread, "g"))
    await run_to_end(manager)
    texts, message, done = await outcome(redis, thread, "g")
    assert done["status"] == "error" and message["status"] == "error"
    # Every client learns why, from the turn's own end.
    assert done["error"] == {
        "code": "llm_error",
        "message": "The model is overloaded.",
        "retryable": True,
    }
    assert "".join(texts) == message["content"] == "It was going "
    assert await redis.exists(keys.lock(thread)) == 0


async def test_an_unexpected_model_failure_is_an_error_too(
    redis: Any, store: TurnStore, lock: TurnLock, hub: FanoutHub, thread: ThreadId
) -> None:
    model = ScriptedModel(["partial"], fail=RuntimeError("bug in a provider"))
    manager = manager_for(model, store, lock, hub, window_ms=5, max_bytes=2048)
    manager.start(await begin_turn(store, lock, thread, "g"))
    await run_to_end(manager)
    _, message, done = await outcome(redis, thread, "g")
    assert done["status"] == "error" and message["content"] == "partial"
    assert done["error"]["code"] == "llm_error" and "bug" not in done["error"]["message"]


async def test_drain_with_no_grace_interrupts_and_commits_the_partial_text(
    redis: Any, store: TurnStore, lock: TurnLock, hub: FanoutHub, thread: ThreadId
) -> None:
    manager = manager_for(
        FakeModel(tokens=1000, delay_ms=5), store, lock, hub, window_ms=5, max_bytes=2048
    )
    manager.start(await begin_turn(store, lock, thread, "g"))

    await until_deltas(redis, thread, "g", 1)
    await asyncio.wait_for(manager.drain(0), 5)
    assert manager.running == 0
    texts, message, done = await outcome(redis, thread, "g")
    assert done["status"] == "interrupted" and message["status"] == "interrupted"
    assert "".join(texts) == message["content"] != ""
    assert expected_reply(PROMPT, 1000).startswith(message["content"])
    assert await store.record(thread) is None


async def test_drain_lets_a_fast_turn_finish(
    redis: Any, store: TurnStore, lock: TurnLock, hub: FanoutHub, thread: ThreadId
) -> None:
    manager = manager_for(FakeModel(tokens=10, delay_ms=1), store, lock, hub, 5, 2048)
    manager.start(await begin_turn(store, lock, thread, "g"))
    await asyncio.wait_for(manager.drain(5), 6)
    _, message, done = await outcome(redis, thread, "g")
    assert done["status"] == "complete"
    assert message["content"] == expected_reply(PROMPT, 10)


async def test_drain_without_turns_returns_at_once(
    store: TurnStore, lock: TurnLock, hub: FanoutHub
) -> None:
    manager = manager_for(FakeModel(tokens=1, delay_ms=0), store, lock, hub, 5, 2048)
    draining = manager.drain(10)
    # At once: the coroutine finishes on its first step, never suspending
    # to wait out any of its 10 s of grace.
    with pytest.raises(StopIteration):
        draining.send(None)


async def test_a_turn_that_lost_its_lock_stops_writing(
    redis: Any, store: TurnStore, lock: TurnLock, hub: FanoutHub, thread: ThreadId
) -> None:
    manager = manager_for(
        FakeModel(tokens=1000, delay_ms=2), store, lock, hub, window_ms=5, max_bytes=2048
    )
    manager.start(await begin_turn(store, lock, thread, "g"))

    await until_deltas(redis, thread, "g", 1)
    await redis.delete(keys.lock(thread))
    newer = await lock.acquire(thread)  # another pod (or the reaper) took over
    assert newer is not None
    n_at_takeover = int(await redis.hget(keys.meta(thread), "event_n"))
    await run_to_end(manager, timeout=5)
    # Not one more event, and the new owner's lock untouched.
    assert int(await redis.hget(keys.meta(thread), "event_n")) == n_at_takeover
    events = await generation_events(redis, thread, "g")
    assert not any(e["type"] == "done" for e in events)
    assert await redis.get(keys.lock(thread)) == newer.token


async def test_the_lease_is_renewed_during_a_long_turn(
    redis: Any, scripts: Scripts, store: TurnStore, hub: FanoutHub, thread: ThreadId
) -> None:
    short = TurnLock(scripts, ttl_ms=300)
    manager = manager_for(
        FakeModel(tokens=90, delay_ms=10), store, short, hub, window_ms=20, max_bytes=2048
    )
    ctx = await begin_turn(store, short, thread, "g")
    manager.start(ctx)
    # Renewed again and again, well past the first lease: the lease's time
    # to live goes back up three times, and the lock is still this turn's.
    ttls = [await redis.pttl(keys.lock(thread))]

    async def renewed_thrice() -> bool:
        ttls.append(await redis.pttl(keys.lock(thread)))
        assert ttls[-1] > 0, "the lease ran out"
        return sum(b > a for a, b in itertools.pairwise(ttls)) >= 3

    await wait_until(renewed_thrice, what="three renewals")
    assert manager.running == 1
    assert await redis.get(keys.lock(thread)) == ctx.lease.token
    await run_to_end(manager)
    _, message, done = await outcome(redis, thread, "g")
    assert done["status"] == "complete"
    assert message["content"] == expected_reply(PROMPT, 90)


class LostReplyStore(TurnStore):
    """A TurnStore whose first delta write lands in Redis but whose reply is
    lost on the way back (the connection dropped after the command ran)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lost = 0

    async def append_deltas(self, thread: ThreadId, lease: Any, deltas: Any) -> bool:
        cancel = await super().append_deltas(thread, lease, deltas)
        if self.lost == 0:
            self.lost += 1
            raise RedisConnectionError("connection lost before the reply")
        return cancel


async def test_a_lost_delta_reply_loses_no_text_from_the_timeline(
    redis: Any, scripts: Scripts, lock: TurnLock, thread: ThreadId
) -> None:
    store = LostReplyStore(redis, scripts, "PUBLISH", retention=10000, dedup_ttl_s=3600)
    ctx = await begin_turn(store, lock, thread, "g")
    model = ScriptedModel(["a", "b", "c", "d"], delay_s=0.01)
    runner = TurnRunner(ctx, TurnSetup(model, store, lock, window_ms=0, max_bytes=100_000))
    await asyncio.wait_for(runner.run(), 5)
    assert store.lost == 1
    texts, message, done = await outcome(redis, thread, "g")
    assert done["status"] == "complete"
    assert message["content"] == "abcd"
    # Live viewers (and the reaper, should the pod die) rebuild the reply from
    # the deltas: they must add up to the committed message.
    assert "".join(texts) == message["content"]


class RefusedOnceStore(TurnStore):
    """A TurnStore whose first delta write never reaches Redis."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refused = 0

    async def append_deltas(self, thread: ThreadId, lease: Any, deltas: Any) -> bool:
        if self.refused == 0:
            self.refused += 1
            raise RedisConnectionError("connection refused")
        return await super().append_deltas(thread, lease, deltas)


async def test_a_refused_delta_is_sent_again_and_nothing_is_lost(
    redis: Any, scripts: Scripts, lock: TurnLock, thread: ThreadId
) -> None:
    store = RefusedOnceStore(redis, scripts, "PUBLISH", retention=10000, dedup_ttl_s=3600)
    ctx = await begin_turn(store, lock, thread, "g")
    model = ScriptedModel(["a", "b", "c", "d"], delay_s=0.01)
    runner = TurnRunner(ctx, TurnSetup(model, store, lock, window_ms=0, max_bytes=100_000))
    await asyncio.wait_for(runner.run(), 5)
    assert store.refused == 1
    texts, message, _ = await outcome(redis, thread, "g")
    assert "".join(texts) == message["content"] == "abcd"
    # Each seq was written once, in order.
    events = await generation_events(redis, thread, "g")
    seqs = [e["seq"] for e in events if e["type"] == "delta"]
    assert seqs == list(range(len(seqs)))


class SilentStore(TurnStore):
    """A TurnStore whose turn writes never answer: a Redis that took the
    connection and then said nothing (no error to retry on)."""

    async def append_deltas(self, thread: ThreadId, lease: Any, deltas: Any) -> bool:
        await asyncio.Event().wait()
        return False

    async def end(self, *args: Any, **kwargs: Any) -> str | None:
        await asyncio.Event().wait()
        return None


async def test_final_writes_give_up_within_write_retry_s_even_when_redis_is_silent(
    redis: Any, scripts: Scripts, lock: TurnLock, thread: ThreadId, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WRITE_RETRY_S bounds the final writes in all, the attempt in flight
    included; the turn is then left to the reaper, untouched."""
    monkeypatch.setattr(runner_module, "WRITE_RETRY_S", 0.2)
    store = SilentStore(redis, scripts, "PUBLISH", retention=10000, dedup_ttl_s=3600)
    ctx = await begin_turn(store, lock, thread, "g")
    # One long window: the whole reply is still buffered when the model ends.
    setup = TurnSetup(ScriptedModel(["a", "b"]), store, lock, window_ms=60_000, max_bytes=10**6)
    await asyncio.wait_for(TurnRunner(ctx, setup).run(), 5)
    record = await store.record(thread)
    assert record is not None and record.generation_id == "g"  # for the reaper to close
    events = await generation_events(redis, thread, "g")
    assert [e["type"] for e in events] == ["message", "loading"]  # no delta, no done


class _DeafLock(TurnLock):
    """A lock whose renewals never get an answer (a blackholed Redis) and
    that loses the first cancel that reaches one, as asyncio.wait_for can on
    Python 3.11 (app.chat.tasks)."""

    swallowed = False

    async def renew(self, thread: ThreadId, lease: Any) -> bool:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if self.swallowed:
                raise
            self.swallowed = True
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        return True


async def test_a_turn_ends_even_when_its_renewer_loses_a_cancel(
    redis: Any, store: TurnStore, scripts: Scripts, hub: FanoutHub, thread: ThreadId
) -> None:
    lock = _DeafLock(scripts, ttl_ms=300)  # renewing from 0.1 s on, never answered
    manager = manager_for(FakeModel(tokens=5, delay_ms=60), store, lock, hub, 5, 2048)
    manager.start(await begin_turn(store, lock, thread, "g"))
    await run_to_end(manager, timeout=5)  # it waited on its renewer for ever
    assert lock.swallowed
    _, message, done = await outcome(redis, thread, "g")
    assert done["status"] == "complete" and message["content"] == expected_reply(PROMPT, 5)


class CountingStore(TurnStore):
    """A TurnStore that records its turn-write calls and how many deltas each carried."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, int]] = []

    async def append_deltas(self, thread: ThreadId, lease: Any, deltas: Any) -> bool:
        self.calls.append(("append", len(deltas)))
        return await super().append_deltas(thread, lease, deltas)

    async def end(self, *args: Any, **kwargs: Any) -> str | None:
        deltas = args[4] if len(args) > 4 else kwargs.get("deltas", ())
        self.calls.append(("end", len(deltas)))
        return await super().end(*args, **kwargs)


def coalesced(pieces: list[str], max_bytes: int) -> list[str]:
    """The deltas of pieces taken one at a time: cut once the buffer reaches max_bytes."""
    out: list[str] = []
    buffer = ""
    for piece in pieces:
        buffer += piece
        if len(buffer) >= max_bytes:
            out.append(buffer)
            buffer = ""
    return out + ([buffer] if buffer else [])


async def test_a_model_ahead_of_redis_costs_one_call_for_what_it_had_ready(
    redis: Any, scripts: Scripts, lock: TurnLock, thread: ThreadId
) -> None:
    """A model faster than the round trip (here, all at once) has its deltas
    cut exactly as one piece at a time would, and what is ready when the
    turn ends goes with the end: one call, each delta its own event."""
    store = CountingStore(redis, scripts, "PUBLISH", retention=10000, dedup_ttl_s=3600)
    ctx = await begin_turn(store, lock, thread, "g")
    model = FakeModel(tokens=120, delay_ms=0)
    runner = TurnRunner(ctx, TurnSetup(model, store, lock, window_ms=25, max_bytes=64))
    await asyncio.wait_for(runner.run(), 5)
    texts, message, done = await outcome(redis, thread, "g")
    expected = coalesced(reply_tokens(PROMPT, 120), 64)
    assert len(expected) > 5
    assert texts == expected
    assert message["content"] == "".join(expected) == expected_reply(PROMPT, 120)
    assert done["status"] == "complete"
    assert store.calls == [("end", len(expected))]
    seqs = [e["seq"] for e in await generation_events(redis, thread, "g") if e["type"] == "delta"]
    assert seqs == list(range(len(expected)))
