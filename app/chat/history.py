"""Reads of a thread's committed messages (``chat:{T}:history``) as a tree.

Messages are written only by the turn commit scripts (app.chat.turns), which
also keep the tree's indexes (``chat:{T}:tree``); a message's id is its
history entry id. A branch is the path of parent links from a leaf back to
its root: pages, the model's context and the seed protocol's history all walk
that path with the HISTORY_PATH script, one round trip per page whatever the
size of the thread or the number of its branches. This module also owns the
history entry format.

A thread that went cold may have its older messages archived (the cold
tier, app.chat.archive): Redis then holds the newest messages and the whole
tree index, and a walk that reaches a message Redis no longer holds goes on
in the archive, so pages, ``has_more`` and the model's context read the same
whichever tier a message is in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol, cast

import orjson

from app.chat import keys
from app.chat.errors import NotFound
from app.chat.keys import ThreadId
from app.chat.records import Message, MessageStatus, Role, ToolUse
from app.chat.redis_types import RedisClient, optional_texts, text
from app.chat.redis_types import entries as entries_of
from app.chat.scripts import Scripts

# The seed protocol's whole-branch reads, a page at a time.
_ALL_PAGE = 200
# Messages per Redis read of an export.
EXPORT_PAGE = 100
# How much of the context budget a window that outgrew it starts again with
# (see HistoryReader.context): the rest is room for the turns that follow.
REFILL = 0.6


def tool_use_json(use: ToolUse) -> dict[str, object]:
    """A tool call as stored and as clients see it in an assistant message."""
    return {
        "call_id": use.call_id, "name": use.name, "input": use.input,
        "output": use.output, "is_error": use.is_error, "offset": use.offset,
    }  # fmt: skip


def tool_use_from_json(data: dict[str, Any]) -> ToolUse:
    return ToolUse(
        call_id=str(data["call_id"]), name=str(data["name"]), input=data.get("input"),
        output=str(data.get("output", "")), is_error=bool(data.get("is_error")),
        offset=int(data.get("offset", 0)),
    )  # fmt: skip


def message_from_entry(
    entry_id: str, fields: dict[str, str], siblings: tuple[str, ...] | None = None
) -> Message:
    """A message as read back from its history stream entry. An entry written
    before trees existed has no ``parent`` field (its parent is the entry
    before it: HISTORY_PATH works that out)."""
    tool_calls = orjson.loads(fields["tool_calls"]) if fields.get("tool_calls") else []
    return Message(
        id=entry_id,
        parent_id=fields.get("parent") or None,
        siblings=siblings,
        role=cast(Role, fields["role"]),
        content=fields.get("content", ""),
        user_id=fields.get("user_id", ""),
        created_at=int(fields.get("created_at", entry_id.split("-")[0])),
        status=cast(MessageStatus, fields.get("status", "complete")),
        client_msg_id=fields.get("client_msg_id") or None,
        tool_calls=tuple(tool_use_from_json(c) for c in tool_calls),
        usage=orjson.loads(fields["usage"]) if fields.get("usage") else None,
        queue_id=fields.get("queue_id") or None,
    )


def committed(message_id: str, parent: str, message: Message) -> Message:
    """``message`` as reads return it once committed as ``message_id`` under
    ``parent`` (its siblings aside): made from its history entry, so a
    context a pod builds from what it wrote is the one it would read."""
    fields = entry_fields(message)
    stored = dict(zip(fields[::2], fields[1::2], strict=True))
    return message_from_entry(message_id, {**stored, "parent": parent})


def entry_fields(message: Message) -> list[str]:
    """A message's history stream entry, as flat (name, value) pairs for XADD
    (the commit script adds ``parent``, which it decides)."""
    pairs = [
        "role", message.role,
        "content", message.content,
        "user_id", message.user_id,
        "status", message.status,
        "created_at", str(message.created_at),
    ]  # fmt: skip
    if message.client_msg_id:
        pairs += ["client_msg_id", message.client_msg_id]
    if message.tool_calls:
        calls = [tool_use_json(c) for c in message.tool_calls]
        pairs += ["tool_calls", orjson.dumps(calls).decode()]
    if message.usage is not None:
        pairs += ["usage", orjson.dumps(dict(message.usage)).decode()]
    if message.queue_id:
        pairs += ["queue_id", message.queue_id]
    return pairs


class ColdHistory(Protocol):
    """The archive's reads a history walk continues into (app.chat.archive.Archive)."""

    async def path(
        self, thread: ThreadId, start: str, limit: int
    ) -> tuple[list[Message], bool]: ...

    def messages(
        self, thread: ThreadId, after: str | None = None, below: str | None = None
    ) -> AsyncIterator[Message]: ...


