"""ChatService: the protocol's operations end to end on one in-memory Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from redis.asyncio.connection import AbstractConnection

from app.chat import keys
from app.chat.errors import (
    BudgetExceeded,
    ClientGone,
    Draining,
    Forbidden,
    NotFound,
    RateLimited,
    ThreadBusy,
)
from app.chat.follower import Follower
from app.chat.keys import ThreadId
from app.chat.records import Delta, Loading, Message
from app.chat.service import SOCKETS_AT_ONCE, ChatService
from app.chat.timeline import frame_from_entry
from app.chat.turns import Begun
from app.llm.fake import expected_reply
from tests.conftest import USER, count_calls, wait_until

MakeService = Callable[..., Awaitable[ChatService]]
T = keys.thread_id("svc")


async def until_done(follower: Follower, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Events from the follower's queue up to and including the next ``done``."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        event = await asyncio.wait_for(follower.next_event(), deadline - time.monotonic())
        if event.n >= 0 and follower.claim(event):  # presence aside
            got.append(orjson.loads(event.frame))
        if got and got[-1]["type"] == "done":
            return got


async def stored(redis: Any, thread: ThreadId) -> list[tuple[str, dict[str, Any]]]:
    entries = await redis.xrange(keys.events(thread), "-", "+")
    return [(i, orjson.loads(f["data"])) for i, f in entries]


async def idle(service: ChatService, thread: ThreadId) -> None:
    async def no_turn() -> bool:
        return service.manager.running == 0 and await service.turns.record(thread) is None

    await wait_until(no_turn, what="the thread to be idle")


# --- prompts ------------------------------------------------------------------------------


async def test_a_prompt_runs_a_turn_to_done(make_service: MakeService, redis: Any) -> None:
    service = await make_service(tokens=12, delay_ms=1)
    opened = await service.open(T, USER, None, None)
    assert opened.ready.generating is False and opened.replay == []
    assert opened.ready.last_event_id is None and opened.ready.epoch

    assert await service.prompt(T, USER, "hello there", "c1") is None
    events = await until_done(opened.follower)
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["message", "loading"] and kinds[-2:] == ["message", "done"]
    assert set(kinds[2:-2]) == {"delta"}
    user, loading, reply, done = events[0], events[1], events[-2], events[-1]
    assert user["message"]["content"] == "hello there"
    assert user["message"]["user_id"] == USER and user["message"]["client_msg_id"] == "c1"
    assert loading["model"] == "fake"
    text = "".join(e["text"] for e in events if e["type"] == "delta")
    assert text == reply["message"]["content"] == expected_reply("hello there", 12)
    assert done["message_id"] == reply["message"]["id"] and done["status"] == "complete"
    # What the socket saw is exactly the log.
    assert [e["id"] for e in events] == [i for i, _ in await stored(redis, T)]
    await idle(service, T)
    history, more = await service.history_page(T, None, 10)
    assert [m.role for m in history] == ["user", "assistant"] and more is False
    assert await service.threads.of_user(USER) == ["svc"]


async def test_the_model_sees_the_conversation(make_service: MakeService) -> None:
    service = await make_service(tokens=5, delay_ms=0)
    opened = await service.open(T, USER, None, None)
    await service.prompt(T, USER, "first", None)
    await until_done(opened.follower)
    await idle(service, T)
    await service.prompt(T, USER, "second", None)
    events = await until_done(opened.follower)
    # The fake model answers the last user message.
    assert events[-2]["message"]["content"] == expected_reply("second", 5)


async def test_a_join_whose_client_left_while_it_waited_touches_nothing(
    make_service: MakeService, redis: Any
) -> None:
    """In a storm a client may time out and retry while its first join still
    waits its turn (SOCKETS_AT_ONCE): that join is not run for nobody."""
    service = await make_service()
    with pytest.raises(ClientGone):
        await service.open(T, USER, None, None, client_gone=lambda: True)
    assert not await redis.exists(keys.meta(T))  # not even created
    assert service.hub.followed_threads == 0
    opened = await service.open(T, USER, None, None, client_gone=lambda: False)
    assert opened.ready.thread_id == T and service.hub.followed_threads == 1


async def test_a_drains_exits_take_a_bounded_share_of_the_pool(
    make_service: MakeService, redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thousands of sockets closing at once (a drain, a storm) each leave
    presence and free their place: at most SOCKETS_AT_ONCE at a time, so
    they cannot take every connection of the pool."""
    service = await make_service()
    opened = [await service.open(T, USER, None, None) for _ in range(SOCKETS_AT_ONCE * 3)]
    in_flight, most = 0, 0
    exit_presence = service.presence.exit
    redis_answers = asyncio.Event()

    async def counted_exit(follower: Any) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await redis_answers.wait()
            await exit_presence(follower)
        finally:
            in_flight -= 1

    monkeypatch.setattr(service.presence, "exit", counted_exit)
    # The sockets' handlers are not held up: their exits follow in the background.
    await asyncio.gather(*(service.close(o.follower) for o in opened))
    await asyncio.sleep(0.05)
    assert in_flight == SOCKETS_AT_ONCE
    redis_answers.set()
    await service.exits_done(30.0)  # as a drain waits for them
    assert most == SOCKETS_AT_ONCE
    assert await redis.zcard(keys.presence(T)) == 0


