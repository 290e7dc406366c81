"""A turn's records in Redis, through TurnStore: the fenced commit scripts
BEGIN_TURN, APPEND_DELTA, END_TURN, REQUEST_CANCEL and the reaper's reads."""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any

import orjson
import pytest

from app.chat import keys
from app.chat.errors import LockLost, NotFound
from app.chat.keys import ThreadId
from app.chat.lock import Lease, TurnLock
from app.chat.records import Delta, Done, Loading, Message, ToolCallEvent, ToolResultEvent, ToolUse
from app.chat.scripts import Scripts
from app.chat.threads import Threads
from app.chat.timeline import BATCH, frame_from_entry, parse_frame, parse_message
from app.chat.turns import Begun, Duplicate, Orphaned, Partial, TurnStore
from app.chat.usage import utc_day
from tests.conftest import USER, Listener, open_thread

POD = "pod-a"


def user_message(content: str = "hello", client_msg_id: str | None = None) -> Message:
    return Message(
        id="",
        role="user",
        content=content,
        user_id=USER,
        created_at=1_700_000_000_123,
        status="complete",
        client_msg_id=client_msg_id,
    )


def assistant_message(content: str, status: str = "complete") -> Message:
    return Message(
        id="",
        role="assistant",
        content=content,
        user_id="assistant",
        created_at=1_700_000_000_456,
        status=status,  # type: ignore[arg-type]
    )


def loading(thread: ThreadId, generation_id: str) -> Loading:
    return Loading(thread_id=thread, generation_id=generation_id, model="fake")


def delta(thread: ThreadId, generation_id: str, seq: int, text: str) -> Delta:
    return Delta(thread_id=thread, generation_id=generation_id, seq=seq, text=text)


def done(thread: ThreadId, generation_id: str, status: str = "complete") -> Done:
    return Done(thread_id=thread, generation_id=generation_id, status=status)  # type: ignore[arg-type]


async def begin(
    store: TurnStore,
    lock: TurnLock,
    thread: ThreadId,
    generation_id: str = "g1",
    content: str = "hello",
    client_msg_id: str | None = None,
) -> tuple[Lease, Begun]:
    lease = await lock.acquire(thread)
    assert lease is not None
    result = await store.begin(
        thread, lease, user_message(content, client_msg_id), loading(thread, generation_id), POD
    )
    assert isinstance(result, Begun), result
    return lease, result


async def events(redis: Any, thread: ThreadId) -> list[tuple[str, dict[str, Any]]]:
    """The stored timeline: (id, {n, event}) oldest first."""
    entries = await redis.xrange(keys.events(thread), "-", "+")
    return [(i, {"n": int(f["n"]), **orjson.loads(f["data"])}) for i, f in entries]


async def snapshot(redis: Any, thread: ThreadId) -> tuple[Any, ...]:
    """Everything a refused write must leave as it was."""
    return (
        await redis.xrange(keys.history(thread), "-", "+"),
        await redis.xrange(keys.events(thread), "-", "+"),
        await redis.hgetall(keys.meta(thread)),
        await redis.hgetall(keys.turn(thread)),
        await redis.hgetall(keys.dedup(thread)),
    )


# --- begin ------------------------------------------------------------------------


