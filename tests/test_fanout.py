"""Cross-pod fan-out: one subscriber per pod, ordered gap-free delivery to sinks."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson
import pytest

from app import metrics
from app.chat import fanout, keys
from app.chat.backoff import Backoff
from app.chat.fanout import FanoutHub, FanoutUnavailable
from app.chat.follower import USER_ERASED, Follower, InboxFollower
from app.chat.keys import ThreadId
from app.chat.lock import TurnLock
from app.chat.records import Delta, Done, Loading, Message
from app.chat.threads import Threads
from app.chat.timeline import BATCH, Timeline, TimelineEvent, frame_from_entry
from app.chat.turns import TurnStore
from tests.conftest import USER, count_calls, wait_until


class Sink:
    """A follower that records what the hub gives it."""

    def __init__(self) -> None:
        self.events: list[TimelineEvent] = []
        self.controls: list[dict[str, Any]] = []

    def deliver(self, event: TimelineEvent) -> None:
        self.events.append(event)

    def control(self, message: dict[str, Any]) -> None:
        self.controls.append(message)

    @property
    def numbers(self) -> list[int]:
        return [e.n for e in self.events]


@pytest.fixture
async def hub(hub_factory: Any) -> FanoutHub:
    """A hub whose audit never runs during a test: only frames (and their
    gap fills) deliver events."""
    made: FanoutHub = await hub_factory(60)
    return made


@pytest.fixture
async def auditing_hub(hub_factory: Any) -> FanoutHub:
    made: FanoutHub = await hub_factory(0.2)
    return made


async def numsub(redis: Any, thread: ThreadId) -> int:
    [(_, count)] = await redis.pubsub_numsub(keys.live(thread))
    return int(count)


async def run_turn(
    store: TurnStore, lock: TurnLock, thread: ThreadId, generation_id: str, deltas: int
) -> None:
    """A whole turn through the commit scripts: 2 + deltas + 2 events."""
    lease = await lock.acquire(thread)
    assert lease is not None
    message = Message(
        id="", role="user", content="q", user_id=USER, created_at=1, status="complete"
    )
    await store.begin(
        thread, lease, message, Loading(thread_id=thread, generation_id=generation_id, model="f"),
        "pod",
    )  # fmt: skip
    for seq in range(deltas):
        delta = Delta(thread_id=thread, generation_id=generation_id, seq=seq, text=f"{seq} ")
        await store.append_deltas(thread, lease, [delta])
    reply = Message(
        id="", role="assistant", content="r", user_id="assistant", created_at=1, status="complete"
    )
    await store.end(
        thread, lease, reply,
        Done(thread_id=thread, generation_id=generation_id, status="complete"),
    )  # fmt: skip


async def write_unpublished(redis: Any, thread: ThreadId, text: str) -> TimelineEvent:
    """An event in the log and the meta hash, as a commit script would write
    it, but never published (a lost pub/sub message)."""
    last = await redis.hget(keys.meta(thread), "last_event_id")
    ms, seq = keys.event_id(last)
    entry_id = f"{ms}-{seq + 1}"
    data = orjson.dumps(
        {"type": "delta", "thread_id": thread, "generation_id": "hand", "seq": 0, "text": text}
    ).decode()
    n = await redis.hincrby(keys.meta(thread), "event_n", 1)
    await redis.hset(keys.meta(thread), "last_event_id", entry_id)
    await redis.xadd(keys.events(thread), {"n": n, "data": data}, entry_id)
    return frame_from_entry(entry_id, {"n": str(n), "data": data})


async def stored_frames(redis: Any, thread: ThreadId) -> list[str]:
    entries = await redis.xrange(keys.events(thread), "-", "+")
    return [frame_from_entry(i, f).frame for i, f in entries]


async def flushed(redis: Any, thread: ThreadId, *sinks: Sink) -> None:
    """Every frame published on ``thread`` so far has been handled: the hub
    reads a channel's messages one at a time, in order (gap fills included),
    so once a marker published now reaches the sinks, so has any stray frame
    before it. The marker is taken out of the sinks' controls again."""
    marker = {"control": "marker", "id": uuid.uuid4().hex}
    await redis.publish(keys.live(thread), orjson.dumps(marker))
    await wait_until(lambda: all(marker in s.controls for s in sinks), what="the marker")
    for sink in sinks:
        sink.controls.remove(marker)