async def test_a_prompt_waits_out_a_lock_held_by_no_turn(
    make_service: MakeService, redis: Any
) -> None:
    """A reaper sweep holds a free thread's lock for a moment (just after its
    turn ended, say): a prompt then starts its turn instead of thread_busy."""
    service = await make_service()
    opened = await service.open(T, USER, None, None)
    sweep = await service.lock.acquire(T)
    assert sweep is not None

    async def sweep_passes() -> None:
        await asyncio.sleep(0.03)
        await service.lock.release(T, sweep)

    passing = asyncio.create_task(sweep_passes())
    await service.prompt(T, USER, "right after a turn", None)
    await passing
    events = await until_done(opened.follower)
    assert events[-1]["status"] == "complete"


async def test_a_second_prompt_while_running_is_busy(make_service: MakeService, redis: Any) -> None:
    service = await make_service(tokens=400, delay_ms=5)
    await service.open(T, USER, None, None)
    await service.prompt(T, USER, "slow one", None)
    history_before = await redis.xlen(keys.history(T))
    with pytest.raises(ThreadBusy) as info:
        await service.prompt(T, USER, "impatient", None)
    assert info.value.retryable is True and info.value.code == "thread_busy"
    assert await redis.xlen(keys.history(T)) == history_before == 1


@pytest.mark.parametrize("after", ["acquire", "begin"])
async def test_a_prompt_whose_caller_goes_away_is_seen_through(
    make_service: MakeService, redis: Any, monkeypatch: pytest.MonkeyPatch, after: str
) -> None:
    """A socket's reader is cancelled when the socket closes, at any point of
    a prompt; here just after the lock's grant, or just after the commit of
    the user's message. The prompt is seen through all the same: its turn
    runs to done, and the client's re-sent copy gets the original message."""
    service = await make_service(tokens=3, delay_ms=0)
    await service.open(T, USER, None, None)
    target = service.lock if after == "acquire" else service.turns
    step = getattr(target, after)

    async def then_the_socket_closes(*args: Any, **kwargs: Any) -> Any:
        result = await step(*args, **kwargs)
        caller.cancel()
        await asyncio.sleep(0)  # where the cancellation would land
        return result

    monkeypatch.setattr(target, after, then_the_socket_closes)
    caller = asyncio.create_task(service.prompt(T, USER, "bye", "cut"))
    with pytest.raises(asyncio.CancelledError):
        await caller

    async def answered() -> bool:
        return bool(await redis.xlen(keys.history(T)) == 2)

    await wait_until(answered, what="the prompt and its reply in the history")
    await idle(service, T)
    assert await redis.get(keys.lock(T)) is None
    log = await stored(redis, T)
    kinds = [event["type"] for _, event in log[:2] + log[-2:]]
    assert kinds == ["message", "loading", "message", "done"]
    assert log[-1][1]["status"] == "complete"
    monkeypatch.undo()
    resent = await service.prompt(T, USER, "bye", "cut")
    assert resent is not None and orjson.loads(resent)["id"] == log[0][0]