async def test_begin_commits_the_user_message(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    _, begun = await begin(store, lock, thread, content="what is durable?", client_msg_id="m1")

    history = await redis.xrange(keys.history(thread), "-", "+")
    assert len(history) == 1
    entry_id, fields = history[0]
    assert entry_id == begun.message_id
    assert fields == {
        "parent": "",  # the thread's first message: a root
        "role": "user",
        "content": "what is durable?",
        "user_id": USER,
        "status": "complete",
        "created_at": "1700000000123",
        "client_msg_id": "m1",
    }
    assert await redis.hget(keys.dedup(thread), "m1") == begun.message_id
    assert await redis.ttl(keys.dedup(thread)) > 0


async def test_begin_emits_message_then_loading(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    _, begun = await begin(store, lock, thread, generation_id="gen-1", content="hi")
    stored = await events(redis, thread)
    assert [e["type"] for _, e in stored] == ["message", "loading"]
    assert [e["n"] for _, e in stored] == [1, 2]
    (message_id, message_event), (loading_id, loading_event) = stored
    # One id for the message, its history entry and its event.
    assert message_id == begun.message_id == message_event["message"]["id"]
    assert loading_id == begun.loading_id
    assert message_event["thread_id"] == thread
    assert message_event["message"]["content"] == "hi"
    assert message_event["message"]["role"] == "user"
    assert loading_event == {
        "n": 2,
        "type": "loading",
        "thread_id": thread,
        "generation_id": "gen-1",
        "model": "fake",
    }
    meta = await redis.hgetall(keys.meta(thread))
    assert meta["event_n"] == "2" and meta["last_event_id"] == loading_id
    assert meta["message_count"] == "1"
    assert meta["updated_at"] == message_id.split("-")[0]


async def test_begin_writes_the_turn_record(
    store: TurnStore, lock: TurnLock, thread: ThreadId
) -> None:
    assert await store.record(thread) is None
    lease, begun = await begin(store, lock, thread, generation_id="gen-1")
    record = await store.record(thread)
    assert record is not None
    assert record.generation_id == "gen-1"
    assert record.fence == lease.fence
    assert record.pod == POD
    assert record.start_id == begun.loading_id
    assert record.user_message_id == begun.message_id
    assert record.cancel_requested is False


async def test_published_frames_equal_the_stored_events(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    async with Listener(redis, keys.live(thread)) as live:
        lease, _ = await begin(store, lock, thread, generation_id="g")
        await store.append_deltas(thread, lease, [delta(thread, "g", 0, 'quote " and \\ é \n')])
        await store.append_deltas(thread, lease, [delta(thread, "g", 1, "more")])
        await store.end(thread, lease, assistant_message("x"), done(thread, "g"))
        published = await live.drain()
    stored = await redis.xrange(keys.events(thread), "-", "+")
    rebuilt = [frame_from_entry(i, f).frame for i, f in stored]
    assert published == rebuilt
    assert len(published) == 6
    # Every frame is valid JSON carrying its own id and number.
    for frame, (entry_id, fields) in zip(published, stored, strict=True):
        decoded = orjson.loads(frame)
        assert decoded["id"] == entry_id and decoded["n"] == int(fields["n"])
        parsed = parse_frame(frame)
        assert parsed is not None and parsed.id == entry_id
    assert orjson.loads(published[2])["text"] == 'quote " and \\ é \n'


async def test_begin_with_seen_client_msg_id_is_a_duplicate(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    lease, begun = await begin(store, lock, thread, generation_id="g1", client_msg_id="same")
    await store.end(thread, lease, assistant_message("reply"), done(thread, "g1"))
    before = await snapshot(redis, thread)

    lease2 = await lock.acquire(thread)
    assert lease2 is not None
    result = await store.begin(
        thread, lease2, user_message("again", "same"), loading(thread, "g2"), POD
    )
    assert result == Duplicate(begun.message_id)
    assert await snapshot(redis, thread) == before


async def test_duplicate_wins_over_a_running_turn(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    """A resend while its own turn still runs is a duplicate, not an orphan."""
    _, begun = await begin(store, lock, thread, generation_id="g1", client_msg_id="same")
    await redis.delete(keys.lock(thread))
    lease2 = await lock.acquire(thread)
    assert lease2 is not None
    before = await snapshot(redis, thread)
    result = await store.begin(
        thread, lease2, user_message("x", "same"), loading(thread, "g2"), POD
    )
    assert result == Duplicate(begun.message_id)
    assert await snapshot(redis, thread) == before


async def test_begin_retried_for_the_same_generation_writes_nothing_twice(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    lease, begun = await begin(store, lock, thread, generation_id="g1")
    before = await snapshot(redis, thread)
    again = await store.begin(thread, lease, user_message(), loading(thread, "g1"), POD)
    assert again == begun
    assert await snapshot(redis, thread) == before


async def test_begin_while_another_generation_is_open_is_orphaned(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    await begin(store, lock, thread, generation_id="dead")
    await redis.delete(keys.lock(thread))  # the dead pod's lease ran out
    lease = await lock.acquire(thread)
    assert lease is not None
    before = await snapshot(redis, thread)
    result = await store.begin(thread, lease, user_message("new"), loading(thread, "g2"), POD)
    assert result == Orphaned()
    assert await snapshot(redis, thread) == before


async def test_begin_on_a_thread_that_does_not_exist(
    store: TurnStore, lock: TurnLock, redis: Any
) -> None:
    ghost = keys.thread_id("never-opened")
    lease = await lock.acquire(ghost)
    assert lease is not None
    with pytest.raises(NotFound):
        await store.begin(ghost, lease, user_message(), loading(ghost, "g"), POD)
    assert await redis.exists(keys.history(ghost), keys.events(ghost), keys.turn(ghost)) == 0


# --- fencing ------------------------------------------------------------------------


async def stale_and_current(lock: TurnLock, redis: Any, thread: ThreadId) -> tuple[Lease, Lease]:
    stale = await lock.acquire(thread)
    assert stale is not None
    await redis.delete(keys.lock(thread))
    current = await lock.acquire(thread)
    assert current is not None and current.fence > stale.fence
    return stale, current


async def test_stale_fence_cannot_begin(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    stale, _ = await stale_and_current(lock, redis, thread)
    before = await snapshot(redis, thread)
    async with Listener(redis, keys.live(thread)) as live:
        with pytest.raises(LockLost):
            await store.begin(thread, stale, user_message(), loading(thread, "g"), POD)
        assert await live.drain() == []
    assert await snapshot(redis, thread) == before


async def test_stale_fence_cannot_append_or_end(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    first, _ = await begin(store, lock, thread, generation_id="g1")
    await store.append_deltas(thread, first, [delta(thread, "g1", 0, "a")])
    await redis.delete(keys.lock(thread))
    newer = await lock.acquire(thread)
    assert newer is not None
    before = await snapshot(redis, thread)
    async with Listener(redis, keys.live(thread)) as live:
        with pytest.raises(LockLost):
            await store.append_deltas(thread, first, [delta(thread, "g1", 1, "b")])
        with pytest.raises(LockLost):
            await store.end(thread, first, assistant_message("ab"), done(thread, "g1"))
        assert await live.drain() == []
    assert await snapshot(redis, thread) == before
    # The newer grant's lock was not released by the stale end.
    assert await redis.get(keys.lock(thread)) == newer.token


async def test_lock_lost_is_a_chat_error_not_a_response_error(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    stale, _ = await stale_and_current(lock, redis, thread)
    with pytest.raises(LockLost) as info:
        await store.append_deltas(thread, stale, [delta(thread, "g", 0, "x")])
    assert "newer" in str(info.value)


# --- deltas ---------------------------------------------------------------------------


async def test_append_delta_emits_a_numbered_event(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    lease, _ = await begin(store, lock, thread, generation_id="g")
    assert await store.append_deltas(thread, lease, [delta(thread, "g", 0, "Hel")]) is False
    assert await store.append_deltas(thread, lease, [delta(thread, "g", 1, "lo")]) is False
    stored = await events(redis, thread)
    assert [(e["type"], e["n"]) for _, e in stored] == [
        ("message", 1),
        ("loading", 2),
        ("delta", 3),
        ("delta", 4),
    ]
    assert [e.get("text") for _, e in stored[2:]] == ["Hel", "lo"]
    assert [e.get("seq") for _, e in stored[2:]] == [0, 1]
    assert await redis.hget(keys.turn(thread), "seq") == "1"


async def test_deltas_ready_together_are_one_call_one_message_and_their_own_events(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    lease, _ = await begin(store, lock, thread, generation_id="g")
    async with Listener(redis, keys.live(thread)) as live:
        texts = ["one ", "two ", "three"]
        deltas = [delta(thread, "g", seq, text) for seq, text in enumerate(texts)]
        assert await store.append_deltas(thread, lease, deltas) is False
        frames = await live.drain()
        assert len(live.published) == 1 and live.published[0].startswith(BATCH)
    stored = await events(redis, thread)
    assert [(e["type"], e["n"], e.get("seq")) for _, e in stored[2:]] == [
        ("delta", 3, 0), ("delta", 4, 1), ("delta", 5, 2)
    ]  # fmt: skip
    assert frames == [frame_from_entry(i, f).frame for i, f in await redis.xrange(
        keys.events(thread), stored[2][0], "+")]  # fmt: skip
    assert [e.n for f in live.published for e in parse_message(f) if e] == [3, 4, 5]
    # A retry of the same batch, or of part of it, appends nothing again.
    before = await snapshot(redis, thread)
    assert await store.append_deltas(thread, lease, deltas[1:]) is False
    assert await snapshot(redis, thread) == before


async def test_end_publishes_the_last_deltas_then_the_message_and_done_as_one_message(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    lease, _ = await begin(store, lock, thread, generation_id="g")
    await store.append_deltas(thread, lease, [delta(thread, "g", 0, "a")])
    last = [delta(thread, "g", 1, "b"), delta(thread, "g", 2, "c")]
    async with Listener(redis, keys.live(thread)) as live:
        ended = await store.end(thread, lease, assistant_message("abc"), done(thread, "g"), last)
        assert ended is not None
        mid = ended.message_id
        frames = [orjson.loads(f) for f in await live.drain()]
        assert len(live.published) == 1
    assert [(f["type"], f.get("seq"), f["n"]) for f in frames] == [
        ("delta", 1, 4), ("delta", 2, 5), ("message", None, 6), ("done", None, 7)
    ]  # fmt: skip
    assert frames[2]["message"]["id"] == mid and frames[3]["message_id"] == mid
    # A retried end (its reply lost) writes nothing twice, deltas included.
    before = await snapshot(redis, thread)
    again = await store.end(thread, lease, assistant_message("abc"), done(thread, "g"), last)
    assert again is None
    assert await snapshot(redis, thread) == before


async def test_end_answers_what_the_pod_does_next(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    """END_TURN says whether prompts wait, whether the thread wants a title,
    and the usage charges to move, read in its own step."""
    lease, _ = await begin(store, lock, thread, generation_id="g1")
    first = await store.end(thread, lease, assistant_message("a"), done(thread, "g1"))
    assert first is not None and not first.queued and first.untitled
    assert first.charges == await redis.hgetall(keys.usage_outbox(thread)) != {}
    await redis.hset(keys.meta(thread), "title", "Named")
    lease, _ = await begin(store, lock, thread, generation_id="g2", content="again")
    await redis.xadd(keys.queue(thread), {"user_id": USER, "content": "waits"})
    second = await store.end(thread, lease, assistant_message("b"), done(thread, "g2"))
    assert second is not None and second.queued and not second.untitled
    assert set(second.charges) == {"g1", "g2"}  # g1's was not moved: both wait


async def test_begin_answers_the_context_start_and_the_members(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    """What a turn's start needs besides the commit, read in its step."""
    lease, first = await begin(store, lock, thread, generation_id="g1")
    assert first.context_start is None and first.members == (USER,)
    assert first.parent == "" and first.archived == ""
    ended = await store.end(thread, lease, assistant_message("a"), done(thread, "g1"))
    assert ended is not None
    await redis.set(keys.context_start(thread), first.message_id)
    await redis.sadd(keys.members(thread), "bob")
    lease, second = await begin(store, lock, thread, generation_id="g2", content="again")
    assert second.context_start == first.message_id
    assert sorted(second.members) == sorted([USER, "bob"])
    # What a cached context is checked against: the prompt follows the reply.
    assert second.parent == ended.message_id and second.version == first.version
    epoch = await redis.hget(keys.meta(thread), "epoch")
    assert second.version == f"{epoch}/0"
    # A retry of the same generation answers the same, but for the parent
    # (not known then: the pod reads the context rather than take its own).
    again = await store.begin(thread, lease, user_message("again"), loading(thread, "g2"), POD)
    assert again == dataclasses.replace(second, parent="")


async def test_append_delta_retry_of_a_seq_writes_nothing(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    lease, _ = await begin(store, lock, thread, generation_id="g")
    await store.append_deltas(thread, lease, [delta(thread, "g", 0, "a")])
    await store.append_deltas(thread, lease, [delta(thread, "g", 1, "b")])
    before = await snapshot(redis, thread)
    async with Listener(redis, keys.live(thread)) as live:
        await store.append_deltas(thread, lease, [delta(thread, "g", 1, "b")])
        await store.append_deltas(thread, lease, [delta(thread, "g", 0, "a")])
        assert await live.drain() == []
    assert await snapshot(redis, thread) == before


async def test_append_delta_reports_a_requested_cancel(
    store: TurnStore, lock: TurnLock, thread: ThreadId
) -> None:
    lease, _ = await begin(store, lock, thread, generation_id="g")
    assert await store.append_deltas(thread, lease, [delta(thread, "g", 0, "a")]) is False
    assert await store.request_cancel(thread, "g") == "g"
    assert await store.append_deltas(thread, lease, [delta(thread, "g", 1, "b")]) is True


async def test_partial_text_is_the_generations_deltas(
    store: TurnStore, lock: TurnLock, thread: ThreadId
) -> None:
    lease, _ = await begin(store, lock, thread, generation_id="g1")
    await store.append_deltas(thread, lease, [delta(thread, "g1", 0, "first ")])
    await store.end(thread, lease, assistant_message("first "), done(thread, "g1"))
    lease, _ = await begin(store, lock, thread, generation_id="g2")
    for seq, text in enumerate(["Once", " upon", " a time"]):
        await store.append_deltas(thread, lease, [delta(thread, "g2", seq, text)])
    record = await store.record(thread)
    assert record is not None
    assert await store.partial(thread, record) == Partial("Once upon a time", 3, ())


# --- end ------------------------------------------------------------------------------


async def test_end_commits_the_reply_and_frees_the_thread(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    lease, begun = await begin(store, lock, thread, generation_id="g")
    await store.append_deltas(thread, lease, [delta(thread, "g", 0, "Hi there")])
    ended = await store.end(thread, lease, assistant_message("Hi there"), done(thread, "g"))
    assert ended is not None
    message_id = ended.message_id

    history = await redis.xrange(keys.history(thread), "-", "+")
    assert [i for i, _ in history] == [begun.message_id, message_id]
    assert history[1][1]["role"] == "assistant"
    assert history[1][1]["content"] == "Hi there"
    assert history[1][1]["status"] == "complete"
    assert history[1][1]["user_id"] == "assistant"

    stored = await events(redis, thread)
    assert [e["type"] for _, e in stored] == ["message", "loading", "delta", "message", "done"]
    assert [e["n"] for _, e in stored] == [1, 2, 3, 4, 5]
    (message_event_id, message_event), (_, done_event) = stored[3], stored[4]
    assert message_event_id == message_id == message_event["message"]["id"]
    assert done_event["message_id"] == message_id
    assert done_event["status"] == "complete" and done_event["generation_id"] == "g"

    assert await store.record(thread) is None
    assert await redis.exists(keys.lock(thread)) == 0
    meta = await redis.hgetall(keys.meta(thread))
    assert meta["message_count"] == "2"
    assert meta["last_event_id"] == stored[-1][0]
    # The thread is free: a new turn may begin.
    await begin(store, lock, thread, generation_id="g-next")


async def test_end_retried_for_the_same_generation_writes_nothing(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    lease, _ = await begin(store, lock, thread, generation_id="g")
    assert await store.end(thread, lease, assistant_message("r"), done(thread, "g")) is not None
    before = await snapshot(redis, thread)
    async with Listener(redis, keys.live(thread)) as live:
        assert await store.end(thread, lease, assistant_message("r"), done(thread, "g")) is None
        assert await live.drain() == []
    assert await snapshot(redis, thread) == before
    assert len(await redis.xrange(keys.history(thread), "-", "+")) == 2


async def test_end_does_not_release_a_lock_it_no_longer_owns(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    """A lease that expired with no newer grant still commits (the fence is
    current) but leaves alone a lock value that is not its token."""
    lease, _ = await begin(store, lock, thread, generation_id="g")
    await redis.set(keys.lock(thread), "someone-else")
    assert await store.end(thread, lease, assistant_message(""), done(thread, "g")) is not None
    assert await redis.get(keys.lock(thread)) == "someone-else"
    assert await store.record(thread) is None


async def test_end_with_error_status_keeps_the_partial_text(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    lease, _ = await begin(store, lock, thread, generation_id="g")
    ended = await store.end(
        thread, lease, assistant_message("half", "error"), done(thread, "g", "error")
    )
    assert ended is not None
    message_id = ended.message_id
    entries = await redis.xrange(keys.history(thread), message_id, message_id)
    assert entries[0][1]["status"] == "error" and entries[0][1]["content"] == "half"
    last = (await events(redis, thread))[-1][1]
    assert last["type"] == "done" and last["status"] == "error"


# --- cancel ---------------------------------------------------------------------------


async def test_request_cancel_without_a_turn(
    store: TurnStore, thread: ThreadId, redis: Any
) -> None:
    async with Listener(redis, keys.live(thread)) as live:
        assert await store.request_cancel(thread, None) is None
        assert await store.request_cancel(thread, "g") is None
        assert await live.drain() == []
    assert await redis.exists(keys.turn(thread)) == 0  # no record conjured up


async def test_request_cancel_only_for_the_matching_generation(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    await begin(store, lock, thread, generation_id="g1")
    async with Listener(redis, keys.live(thread)) as live:
        assert await store.request_cancel(thread, "other") is None
        record = await store.record(thread)
        assert record is not None and record.cancel_requested is False
        assert await live.drain() == []

        assert await store.request_cancel(thread, "g1") == "g1"
        record = await store.record(thread)
        assert record is not None and record.cancel_requested is True
        frames = await live.drain()
    assert [orjson.loads(f) for f in frames] == [{"control": "cancel", "generation_id": "g1"}]
    assert parse_frame(frames[0]) is None  # a control frame is not a timeline event


async def test_request_cancel_of_any_generation(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    await begin(store, lock, thread, generation_id="g1")
    async with Listener(redis, keys.live(thread)) as live:
        assert await store.request_cancel(thread, None) == "g1"
        frames = await live.drain()
    assert [orjson.loads(f) for f in frames] == [{"control": "cancel", "generation_id": None}]


# --- event ids --------------------------------------------------------------------------


async def test_event_ids_strictly_increase_within_one_millisecond(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    lease, _ = await begin(store, lock, thread, generation_id="g")
    # Ten deltas a call: the events of one call share a millisecond.
    for first in range(0, 300, 10):
        batch = [delta(thread, "g", seq, "x") for seq in range(first, first + 10)]
        await store.append_deltas(thread, lease, batch)
    await store.end(thread, lease, assistant_message("x" * 300), done(thread, "g"))
    stored = await redis.xrange(keys.events(thread), "-", "+")
    ids = [keys.event_id(i) for i, _ in stored]
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert [int(f["n"]) for _, f in stored] == list(range(1, 305))
    # Many events shared a millisecond, so the sequence part did the work.
    assert max(seq for _, seq in ids) > 0


async def test_event_ids_advance_when_the_clock_is_behind_the_last_id(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    """The Redis clock went back (or a failover to a lagging clock): ids
    still move forward from the last one, by sequence."""
    future_ms = int(time.time() * 1000) + 3_600_000
    await redis.hset(keys.meta(thread), "last_event_id", f"{future_ms}-7")
    _, begun = await begin(store, lock, thread, generation_id="g")
    assert begun.message_id == f"{future_ms}-8"
    assert begun.loading_id == f"{future_ms}-9"
    history = await redis.xrange(keys.history(thread), "-", "+")
    assert history[0][0] == f"{future_ms}-8"


async def test_event_numbers_are_contiguous_across_turns(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    for turn in range(3):
        gen = f"g{turn}"
        lease, _ = await begin(store, lock, thread, generation_id=gen)
        await store.append_deltas(thread, lease, [delta(thread, gen, 0, "a")])
        await store.end(thread, lease, assistant_message("a"), done(thread, gen))
    stored = await events(redis, thread)
    assert [e["n"] for _, e in stored] == list(range(1, 16))
    assert await redis.hget(keys.meta(thread), "event_n") == "15"


# --- retention ---------------------------------------------------------------------------


async def test_events_are_trimmed_at_turn_boundaries_only(
    redis: Any, scripts: Scripts, lock: TurnLock, threads: Threads
) -> None:
    retention = 100
    store = TurnStore(redis, scripts, "PUBLISH", retention=retention, dedup_ttl_s=3600)
    thread = await open_thread(threads, "trimmed")

    # One long turn: nothing of it is trimmed while it runs.
    lease, _ = await begin(store, lock, thread, generation_id="long")
    for seq in range(250):
        await store.append_deltas(thread, lease, [delta(thread, "long", seq, "y")])
    assert await redis.xlen(keys.events(thread)) == 252
    record = await store.record(thread)
    assert record is not None
    assert await store.partial(thread, record) == Partial("y" * 250, 250, ())
    await store.end(thread, lease, assistant_message("y" * 250), done(thread, "long"))
    after_end = await redis.xlen(keys.events(thread))
    assert retention <= after_end < 2 * retention

    # Many short turns: the log stays around the retention, never far above.
    for turn in range(40):
        gen = f"g{turn}"
        lease, _ = await begin(store, lock, thread, generation_id=gen)
        for seq in range(5):
            await store.append_deltas(thread, lease, [delta(thread, gen, seq, "z")])
        await store.end(thread, lease, assistant_message("zzzzz"), done(thread, gen))
        assert await redis.xlen(keys.events(thread)) < 2 * retention
    assert await redis.xlen(keys.events(thread)) >= retention
    # Trimming drops the oldest events only: the newest are all there, numbered.
    stored = await redis.xrange(keys.events(thread), "-", "+")
    numbers = [int(f["n"]) for _, f in stored]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    assert numbers[-1] == int(await redis.hget(keys.meta(thread), "event_n"))
    # History is never trimmed.
    assert await redis.xlen(keys.history(thread)) == 82


# --- close_orphan and the index ---------------------------------------------------------


async def test_close_orphan_commits_the_published_text_as_interrupted(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    dead, _ = await begin(store, lock, thread, generation_id="dead")
    await store.index_add(thread)
    for seq, text in enumerate(["par", "tial"]):
        await store.append_deltas(thread, dead, [delta(thread, "dead", seq, text)])
    await redis.delete(keys.lock(thread))
    lease = await lock.acquire(thread)
    assert lease is not None
    record = await store.record(thread)
    assert record is not None
    ended = await store.close_orphan(thread, lease, record)
    assert ended is not None
    message_id = ended.message_id
    entry = (await redis.xrange(keys.history(thread), message_id, message_id))[0][1]
    assert entry["content"] == "partial" and entry["status"] == "interrupted"
    last = (await events(redis, thread))[-1][1]
    assert last["type"] == "done" and last["status"] == "interrupted"
    assert last["message_id"] == message_id and last["generation_id"] == "dead"
    assert await store.record(thread) is None
    # The thread stays in the index until its caller settled its usage.
    assert await store.index_threads() == [thread]
    # The dead turn can never write again.
    with pytest.raises(LockLost):
        await store.append_deltas(thread, dead, [delta(thread, "dead", 2, "zombie")])


async def test_index_lists_threads_and_drops_foreign_members(store: TurnStore, redis: Any) -> None:
    a, b = keys.thread_id("a"), keys.thread_id("b")
    await store.index_add(a)
    await store.index_add(b)
    await redis.zadd(keys.TURN_INDEX, {"not a thread id!": 0})
    assert sorted(await store.index_threads()) == ["a", "b"]
    assert await redis.zscore(keys.TURN_INDEX, "not a thread id!") is None
    await store.index_remove(a)
    assert await store.index_threads() == ["b"]


# --- tool events, and usage in the final commit -----------------------------------


def tool_call(thread: ThreadId, generation_id: str, call_id: str) -> ToolCallEvent:
    return ToolCallEvent(
        thread_id=thread, generation_id=generation_id, call_id=call_id, name="clock",
        input={"timezone": "UTC"},
    )  # fmt: skip


def tool_result(thread: ThreadId, generation_id: str, call_id: str, output: str) -> ToolResultEvent:
    return ToolResultEvent(
        thread_id=thread, generation_id=generation_id, call_id=call_id, output=output,
        is_error=False,
    )  # fmt: skip


async def test_tool_events_are_appended_once_per_call(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    lease, _ = await begin(store, lock, thread, generation_id="g")
    for _ in range(2):  # a retry after a lost reply appends nothing twice
        assert await store.append_once(thread, lease, tool_call(thread, "g", "c1")) is False
        result = tool_result(thread, "g", "c1", "12:00")
        assert await store.append_once(thread, lease, result) is False
    kinds = [(e["type"], e.get("call_id")) for _, e in await events(redis, thread)]
    assert kinds[-2:] == [("tool_call", "c1"), ("tool_result", "c1")]
    assert len(kinds) == 4  # message, loading, tool_call, tool_result
    call = (await events(redis, thread))[-2][1]
    assert call["name"] == "clock" and call["input"] == {"timezone": "UTC"}
    assert await store.request_cancel(thread, "g") == "g"
    assert await store.append_once(thread, lease, tool_call(thread, "g", "c2")) is True


async def test_tool_events_are_fenced(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    lease, _ = await begin(store, lock, thread, generation_id="g")
    await redis.incr(keys.fence(thread))  # a newer grant
    with pytest.raises(LockLost):
        await store.append_once(thread, lease, tool_call(thread, "g", "c1"))


async def test_partial_keeps_finished_tool_calls_at_their_offsets(
    store: TurnStore, lock: TurnLock, thread: ThreadId
) -> None:
    lease, _ = await begin(store, lock, thread, generation_id="g")
    await store.append_deltas(thread, lease, [delta(thread, "g", 0, "Let me see. ")])
    await store.append_once(thread, lease, tool_call(thread, "g", "done-call"))
    await store.append_once(thread, lease, tool_call(thread, "g", "cut-call"))
    await store.append_once(thread, lease, tool_result(thread, "g", "done-call", "12:00"))
    record = await store.record(thread)
    assert record is not None
    partial = await store.partial(thread, record)
    assert partial.text == "Let me see. "
    # Only the call that finished: the other was cut by the pod's death.
    assert partial.tool_calls == (
        ToolUse("done-call", "clock", {"timezone": "UTC"}, "12:00", False, len("Let me see. ")),
    )
    assert record.user_id == USER


async def test_end_adds_usage_to_the_thread_and_the_outbox(
    store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    for generation_id, tokens in (("g1", (10, 5)), ("g2", (7, 3))):
        lease, _ = await begin(store, lock, thread, generation_id=generation_id)
        usage = {"input_tokens": tokens[0], "output_tokens": tokens[1]}
        finished = Done(
            thread_id=thread, generation_id=generation_id, status="complete", usage=usage
        )
        message_id = await store.end(thread, lease, assistant_message("hi"), finished)
        assert message_id is not None
        # A retry of the same end changes nothing.
        assert await store.end(thread, lease, assistant_message("hi"), finished) is None
    meta = await redis.hgetall(keys.meta(thread))
    assert (int(meta["input_tokens"]), int(meta["output_tokens"])) == (17, 8)
    outbox = await redis.hgetall(keys.usage_outbox(thread))
    day = utc_day()
    assert outbox == {"g1": f"{USER} {day} 10 5", "g2": f"{USER} {day} 7 3"}


async def test_the_index_scores_turns_by_start_time_in_ms(store: TurnStore, redis: Any) -> None:
    # Like every sorted set's scores (README, "Redis keys"): `durable-chat
    # turns` reads them as ms.
    before = int(time.time() * 1000)
    await store.index_add(keys.thread_id("a"))
    assert before <= await redis.zscore(keys.TURN_INDEX, "a") <= time.time() * 1000