# --- following -------------------------------------------------------------------------


async def test_frames_reach_the_sink_in_order(
    hub: FanoutHub, redis: Any, store: TurnStore, lock: TurnLock, thread: ThreadId
) -> None:
    sink = Sink()
    await hub.follow(thread, sink)
    assert await numsub(redis, thread) == 1
    await run_turn(store, lock, thread, "g", deltas=5)
    await wait_until(lambda: len(sink.events) >= 9, what="9 events")
    await flushed(redis, thread, sink)
    assert sink.numbers == list(range(1, 10))
    assert [e.frame for e in sink.events] == await stored_frames(redis, thread)
    assert sink.controls == []


async def test_two_sinks_on_one_thread_see_the_same(
    hub: FanoutHub, redis: Any, store: TurnStore, lock: TurnLock, thread: ThreadId
) -> None:
    a, b = Sink(), Sink()
    await hub.follow(thread, a)
    await hub.follow(thread, b)
    assert await numsub(redis, thread) == 1  # one subscription per pod, not per sink
    assert hub.followed_threads == 1
    await run_turn(store, lock, thread, "g", deltas=3)
    await wait_until(lambda: len(a.events) >= 7 and len(b.events) >= 7, what="both sinks")
    await flushed(redis, thread, a, b)
    assert a.numbers == b.numbers == list(range(1, 8))
    assert [e.frame for e in a.events] == [e.frame for e in b.events]


async def test_a_follower_starts_from_the_moment_it_follows(
    hub: FanoutHub, redis: Any, store: TurnStore, lock: TurnLock, thread: ThreadId
) -> None:
    await run_turn(store, lock, thread, "g1", deltas=2)  # events 1..6, before the follow
    sink = Sink()
    await hub.follow(thread, sink)
    await run_turn(store, lock, thread, "g2", deltas=1)  # events 7..11
    await wait_until(lambda: len(sink.events) >= 5, what="the second turn")
    await flushed(redis, thread, sink)
    assert sink.numbers == [7, 8, 9, 10, 11]


async def test_unfollow_of_the_last_sink_unsubscribes(
    hub: FanoutHub, redis: Any, store: TurnStore, lock: TurnLock, thread: ThreadId
) -> None:
    a, b = Sink(), Sink()
    await hub.follow(thread, a)
    await hub.follow(thread, b)
    await hub.unfollow(thread, a)
    assert await numsub(redis, thread) == 1
    await run_turn(store, lock, thread, "g", deltas=0)
    await wait_until(lambda: len(b.events) >= 4, what="events for the remaining sink")
    assert a.events == []

    await hub.unfollow(thread, b)

    async def unsubscribed() -> bool:
        return await numsub(redis, thread) == 0

    await wait_until(unsubscribed, what="the channel unsubscribed")
    assert hub.followed_threads == 0
    # Unfollowing again, or a sink never followed, is harmless.
    await hub.unfollow(thread, b)
    await hub.unfollow(keys.thread_id("never"), Sink())