async def test_a_resent_prompt_returns_the_original_message(
    make_service: MakeService, redis: Any
) -> None:
    service = await make_service(tokens=400, delay_ms=5)
    await service.open(T, USER, None, None)
    assert await service.prompt(T, USER, "once", "same-id") is None
    first_id = (await stored(redis, T))[0][0]

    # While its turn still runs: the original, not ThreadBusy.
    frame = await service.prompt(T, USER, "once", "same-id")
    assert frame is not None
    decoded = orjson.loads(frame)
    assert decoded["id"] == first_id and decoded["message"]["id"] == first_id
    assert decoded["message"]["content"] == "once"
    stored_entry = await redis.xrange(keys.events(T), first_id, first_id)
    assert frame == frame_from_entry(*stored_entry[0]).frame
    await service.cancel(T, None)
    await idle(service, T)

    # After the turn, and with different content: still the original, nothing new.
    length = await redis.xlen(keys.history(T))
    again = await service.prompt(T, USER, "changed my mind", "same-id")
    assert again is not None and orjson.loads(again)["message"]["content"] == "once"
    assert await redis.xlen(keys.history(T)) == length
    assert await service.turns.record(T) is None


async def test_a_resent_prompt_whose_event_was_trimmed_is_rebuilt_from_history(
    make_service: MakeService, redis: Any
) -> None:
    service = await make_service(tokens=3, delay_ms=0)
    opened = await service.open(T, USER, None, None)
    await service.prompt(T, USER, "old", "cid")
    await until_done(opened.follower)
    await idle(service, T)
    first_id, first_event = (await stored(redis, T))[0]
    await redis.xdel(keys.events(T), first_id)  # trimmed from the timeline since
    frame = await service.prompt(T, USER, "old", "cid")
    assert frame is not None
    decoded = orjson.loads(frame)
    assert decoded["id"] == first_id
    assert decoded["message"] == first_event["message"]
    assert decoded["type"] == "message" and decoded["thread_id"] == T


async def test_cancel_ends_the_running_turn(make_service: MakeService) -> None:
    service = await make_service(tokens=400, delay_ms=5)
    opened = await service.open(T, USER, None, None)
    await service.prompt(T, USER, "go on", None)
    record = await service.turns.record(T)
    assert record is not None
    assert await service.cancel(T, record.generation_id) == record.generation_id
    events = await until_done(opened.follower)
    assert events[-1]["status"] == "cancelled"
    assert events[-2]["message"]["status"] == "cancelled"
    await idle(service, T)
    assert await service.cancel(T, None) is None  # nothing runs any more


async def test_a_draining_service_starts_no_turn(make_service: MakeService, redis: Any) -> None:
    service = await make_service()
    await service.open(T, USER, None, None)
    await service.drain()
    with pytest.raises(Draining):
        await service.prompt(T, USER, "too late", None)
    assert await redis.xlen(keys.history(T)) == 0


async def test_drain_interrupts_a_running_turn(make_service: MakeService, redis: Any) -> None:
    service = await make_service(tokens=1000, delay_ms=5, chat_drain_grace_s=0)
    await service.open(T, USER, None, None)
    await service.prompt(T, USER, "long answer", None)

    async def streaming() -> bool:  # a delta after the message and the loading
        return bool(await redis.xlen(keys.events(T)) >= 3)

    await wait_until(streaming, what="the turn to stream")
    await asyncio.wait_for(service.drain(), 5)
    [(_, last)] = await redis.xrevrange(keys.history(T), count=1)
    assert last["role"] == "assistant" and last["status"] == "interrupted"
    assert expected_reply("long answer", 1000).startswith(last["content"])
    assert await redis.exists(keys.lock(T)) == 0


