"""What the operator's commands read from Redis and how they show it.

The CLI (app.cli) parses arguments; this module does the reading and the
rendering, so that ``durable-chat tail/history/threads/turns`` show the same
things the README's redis-cli recipes do, decoded and readable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import orjson

from app.chat import keys
from app.chat.keys import ThreadId, UserId
from app.chat.redis_types import SyncRedisClient, entries, scored, stream_reads
from app.chat.redis_types import fields as hash_of
from app.chat.redis_types import text as text_reply

Styler = Callable[[str, str], str]


def plain(text: str, _colour: str) -> str:
    return text


def _clock(ms: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) + f".{ms % 1000:03d}"


def render_event(entry_id: str, fields: dict[str, str], style: Styler = plain) -> str:
    """One timeline event as a line: time, number, type, the gist."""
    event = orjson.loads(fields["data"])
    kind = event.get("type", "?")
    head = f"{_clock(keys.event_id(entry_id)[0])} #{fields.get('n', '?'):<5} {kind:<8}"
    if kind == "message":
        message = event["message"]
        gist = (
            f"{message['role']} {message['user_id']} [{message['status']}] {message['content']!r}"
        )
        return style(head, "cyan") + " " + gist
    if kind == "delta":
        return (
            style(head, "white")
            + f" gen={event['generation_id']} seq={event['seq']} {event['text']!r}"
        )
    if kind == "loading":
        return style(head, "yellow") + f" gen={event['generation_id']} model={event['model']}"
    if kind == "done":
        colour = "green" if event["status"] == "complete" else "red"
        return style(head, colour) + f" gen={event['generation_id']} status={event['status']}"
    return head + " " + fields["data"]


def follow_events(
    redis: SyncRedisClient, thread: ThreadId, history: int, block_ms: int = 1000
) -> Iterator[tuple[str, dict[str, str]]]:
    """The thread's last ``history`` events, then every new one as it is
    committed. Reads the event log (XREAD BLOCK), not pub/sub, so an
    operator's view never has holes."""
    stream = keys.events(thread)
    last = "$"
    if history:
        recent = entries(redis.xrevrange(stream, "+", "-", count=history))
        yield from reversed(recent)
        if recent:
            last = recent[0][0]
    if last == "$":
        newest = entries(redis.xrevrange(stream, "+", "-", count=1))
        last = newest[0][0] if newest else "0-0"
    while True:
        reply = stream_reads(redis.xread({stream: last}, block=block_ms, count=100))
        for _stream, read in reply:
            for entry_id, fields in read:
                last = entry_id
                yield entry_id, fields


def render_history(
    redis: SyncRedisClient, thread: ThreadId, limit: int, style: Styler = plain
) -> list[str]:
    lines = []
    newest = entries(redis.xrevrange(keys.history(thread), "+", "-", count=limit))
    for entry_id, fields in reversed(newest):
        status = fields.get("status", "")
        marker = "" if status == "complete" else style(f" [{status}]", "red")
        who = style(f"{fields.get('role', '?')} ({fields.get('user_id', '?')})", "cyan")
        lines.append(f"{entry_id} {who}{marker}: {fields.get('content', '')}")
    return lines


def render_threads(redis: SyncRedisClient, user: UserId, limit: int) -> list[str]:
    rows = scored(redis.zrevrange(keys.user_threads(user), 0, limit - 1, withscores=True))
    return [
        f"{thread}  last active {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(score / 1000))}"
        for thread, score in rows
    ]


@dataclass(frozen=True)
class RunningTurn:
    """A row of ``durable-chat turns``: a turn in progress and its lock."""

    thread: str
    generation_id: str
    pod: str
    fence: str
    lock_owner: str | None
    lock_ttl_ms: int
    age_s: float

    @property
    def orphaned(self) -> bool:
        """Its pod stopped renewing the lease: the reaper will close it."""
        return self.lock_owner is None


def running_turns(redis: SyncRedisClient) -> list[RunningTurn]:
    turns = []
    now = time.time()
    for raw, started_ms in scored(redis.zrange(keys.TURN_INDEX, 0, -1, withscores=True)):
        try:
            thread = keys.thread_id(raw)
        except keys.InvalidId:
            continue
        record = hash_of(redis.hgetall(keys.turn(thread)))
        if not record:
            continue
        turns.append(
            RunningTurn(
                thread=thread,
                generation_id=record.get("generation_id", "?"),
                pod=record.get("pod", "?"),
                fence=record.get("fence", "?"),
                lock_owner=text_reply(redis.get(keys.lock(thread))),
                lock_ttl_ms=int(redis.pttl(keys.lock(thread))),
                age_s=now - started_ms / 1000,
            )
        )
    return turns


def render_turn(turn: RunningTurn, style: Styler = plain) -> str:
    state = (
        style("ORPHANED (lock expired; reaper pending)", "red")
        if turn.orphaned
        else style(f"lock ttl {turn.lock_ttl_ms} ms", "green")
    )
    return (
        f"{turn.thread}  gen={turn.generation_id} pod={turn.pod} fence={turn.fence} "
        f"age={turn.age_s:.1f}s  {state}"
    )