async def test_sockets_closing_together_unsubscribe_in_one_command_without_waiting(
    hub: FanoutHub, redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drain closes a pod's sockets all at once: their unfollows return at
    once, and the channels nobody follows any more leave in one UNSUBSCRIBE
    (they took one each, in turn, before)."""
    threads = [keys.thread_id(f"closing{i}") for i in range(50)]
    sinks = [Sink() for _ in threads]
    for thread, sink in zip(threads, sinks, strict=True):
        await hub.follow(thread, sink)
    assert hub._pubsub is not None
    sent = count_calls(monkeypatch, hub._pubsub, "unsubscribe")
    commanding = hub._commanding
    async with commanding:  # the subscriber's connection is busy meanwhile
        await asyncio.gather(*(hub.unfollow(t, s) for t, s in zip(threads, sinks, strict=True)))

    async def all_gone() -> bool:
        return all([await numsub(redis, t) == 0 for t in threads])

    await wait_until(all_gone, what="every channel unsubscribed")
    assert len(sent) == 1


async def test_follow_again_after_unfollow(
    hub: FanoutHub, redis: Any, store: TurnStore, lock: TurnLock, thread: ThreadId
) -> None:
    first = Sink()
    await hub.follow(thread, first)
    await hub.unfollow(thread, first)
    await run_turn(store, lock, thread, "g1", deltas=0)  # events 1..4, nobody follows
    second = Sink()
    await hub.follow(thread, second)
    assert await numsub(redis, thread) == 1
    await run_turn(store, lock, thread, "g2", deltas=0)
    await wait_until(lambda: len(second.events) >= 4, what="events after re-follow")
    await flushed(redis, thread, second)
    assert second.numbers == [5, 6, 7, 8]
    assert first.events == []


async def test_threads_are_kept_apart(
    hub: FanoutHub, redis: Any, store: TurnStore, lock: TurnLock, threads: Any
) -> None:
    a, b = keys.thread_id("ta"), keys.thread_id("tb")
    await threads.open(a, USER)
    await threads.open(b, USER)
    sink_a, sink_b = Sink(), Sink()
    await hub.follow(a, sink_a)
    await hub.follow(b, sink_b)
    await run_turn(store, lock, a, "ga", deltas=1)
    await run_turn(store, lock, b, "gb", deltas=2)
    await wait_until(lambda: len(sink_a.events) >= 5 and len(sink_b.events) >= 6, what="both")
    await flushed(redis, a, sink_a)
    await flushed(redis, b, sink_b)
    assert all(orjson.loads(e.frame)["thread_id"] == "ta" for e in sink_a.events)
    assert all(orjson.loads(e.frame)["thread_id"] == "tb" for e in sink_b.events)
    assert sink_a.numbers == [1, 2, 3, 4, 5] and sink_b.numbers == [1, 2, 3, 4, 5, 6]


async def test_control_frames_go_to_every_sink(
    hub: FanoutHub, store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    a, b = Sink(), Sink()
    await hub.follow(thread, a)
    await hub.follow(thread, b)
    await redis.publish(keys.live(thread), '{"control":"cancel","generation_id":"g"}')
    await wait_until(lambda: a.controls and b.controls, what="control frames")
    assert a.controls == b.controls == [{"control": "cancel", "generation_id": "g"}]
    assert a.events == []


async def test_an_erased_user_s_followers_are_told_to_close_on_every_thread(
    hub: FanoutHub, thread: ThreadId, threads: Threads, redis: Any
) -> None:
    """chat:erased reaches every pod: each closes its followers of that user
    (on any thread, and their inbox), and no one else's."""
    other = keys.thread_id("t2")
    await threads.open(other, USER)
    theirs, also_theirs, mine = Follower(thread, 10, "bob"), Follower(other, 10, "bob"), Sink()
    inbox = InboxFollower(ThreadId(""), 10, "bob")
    await hub.follow(thread, theirs)
    await hub.follow(other, also_theirs)
    await hub.follow(thread, mine)
    await hub.follow_inbox(keys.user_inbox(keys.user_id("bob")), inbox)
    await redis.publish(keys.ERASED_CHANNEL, "bob")
    followers = (theirs, also_theirs, inbox)
    await wait_until(lambda: all(f.closing for f in followers), what="bob's followers to close")
    assert {f.closing for f in followers} == {USER_ERASED}
    # Told, with a digest of the id: not its user.
    assert mine.controls == [{"control": "erased", "user_digests": {keys.erasure_digest("bob")}}]


async def test_frames_of_unknown_shape_are_dropped(
    hub: FanoutHub, store: TurnStore, lock: TurnLock, thread: ThreadId, redis: Any
) -> None:
    sink = Sink()
    await hub.follow(thread, sink)
    await redis.publish(keys.live(thread), '{"something":"else"}')
    await run_turn(store, lock, thread, "g", deltas=0)
    await wait_until(lambda: len(sink.events) >= 4, what="the turn after the junk")
    assert sink.numbers == [1, 2, 3, 4] and sink.controls == []


# --- gaps and duplicates ---------------------------------------------------------------------


async def test_gap_is_filled_from_the_log(
    hub: FanoutHub, redis: Any, store: TurnStore, lock: TurnLock, thread: ThreadId
) -> None:
    sink = Sink()
    await hub.follow(thread, sink)
    lease = await lock.acquire(thread)
    assert lease is not None
    message = Message(
        id="", role="user", content="q", user_id=USER, created_at=1, status="complete"
    )
    await store.begin(
        thread, lease, message, Loading(thread_id=thread, generation_id="g", model="f"), "pod"
    )
    await store.append_deltas(
        thread, lease, [Delta(thread_id=thread, generation_id="g", seq=0, text="a")]
    )
    await wait_until(lambda: len(sink.events) >= 3, what="events 1..3")
    assert sink.numbers == [1, 2, 3]

    fourth = await write_unpublished(redis, thread, "lost")
    fifth = await write_unpublished(redis, thread, "seen")
    assert (fourth.n, fifth.n) == (4, 5)
    await redis.publish(keys.live(thread), fifth.frame)
    await wait_until(lambda: len(sink.events) >= 5, what="the gap filled")
    # The late original and a repeat of 5 change nothing.
    await redis.publish(keys.live(thread), fourth.frame)
    await redis.publish(keys.live(thread), fifth.frame)
    await flushed(redis, thread, sink)
    assert sink.numbers == [1, 2, 3, 4, 5]
    assert [e.frame for e in sink.events[3:]] == [fourth.frame, fifth.frame]
    assert sink.controls == []


async def test_a_batch_is_forwarded_as_its_events_and_its_gap_filled_first(
    hub: FanoutHub, redis: Any, store: TurnStore, lock: TurnLock, thread: ThreadId
) -> None:
    """Events one script appended arrive as one message (app.chat.timeline.BATCH):
    the hub forwards each in order, fills a gap before any of them, and drops
    the ones it has already forwarded."""
    sink = Sink()
    await hub.follow(thread, sink)
    await run_turn(store, lock, thread, "g", deltas=0)
    await wait_until(lambda: len(sink.events) >= 4, what="the turn")
    lost = await write_unpublished(redis, thread, "lost")
    batch = [await write_unpublished(redis, thread, text) for text in ("b1", "b2")]
    await redis.publish(keys.live(thread), BATCH + BATCH.join(e.frame for e in batch))
    await wait_until(lambda: len(sink.events) >= 7, what="the gap and the batch")
    # The whole batch again, and one that overlaps what was forwarded.
    fresh = await write_unpublished(redis, thread, "fresh")
    await redis.publish(keys.live(thread), BATCH + BATCH.join(e.frame for e in batch))
    await redis.publish(keys.live(thread), BATCH + BATCH.join((batch[1].frame, fresh.frame)))
    await flushed(redis, thread, sink)
    assert sink.numbers == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [e.frame for e in sink.events[4:]] == [
        lost.frame,
        *(e.frame for e in batch),
        fresh.frame,
    ]
    assert sink.controls == []


async def test_a_batch_does_not_fill_a_reader_that_keeps_up(
    hub: FanoutHub, redis: Any, store: TurnStore, lock: TurnLock, thread: ThreadId
) -> None:
    """A batch longer than a socket's queue bound: a reader that sends each
    event as soon as the loop lets it (as app.ws's shared frames do) is not
    dropped as too slow; the hub lets it send between a batch's events."""
    reader = Follower(thread, max_queue=2)
    sent: list[TimelineEvent] = []

    def drain() -> None:
        while (event := reader.take()) is not None:
            sent.append(event)

    reader.on_ready = lambda: asyncio.get_running_loop().call_soon(drain)
    await hub.follow(thread, reader)
    await run_turn(store, lock, thread, "g", deltas=0)
    await wait_until(lambda: len(sent) >= 4, what="the turn")
    batch = [await write_unpublished(redis, thread, f"b{i}") for i in range(10)]
    await redis.publish(keys.live(thread), BATCH + BATCH.join(e.frame for e in batch))
    await wait_until(lambda: len(sent) >= 14, what="the batch")
    assert reader.closing is None
    assert [e.frame for e in sent[4:]] == [e.frame for e in batch]


async def test_duplicate_frames_are_delivered_once(
    hub: FanoutHub, redis: Any, store: TurnStore, lock: TurnLock, thread: ThreadId
) -> None:
    sink = Sink()
    await hub.follow(thread, sink)
    await run_turn(store, lock, thread, "g", deltas=1)
    await wait_until(lambda: len(sink.events) >= 5, what="the turn")
    for frame in await stored_frames(redis, thread):
        await redis.publish(keys.live(thread), frame)
        await redis.publish(keys.live(thread), frame)
    await flushed(redis, thread, sink)
    assert sink.numbers == [1, 2, 3, 4, 5]


async def test_audit_delivers_a_lost_last_event(
    auditing_hub: FanoutHub, redis: Any, store: TurnStore, lock: TurnLock, thread: ThreadId
) -> None:
    sink = Sink()
    await auditing_hub.follow(thread, sink)
    await run_turn(store, lock, thread, "g", deltas=0)
    await wait_until(lambda: len(sink.events) >= 4, what="the turn")
    lost = await write_unpublished(redis, thread, "never published")
    # The hub audits every 0.2 s: well within a second the event arrives.
    await wait_until(lambda: len(sink.events) >= 5, timeout=1.0, what="the audit")
    await flushed(redis, thread, sink)
    assert sink.numbers == [1, 2, 3, 4, 5]
    assert sink.events[-1].frame == lost.frame


async def test_audit_covers_every_thread_batch_by_batch(
    auditing_hub: FanoutHub, redis: Any, store: TurnStore, lock: TurnLock, threads: Threads,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(fanout, "RESYNC_BATCH", 2)
    ids = [keys.thread_id(f"batch{i}") for i in range(5)]  # batches of 2, 2 and 1
    sinks = {thread: Sink() for thread in ids}
    for thread in ids:
        await threads.open(thread, USER)
        await auditing_hub.follow(thread, sinks[thread])
        await run_turn(store, lock, thread, "g", deltas=0)
    await wait_until(lambda: all(len(s.events) >= 4 for s in sinks.values()), what="the turns")
    first, last = ids[0], ids[-1]
    lost = {t: await write_unpublished(redis, t, f"lost on {t}") for t in (first, last)}
    await wait_until(
        lambda: len(sinks[first].events) >= 5 and len(sinks[last].events) >= 5,
        timeout=1.0, what="the audit of the first and the last batch",
    )  # fmt: skip
    for thread in ids:
        await flushed(redis, thread, sinks[thread])
    for thread in ids:
        expected = [1, 2, 3, 4, 5] if thread in lost else [1, 2, 3, 4]
        assert sinks[thread].numbers == expected
    assert all(sinks[t].events[-1].frame == lost[t].frame for t in lost)


async def test_the_audit_reads_only_active_threads(
    auditing_hub: FanoutHub, redis: Any, store: TurnStore, lock: TurnLock, threads: Threads,
) -> None:  # fmt: skip
    """Idle followed threads cost the audit nothing; a thread with a turn in
    flight stays audited however long its frames pause, and its lost last
    event still arrives from the audit."""
    audited: list[set[ThreadId]] = []
    resync = auditing_hub._resync

    async def spy(batch: list[ThreadId]) -> None:
        audited.append(set(batch))
        await resync(batch)

    auditing_hub._resync = spy  # type: ignore[method-assign]
    quiet, busy = keys.thread_id("quiet"), keys.thread_id("busy")
    sinks = {quiet: Sink(), busy: Sink()}
    for thread in (quiet, busy):
        await threads.open(thread, USER)
        await auditing_hub.follow(thread, sinks[thread])
    await run_turn(store, lock, quiet, "g", deltas=0)
    lease = await lock.acquire(busy)
    assert lease is not None
    message = Message(
        id="", role="user", content="q", user_id=USER, created_at=1, status="complete"
    )
    loading = Loading(thread_id=busy, generation_id="b", model="f")
    await store.begin(busy, lease, message, loading, "pod")  # a turn starts, and pauses
    await wait_until(lambda: len(sinks[quiet].events) == 4 and len(sinks[busy].events) == 2,
                     what="the frames")  # fmt: skip
    # Both were just active: audited. Then, RECENT_AUDITS intervals without a
    # frame later, only the thread whose turn is in flight is.
    await wait_until(lambda: any(quiet in a and busy in a for a in audited), what="both audited")
    await wait_until(lambda: audited[-1] == {busy}, timeout=2.0, what="the quiet one dropped")
    lost = await write_unpublished(redis, busy, "the pause ends, unheard")
    await wait_until(lambda: len(sinks[busy].events) == 3, timeout=1.0, what="the audit")
    assert sinks[busy].events[-1].frame == lost.frame
    assert sinks[busy].numbers == [1, 2, 3]
    # A turn's end (done) closes it: the thread falls out of the audit too.
    reply = Message(id="", role="assistant", content="r", user_id="assistant", created_at=1,
                    status="complete")  # fmt: skip
    await store.end(busy, lease, reply, Done(thread_id=busy, generation_id="b", status="complete"))
    await wait_until(lambda: len(sinks[busy].events) == 5, what="the reply and the done")
    await wait_until(lambda: audited[-1] == set(), timeout=2.0, what="nothing left to audit")


async def test_event_numbers_going_back_tell_sinks_to_reset(
    hub: FanoutHub, redis: Any, store: TurnStore, lock: TurnLock, thread: ThreadId
) -> None:
    sink = Sink()
    await hub.follow(thread, sink)
    await run_turn(store, lock, thread, "g", deltas=0)
    await wait_until(lambda: len(sink.events) >= 4, what="the turn")
    last = sink.events[-1]
    # The thread's data was lost and recreated: numbering restarts at 1, ids go on.
    newer_id = f"{last.key[0] + 1000}-0"
    data = '{"type":"delta","thread_id":"t1","generation_id":"x","seq":0,"text":"new life"}'
    frame = frame_from_entry(newer_id, {"n": "1", "data": data}).frame
    await redis.publish(keys.live(thread), frame)
    await wait_until(lambda: sink.controls, what="a reset")
    assert sink.controls == [{"control": "reset"}]
    assert sink.numbers == [1, 2, 3, 4]


async def test_a_join_finding_the_thread_reset_resets_the_others_only(
    hub: FanoutHub, redis: Any, store: TurnStore, lock: TurnLock, thread: ThreadId
) -> None:
    """Redis lost the thread (its numbers restart) while the pod followed it:
    the next join sees it, confirms it under the forwarding lock, and tells
    the followers already there to reset; the joiner is up to date."""
    old = Sink()
    await hub.follow(thread, old)
    await run_turn(store, lock, thread, "g", deltas=0)
    await wait_until(lambda: len(old.events) == 4, what="the turn")
    await redis.hset(keys.meta(thread), "event_n", 1)
    new = Sink()
    await hub.follow(thread, new)
    assert old.controls == [{"control": "reset"}]
    assert new.controls == []


async def test_a_join_is_not_held_back_by_a_fill(
    hub: FanoutHub, redis: Any, store: TurnStore, lock: TurnLock, thread: ThreadId
) -> None:
    """The forwarding lock is held while frames are forwarded and gaps filled
    (say, a refill of ten thousand threads after a reconnect): a join reads
    outside it, so a reconnect storm's joins neither wait for it nor hold it."""
    first = Sink()
    await hub.follow(thread, first)
    await run_turn(store, lock, thread, "g", deltas=0)
    await wait_until(lambda: len(first.events) == 4, what="the turn")
    async with hub._forwarding:
        joiner = Sink()
        await asyncio.wait_for(hub.follow(thread, joiner), 2.0)
        # Frames that raced the join's read make no false reset either.
        await run_turn(store, lock, thread, "h", deltas=1)
    await wait_until(lambda: len(joiner.events) == 5, what="the next turn")
    await flushed(redis, thread, first, joiner)
    assert first.numbers == list(range(1, 10)) and joiner.numbers == list(range(5, 10))
    assert first.controls == joiner.controls == []


# --- failures -----------------------------------------------------------------------------------


async def test_follow_fails_when_redis_is_unreachable(
    redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fanout, "SUBSCRIBE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(fanout, "RECONNECT_BACKOFF", Backoff(0.05, 0.05))

    def broken() -> Any:
        raise ConnectionError("redis is down")

    hub = FanoutHub(broken, redis, Timeline(redis), audit_interval_s=10)
    await hub.start()
    try:
        with pytest.raises(FanoutUnavailable) as info:
            await hub.follow(keys.thread_id("t"), Sink())
        assert info.value.retryable is True and info.value.code == "unavailable"
        assert hub.followed_threads == 0
        assert hub.connected is False
    finally:
        await hub.stop()


async def test_gap_at_the_very_start_of_a_thread_is_filled(
    hub: FanoutHub, redis: Any, thread: ThreadId
) -> None:
    """The follower joined a thread without events (no last id yet): the
    fill reads the log from its beginning."""
    sink = Sink()
    await hub.follow(thread, sink)
    await redis.hset(keys.meta(thread), "last_event_id", "1-0")  # as if 1-0 were stored
    await redis.hset(keys.meta(thread), "event_n", 0)
    first = await write_unpublished(redis, thread, "one")
    second = await write_unpublished(redis, thread, "two")
    third = await write_unpublished(redis, thread, "three")
    await redis.publish(keys.live(thread), third.frame)
    await wait_until(lambda: len(sink.events) >= 3, what="the start filled")
    await flushed(redis, thread, sink)
    assert [e.frame for e in sink.events] == [first.frame, second.frame, third.frame]


# --- proving the subscriber hears ---------------------------------------------------------


class DeafPubSub:
    """A fakeredis PubSub that, while ``deaf`` is set, loses every message
    without an error: a half-open connection, or one to a demoted primary."""

    deaf = False

    def __init__(self, redis: Any) -> None:
        self._pubsub = redis.pubsub()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pubsub, name)

    async def get_message(self, timeout: float) -> Any:
        message = await self._pubsub.get_message(timeout=timeout)
        return None if DeafPubSub.deaf else message


async def test_a_deaf_subscriber_is_noticed_replaced_and_refilled(
    redis: Any, store: TurnStore, lock: TurnLock, thread: ThreadId
) -> None:
    probe = fanout.Probe(
        keys.probe_channel("pod-a"), interval_s=0.1, deadline_s=0.05, move_after_s=0.3
    )
    hub = FanoutHub(lambda: DeafPubSub(redis), redis, Timeline(redis), 60, probe)
    await hub.start()
    deaf_before = metrics.SUBSCRIBER_DEAF._value.get()
    try:
        await wait_until(lambda: hub.hearing, what="the first probe heard")
        sink = Sink()
        await hub.follow(thread, sink)
        DeafPubSub.deaf = True
        await run_turn(store, lock, thread, "g", deltas=3)  # all of it lost on the wire
        await wait_until(lambda: not hub.hearing, timeout=1.0, what="the deafness noticed")
        assert sink.events == []
        assert metrics.SUBSCRIBER_DEAF._value.get() > deaf_before
        # Deaf for longer than move_after_s: followers are told to go elsewhere, once.
        await wait_until(lambda: sink.controls, timeout=2.0, what="the followers moved")
        await asyncio.sleep(0.3)
        assert sink.controls == [{"control": "move"}]
        connects = metrics.SUBSCRIBER_CONNECTS._value.get()
        DeafPubSub.deaf = False
        # Replaced (the audit runs only every 60 s here): the turn is refilled
        # from the log, and the hub hears again.
        await wait_until(
            lambda: metrics.SUBSCRIBER_CONNECTS._value.get() > connects and hub.hearing,
            what="hearing again",
        )
        await wait_until(lambda: len(sink.events) == 7, what="the refill")
        assert sink.numbers == list(range(1, 8))
    finally:
        DeafPubSub.deaf = False
        await hub.stop()


async def test_an_erasure_told_while_the_subscriber_was_deaf_closes_its_sockets_once_it_hears(
    redis: Any, thread: ThreadId
) -> None:
    """chat:erased is pub/sub: a pod that is not hearing misses it. With
    its next subscriber (each deaf one is replaced) it closes the sockets of
    the users noted in chat:erasures since it last heard, and only theirs:
    not those erased long before."""
    probe = fanout.Probe(keys.probe_channel("pod-b"), interval_s=0.1, deadline_s=0.05)
    hub = FanoutHub(lambda: DeafPubSub(redis), redis, Timeline(redis), 60, probe)
    await hub.start()
    try:
        await wait_until(lambda: hub.hearing, what="the first probe heard")
        bob, carol, alice = (Follower(thread, 10, user) for user in ("bob", "carol", "alice"))
        for follower in (bob, carol, alice):
            await hub.follow(thread, follower)
        now_ms = int(time.time() * 1000)
        await redis.zadd(keys.ERASURES, {keys.erasure_digest("carol"): now_ms - 60_000})
        DeafPubSub.deaf = True
        await wait_until(lambda: not hub.hearing, timeout=1.0, what="the deafness noticed")
        # What an erase does (ChatService._tell_pods_erased): note, then tell.
        await redis.zadd(keys.ERASURES, {keys.erasure_digest("bob"): now_ms})
        await redis.publish(keys.ERASED_CHANNEL, "bob")  # lost
        await wait_until(lambda: bob.closing, what="bob's socket to close")
        assert bob.closing == USER_ERASED
        assert carol.closing is None and alice.closing is None
    finally:
        DeafPubSub.deaf = False
        await hub.stop()