async def test_a_prompt_on_a_dead_pods_turn_closes_it_and_starts_anew(
    make_service: MakeService, redis: Any
) -> None:
    service = await make_service(tokens=6, delay_ms=0)
    opened = await service.open(T, USER, None, None)
    # A pod died mid-reply: its turn is open, its lease has run out.
    lease = await service.lock.acquire(T)
    assert lease is not None
    await service.turns.index_add(T)
    message = Message(
        id="", role="user", content="q", user_id=USER, created_at=1, status="complete"
    )
    begun = await service.turns.begin(
        T, lease, message, Loading(thread_id=T, generation_id="dead", model="fake"), "gone-pod"
    )
    assert isinstance(begun, Begun)
    for seq, text in enumerate(["half ", "done"]):
        await service.turns.append_deltas(
            T, lease, [Delta(thread_id=T, generation_id="dead", seq=seq, text=text)]
        )
    await redis.delete(keys.lock(T))

    assert await service.prompt(T, USER, "anyone there?", None) is None
    closed = await until_done(opened.follower)
    assert closed[-1]["generation_id"] == "dead" and closed[-1]["status"] == "interrupted"
    assert closed[-2]["message"]["content"] == "half done"
    new_turn = await until_done(opened.follower)
    assert new_turn[0]["message"]["content"] == "anyone there?"
    assert new_turn[-1]["status"] == "complete"
    assert new_turn[-2]["message"]["content"] == expected_reply("anyone there?", 6)
    await idle(service, T)
    history = await service.history.all(T)
    assert [(m.role, m.status) for m in history] == [
        ("user", "complete"),
        ("assistant", "interrupted"),
        ("user", "complete"),
        ("assistant", "complete"),
    ]


async def test_a_prompt_on_a_thread_never_opened_is_refused(
    make_service: MakeService, redis: Any
) -> None:
    service = await make_service()
    with pytest.raises(NotFound):
        await service.prompt(keys.thread_id("nowhere"), USER, "hi", None)
    assert await redis.exists(keys.lock(keys.thread_id("nowhere"))) == 0


# --- opening and resuming -------------------------------------------------------------------


async def finished_turn(service: ChatService, prompt: str = "q") -> list[dict[str, Any]]:
    opened = await service.open(T, USER, None, None)
    await service.prompt(T, USER, prompt, None)
    events = await until_done(opened.follower)
    await service.close(opened.follower)
    await idle(service, T)
    return events


async def test_open_with_after_replays_exactly_what_followed(
    make_service: MakeService, redis: Any
) -> None:
    service = await make_service(tokens=5, delay_ms=0)
    events = await finished_turn(service)
    ids = [e["id"] for e in events]
    opened = await service.open(T, USER, ids[2], None)
    assert opened.ready.recovered is True
    assert [e.id for e in opened.replay] == ids[3:]
    assert [orjson.loads(e.frame) for e in opened.replay] == events[3:]
    assert opened.ready.last_event_id == ids[-1]
    assert opened.ready.generating is False and opened.ready.generation_id is None
    # Live events up to the client's cursor are never sent again; the replay is.
    [(cursor_id, cursor_fields)] = await redis.xrange(keys.events(T), ids[2], ids[2])
    assert opened.follower.claim(frame_from_entry(cursor_id, cursor_fields)) is False
    assert opened.follower.claim(opened.replay[0]) is True

    up_to_date = await service.open(T, USER, ids[-1], opened.ready.epoch)
    assert up_to_date.ready.recovered is True and up_to_date.replay == []


async def test_open_with_a_wrong_epoch_is_not_recovered(
    make_service: MakeService,
) -> None:
    service = await make_service(tokens=3, delay_ms=0)
    events = await finished_turn(service)
    opened = await service.open(T, USER, events[1]["id"], "not-the-epoch")
    assert opened.ready.recovered is False and opened.replay == []


async def test_open_with_an_unknown_cursor_is_not_recovered(make_service: MakeService) -> None:
    service = await make_service(tokens=3, delay_ms=0)
    events = await finished_turn(service)
    too_old = await service.open(T, USER, "1-0", None)
    assert too_old.ready.recovered is False and too_old.replay == []
    from_the_future = await service.open(T, USER, "99999999999999-0", None)
    assert from_the_future.ready.recovered is False and from_the_future.replay == []
    # Not recovered: only events after the current last reach the socket.
    last = keys.event_id(events[-1]["id"])
    assert too_old.follower.sent == last