class HistoryReader:
    """Pages of a branch's messages, oldest first within a page."""

    def __init__(
        self, redis: RedisClient, scripts: Scripts, archive: ColdHistory | None = None
    ) -> None:
        self._redis = redis
        self._scripts = scripts
        self._archive = archive

    async def page(
        self, thread: ThreadId, before: str | None, limit: int, leaf: str | None = None
    ) -> tuple[list[Message], bool]:
        """The ``limit`` messages of the branch ending at ``leaf`` (default: the
        active leaf), or, with ``before``, the ``limit`` ancestors of that
        message; and whether older ones exist. NotFound when ``leaf`` or
        ``before`` is not a message of the thread."""
        if before is not None:
            if keys.event_id(before) == (0, 0):
                return [], False  # nothing is older (the first possible id)
            return await self._path(thread, "before", before, limit)
        return await self._path(thread, "leaf", leaf or "", limit)

    async def _path(
        self, thread: ThreadId, mode: str, start: str, limit: int, stop: str = ""
    ) -> tuple[list[Message], bool]:
        """A page of the walk (HISTORY_PATH), going on in the archive where
        Redis no longer holds it; ending at ``stop`` when the walk meets it."""
        reply = await self._scripts.history_path(
            keys=[keys.history(thread), keys.tree(thread), keys.meta(thread)],
            args=[mode, start, limit, stop],
        )
        if reply[0] == "not_found":
            if self._archive is None:
                raise NotFound("no such message in this thread")
            return await self._cold(thread, mode, start, limit)
        messages = []
        for entry_id, parent, siblings, flat in reversed(reply[2:]):
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            fields["parent"] = parent  # written before trees: known only from the walk
            messages.append(message_from_entry(entry_id, fields, tuple(siblings.split(","))))
        more = bool(reply[1])
        stopped = bool(stop) and bool(messages) and messages[0].id == stop
        if more and len(messages) < limit and not stopped and self._archive is not None:
            # The walk stopped at a message Redis no longer holds: archived.
            if messages:
                onward = messages[0].parent_id or ""
            else:
                onward = await self._onward(thread, mode, start)
            older, more = await self._cold(thread, "leaf", onward, limit - len(messages))
            messages[:0] = older
        return messages, more

    async def _onward(self, thread: ThreadId, mode: str, start: str) -> str:
        """Where a walk that found nothing in Redis goes on: the active leaf,
        or the parent of the message ``before`` names."""
        if mode == "leaf":
            return start or text(await self._redis.hget(keys.meta(thread), "leaf")) or ""
        entry = entries_of(await self._redis.xrange(keys.history(thread), start, start))
        return entry[0][1].get("parent", "") if entry else ""

    async def _cold(
        self, thread: ThreadId, mode: str, start: str, limit: int
    ) -> tuple[list[Message], bool]:
        """The walk's archived part, with each message's siblings from the
        tree index (which stays in Redis). NotFound when it is not there."""
        assert self._archive is not None
        if not start:
            return [], False
        want = limit + 1 if mode == "before" else limit
        messages, more = await self._archive.path(thread, start, want)
        if not messages:
            raise NotFound("no such message in this thread")
        if mode == "before":
            messages.pop()  # ``before`` itself
        children = optional_texts(
            await self._redis.hmget(keys.tree(thread), [f"c:{m.parent_id or ''}" for m in messages])
        )
        return [
            dataclasses.replace(m, siblings=tuple((c or m.id).split(",")))
            for m, c in zip(messages, children, strict=True)
        ], more

    async def everything(
        self, thread: ThreadId, pause: Callable[[], None] = lambda: None
    ) -> AsyncIterator[Message]:
        """Every message of the thread, every branch, both tiers, each once,
        oldest first (the owner's export), exact while the archiver moves
        messages meanwhile.

        Each Redis read (HISTORY_SLICE) comes with the thread's archive
        watermark: Redis then held no message below it, and the archive,
        committed before the trim that moved it, every one. So whatever was
        trimmed since the previous read is in the archive between the last
        message given and the watermark, read from there before the slice
        (which starts at the watermark or later); a message in both tiers
        (an archiver stopped between its commit and its trim) is above the
        watermark, and comes from Redis only. ``pause`` runs between two
        reads (tests force an archiver's sweep there)."""
        after = ""
        while True:
            reply = await self._scripts.history_slice(
                keys=[keys.history(thread), keys.meta(thread)], args=[after, EXPORT_PAGE]
            )
            pause()
            mark, page = reply[0], reply[1:]
            if (
                self._archive is not None
                and mark
                and (not after or keys.event_id(after) < keys.event_id(mark))
            ):
                async for message in self._archive.messages(thread, after or None, mark):
                    yield message
            for entry_id, flat in page:
                yield message_from_entry(entry_id, dict(zip(flat[::2], flat[1::2], strict=True)))
                after = entry_id
            if len(page) < EXPORT_PAGE:
                return

    async def all(self, thread: ThreadId) -> list[Message]:
        """The active branch, root first (the seed protocol's GET_HISTORY)."""
        branch, more = await self.page(thread, None, _ALL_PAGE)
        while more:
            older, more = await self.page(thread, branch[0].id, _ALL_PAGE)
            branch[:0] = older
        return branch

    async def context(
        self, thread: ThreadId, leaf: str, budget: int, cost: Callable[[Message], int],
        start: str | None = None,
    ) -> list[Message]:  # fmt: skip
        """The newest messages of the branch ending at ``leaf`` whose ``cost``
        (estimated tokens) fits in ``budget``, root side first, and always
        ``leaf`` itself: the context a model sees, never another branch.

        A context that starts where the last one did (``start``, while it
        still fits) keeps its beginning from turn to turn, so providers'
        prompt caches match it (a cache is a prefix: a window sliding by one
        message each turn would miss every time). Once it no longer fits, the
        window starts again with only REFILL of the budget, leaving room to
        grow for the next turns."""
        window = _Window(budget, cost, start)
        # Pages that start small and double: a budget is often met by the last
        # few messages, and every message read past it is Redis and pod time
        # spent on every turn. For the same reason no page reads past
        # ``start`` (the walk stops there).
        count = 8
        page, more = await self._path(thread, "leaf", leaf, count, start or "")
        while True:
            for message in reversed(page):
                chosen = window.add(message)
                if chosen is not None:
                    return chosen
            if not more:
                return window.whole()
            count = min(count * 2, 256)
            page, more = await self._path(thread, "before", page[0].id, count, start or "")