async def test_open_mid_turn_replays_from_the_loading_event(make_service: MakeService) -> None:
    service = await make_service(tokens=100, delay_ms=4)
    first = await service.open(T, USER, None, None)
    await service.prompt(T, USER, "stream it", None)
    record = await service.turns.record(T)
    assert record is not None

    async def has_deltas() -> bool:
        return first.follower.queued >= 4

    await wait_until(has_deltas, what="some deltas")
    late = await service.open(T, USER, None, None)
    assert late.ready.generating is True
    assert late.ready.generation_id == record.generation_id
    assert late.replay[0].id == record.start_id
    replayed = [orjson.loads(e.frame) for e in late.replay]
    assert replayed[0]["type"] == "loading"
    assert {e["type"] for e in replayed[1:]} == {"delta"}
    # The late socket then goes on live, without a gap or repeat.
    for event in late.replay:
        assert late.follower.claim(event)
    rest = await until_done(late.follower)
    seen = replayed + rest
    all_events = await until_done(first.follower)
    assert [e["id"] for e in seen] == [e["id"] for e in all_events[1:]]


async def test_resume(make_service: MakeService) -> None:
    service = await make_service(tokens=3, delay_ms=0)
    events = await finished_turn(service)
    epoch = (await service.open(T, USER, None, None)).ready.epoch
    resumed = await service.resume(T, events[0]["id"], epoch)
    assert resumed.replay is not None
    assert [e.id for e in resumed.replay] == [e["id"] for e in events[1:]]
    assert (await service.resume(T, events[0]["id"], "other-epoch")).replay is None
    assert (await service.resume(T, "1-0", None)).replay is None
    assert (await service.resume(T, events[-1]["id"], None)).replay == []


async def test_close_unfollows(make_service: MakeService, redis: Any) -> None:
    service = await make_service()
    opened = await service.open(T, USER, None, None)
    assert service.hub.followed_threads == 1
    await service.close(opened.follower)
    assert service.hub.followed_threads == 0


async def test_with_auth_only_members_open_and_prompt(
    make_service: MakeService, redis: Any
) -> None:
    service = await make_service(chat_auth="jwt", chat_auth_secret="x" * 32)
    assert service.settings.auth_enabled is True
    owner = await service.open(T, USER, None, None)
    stranger = keys.user_id("mallory")
    with pytest.raises(Forbidden):
        await service.open(T, stranger, None, None)
    with pytest.raises(Forbidden):
        await service.prompt(T, stranger, "let me in", None)
    assert await redis.xlen(keys.history(T)) == 0
    assert service.hub.followed_threads == 1  # only the owner's follower
    await service.close(owner.follower)


async def test_the_audit_interval_is_the_setting(make_service: MakeService, redis: Any) -> None:
    service = await make_service(tokens=3, delay_ms=0, chat_fanout_audit_s=0.2)
    opened = await service.open(T, USER, None, None)
    await service.prompt(T, USER, "hello", None)
    await until_done(opened.follower)
    # An event committed but never published (a lost pub/sub message, and the
    # thread's last): only the audit can bring it, within its interval.
    last = await redis.hget(keys.meta(T), "last_event_id")
    ms, seq = keys.event_id(last)
    lost_id = f"{ms}-{seq + 1}"
    data = '{"type":"delta","thread_id":"svc","generation_id":"hand","seq":0,"text":"lost"}'
    n = await redis.hincrby(keys.meta(T), "event_n", 1)
    await redis.hset(keys.meta(T), "last_event_id", lost_id)
    await redis.xadd(keys.events(T), {"n": n, "data": data}, lost_id)
    event = await asyncio.wait_for(opened.follower.next_event(), timeout=1.0)
    assert (event.id, event.n) == (lost_id, n)


# --- the daily budget and the queue ---------------------------------------------------------


async def test_a_queued_prompt_is_checked_against_the_budget_as_it_starts(
    make_service: MakeService, redis: Any
) -> None:
    # Each turn costs its prompt's words and 20 output tokens: one takes the
    # user over the line.
    service = await make_service(
        tokens=20, delay_ms=20, chat_prompt_policy="queue", chat_user_tokens_per_day=10
    )
    await service.open(T, USER, None, None)
    assert await service.prompt(T, USER, "first", None) is None
    # Queued behind the user's own turn (the room held for it does not stop
    # a prompt that only waits).
    assert await service.prompt(T, USER, "second", None) is None
    await idle(service, T)
    events = [e for _, e in await stored(redis, T)]
    kinds = [e["type"] for e in events]
    assert kinds.count("done") == 1 and "queued" in kinds
    queued = next(e for e in events if e["type"] == "queued")
    unqueued = next(e for e in events if e["type"] == "unqueued")
    assert unqueued == {
        "type": "unqueued", "thread_id": T, "queue_id": queued["queue_id"],
        "reason": "budget_exceeded",
    }  # fmt: skip
    assert await service.queue.size(T) == 0
    # Over the line now: a prompt is refused at once, not even queued.
    with pytest.raises(BudgetExceeded) as refused:
        await service.prompt(T, USER, "third", None)
    assert refused.value.retry_after_ms is not None and refused.value.retry_after_ms > 0
    assert (await service.usage.today(USER)).total == 1 + 20


class RoundTrips:
    """The commands the current task sends Redis while ``counting``: a
    connect's own, not the pod's background tasks' (probe, audit, presence)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[bytes] = []
        self.counting = True
        send = AbstractConnection.send_packed_command
        task = asyncio.current_task()

        async def counted(conn: Any, command: Any, check_health: bool = True) -> None:
            if self.counting and asyncio.current_task() is task:
                joined = command if isinstance(command, bytes | bytearray) else b"".join(command)
                self.sent.append(joined)
            await send(conn, command, check_health)

        monkeypatch.setattr(AbstractConnection, "send_packed_command", counted)


async def test_a_connect_reads_in_one_round_trip(
    make_service: MakeService, redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round trips of a connect (every command or pipeline sent on any
    connection, the subscriber's included), once the pod is warm: the
    thread's creation, the membership check, every read ``ready`` needs, the
    catch-up and the presence entry are one script (JOIN_THREAD). A thread
    new to the pod adds its SUBSCRIBE, nothing else; a thread it follows is
    one round trip, a resume with ``after`` included. (Against a real
    redis-server and pod: tests/integration/test_redis_layout.py.)"""
    service = await make_service()
    await service.open(keys.thread_id("warm"), USER, None, None)  # connections, scripts
    trips = RoundTrips(monkeypatch)
    sent = trips.sent

    fresh = keys.thread_id("fresh")
    new = await service.open(fresh, USER, None, None)
    assert len(sent) == 2, sent  # SUBSCRIBE, JOIN_THREAD (it created the thread)
    assert sum(b"SUBSCRIBE" in c for c in sent) == 1 and b"EVALSHA" in sent[1]
    assert await redis.zscore(keys.user_threads(USER), fresh) is not None
    sent.clear()
    again = await service.open(fresh, USER, None, None)
    assert len(sent) == 1 and b"EVALSHA" in sent[0], sent
    assert again.ready.last_event_id == new.ready.last_event_id
    assert again.ready.epoch == new.ready.epoch
    trips.counting = False
    await service.prompt(fresh, USER, "hello", None)
    await idle(service, fresh)
    trips.counting = True
    log = await stored(redis, fresh)
    sent.clear()
    resumed = await service.open(fresh, USER, log[0][0], again.ready.epoch)
    assert len(sent) == 1, sent  # the replay too
    assert resumed.ready.recovered is True
    assert [e.id for e in resumed.replay] == [i for i, _ in log[1:]]