def context_of(
    path: Sequence[Message], budget: int, cost: Callable[[Message], int], start: str | None
) -> list[Message]:
    """HistoryReader.context over a branch held in memory (root side first),
    the same choice: a pod's cached context (app.chat.contexts)."""
    window = _Window(budget, cost, start)
    for message in reversed(path):
        chosen = window.add(message)
        if chosen is not None:
            return chosen
    return window.whole()


class _Window:
    """A model's context chosen from a branch walked newest first (see
    HistoryReader.context)."""

    __slots__ = ("_budget", "_cost", "_picked", "_start", "_used")

    def __init__(self, budget: int, cost: Callable[[Message], int], start: str | None) -> None:
        self._budget = budget
        self._cost = cost
        self._start = start
        self._picked: list[Message] = []
        self._used = 0

    def add(self, message: Message) -> list[Message] | None:
        """The context, root side first, once ``message`` decides it."""
        self._used += self._cost(message)
        if self._used > self._budget and self._picked:
            return _newest(self._picked, int(self._budget * REFILL), self._cost)[::-1]
        self._picked.append(message)
        if message.id == self._start:
            return self._picked[::-1]
        return None

    def whole(self) -> list[Message]:
        """The context when the branch ended first: all of it."""
        return self._picked[::-1]


def _newest(picked: list[Message], budget: int, cost: Callable[[Message], int]) -> list[Message]:
    """The first messages of ``picked`` (newest first) that fit in ``budget``, at least one."""
    used = 0
    for i, message in enumerate(picked):
        used += cost(message)
        if used > budget and i:
            return picked[:i]
    return picked