async def test_a_connect_counted_against_socket_limits_is_one_round_trip_too(
    make_service: MakeService, redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With auth on and a per-user socket limit, one Redis: the socket's
    admission is JOIN_THREAD's first step, so a connect to a followed thread
    is still one round trip; a socket over the limit is refused by it, and
    leaves no count, presence entry or follower behind."""
    service = await make_service(
        chat_auth="jwt", chat_auth_secret="x" * 32, chat_max_sockets_per_user=2
    )
    thread = keys.thread_id("limited")
    first = await service.open(thread, USER, None, None)  # creates it, loads the scripts
    trips = RoundTrips(monkeypatch)
    second = await service.open(thread, USER, None, None)
    assert len(trips.sent) == 1 and b"EVALSHA" in trips.sent[0], trips.sent
    assert await redis.zcard(keys.user_sockets(USER)) == 2
    trips.counting = False
    with pytest.raises(RateLimited):
        await service.open(thread, USER, None, None)
    assert await redis.zcard(keys.user_sockets(USER)) == 2
    assert await redis.zcard(keys.presence(thread)) == 2
    assert service.limits.local_sockets == 2
    assert service.hub.followed_threads == 1
    await service.close(second.follower)
    await service.close(first.follower)
    await service.exits_done(5.0)
    assert await redis.zcard(keys.user_sockets(USER)) == 0


async def test_presence_of_every_thread_is_renewed_in_one_call(
    make_service: MakeService, redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pod's presence heartbeat, with one Redis: one RENEW_PRESENCE call for
    the entries of all its threads (not one call per thread), each thread's
    set read back in the same call."""
    service = await make_service()
    threads = [keys.thread_id(f"p{i}") for i in range(5)]
    for thread in threads:
        await service.open(thread, USER, None, None)
    before = {t: await redis.zrange(keys.presence(t), 0, -1, withscores=True) for t in threads}
    calls = count_calls(monkeypatch, service.scripts, "renew_presence")
    await asyncio.sleep(0.01)  # the Redis clock moves on
    await service.presence.renew()
    assert len(calls) == 1
    for thread in threads:
        [(entry, expiry)] = await redis.zrange(keys.presence(thread), 0, -1, withscores=True)
        assert entry.startswith(f"{USER}|") and expiry > before[thread][0][1]


async def test_the_heartbeat_shows_a_changed_set_and_skips_an_unchanged_one(
    make_service: MakeService, redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between nudges only the heartbeat's read shows a change no one
    announced (another pod's entry expired, or one the nudge of was lost);
    a thread whose entries are those of its last read costs no work."""
    service = await make_service()
    thread = keys.thread_id("beat")
    follower = (await service.open(thread, USER, None, None)).follower

    def shown() -> list[list[str]]:
        frames = []
        while (event := follower.take()) is not None:
            frames.append(orjson.loads(event.frame)["users"])
        return frames

    assert shown() == [[USER]]  # at the join
    show = service.presence._show
    showing: list[ThreadId] = []

    def counted(thread: ThreadId, *args: Any) -> None:
        showing.append(thread)
        show(thread, *args)

    monkeypatch.setattr(service.presence, "_show", counted)
    await service.presence.renew()
    await service.presence.renew()
    assert shown() == [] and len(showing) == 1  # read once after the join, then skipped
    far = int(time.time() * 1000) + 600_000
    await redis.zadd(keys.presence(thread), {"zoe|elsewhere": far})  # another pod's, no nudge
    await service.presence.renew()
    assert shown() == [sorted([USER, "zoe"])]
    await redis.zrem(keys.presence(thread), "zoe|elsewhere")  # as if it expired
    await service.presence.renew()
    await service.presence.renew()
    assert shown() == [[USER]] and len(showing) == 3


async def test_a_socket_that_leaves_while_its_entry_is_renewed_is_not_shown_present(
    make_service: MakeService, redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heartbeat's renewal is on its way when the socket leaves, and the
    exit's removal reaches Redis first: the renewal puts the entry back, and
    the pod takes it out again (else the user shows present for a lease)."""
    service = await make_service()
    thread = keys.thread_id("leaving")
    follower = (await service.open(thread, USER, None, None)).follower
    renew = service.scripts.renew_presence
    renewing, exited = asyncio.Event(), asyncio.Event()

    async def late_renewal(*args: Any, **kwargs: Any) -> Any:
        renewing.set()
        await exited.wait()  # the exit's removal lands first
        return await renew(*args, **kwargs)

    monkeypatch.setattr(service.scripts, "renew_presence", late_renewal)
    heartbeat = asyncio.create_task(service.presence.renew())
    await renewing.wait()
    await service.presence.exit(follower)
    assert await redis.zcard(keys.presence(thread)) == 0
    exited.set()
    await heartbeat
    assert await redis.zcard(keys.presence(thread)) == 0
