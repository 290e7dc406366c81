"""The message tree: parent links and indexes written by the commit scripts
(BEGIN_TURN, END_TURN, SWITCH_BRANCH), read by HISTORY_PATH through
HistoryReader: branches, siblings, the newest leaf under a message, and
threads written before trees existed, on fakeredis."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from app.chat import keys
from app.chat.errors import InvalidRequest, NotFound, ThreadBusy
from app.chat.history import HistoryReader, entry_fields
from app.chat.keys import ThreadId
from app.chat.lock import TurnLock
from app.chat.records import Message
from app.chat.scripts import Scripts
from app.chat.turns import Begun, TurnStore
from tests.test_turns import POD, assistant_message, done, loading, snapshot, user_message


class Driver:
    """Whole turns without a model: a prompt (or regenerate) and its reply."""

    def __init__(self, store: TurnStore, lock: TurnLock, thread: ThreadId) -> None:
        self.store, self.lock, self.thread = store, lock, thread
        self.turns = 0

    async def turn(
        self, content: str, anchor: str = "", regenerate: bool = False
    ) -> tuple[str, str]:
        """(user message id, reply id) of one whole turn."""
        self.turns += 1
        gen = f"g{self.turns}"
        lease = await self.lock.acquire(self.thread)
        assert lease is not None
        message = None if regenerate else user_message(content)
        begun = await self.store.begin(
            self.thread, lease, message, loading(self.thread, gen), POD, anchor
        )
        assert isinstance(begun, Begun), begun
        reply = await self.store.end(
            self.thread, lease, assistant_message(f"re {content}"), done(self.thread, gen)
        )
        assert reply is not None
        return begun.message_id, reply.message_id

    async def switch(self, message_id: str) -> str:
        lease = await self.lock.acquire(self.thread)
        assert lease is not None
        try:
            return await self.store.switch(self.thread, lease, message_id)
        finally:
            await self.lock.release(self.thread, lease)


@pytest.fixture
def drive(store: TurnStore, lock: TurnLock, thread: ThreadId) -> Driver:
    return Driver(store, lock, thread)


@pytest.fixture
def reader(redis: Any, scripts: Scripts) -> HistoryReader:
    return HistoryReader(redis, scripts)


async def path(reader: HistoryReader, thread: ThreadId, leaf: str | None = None) -> list[str]:
    return [m.content for m in (await reader.page(thread, None, 200, leaf))[0]]


async def leaf(redis: Any, thread: ThreadId) -> str | None:
    found: str | None = await redis.hget(keys.meta(thread), "leaf")
    return found


async def test_messages_link_to_their_parents_and_become_the_leaf(
    drive: Driver, reader: HistoryReader, thread: ThreadId, redis: Any
) -> None:
    q1, a1 = await drive.turn("one")
    q2, a2 = await drive.turn("two")
    page, more = await reader.page(thread, None, 50)
    assert [(m.id, m.parent_id) for m in page] == [(q1, None), (a1, q1), (q2, a1), (a2, q2)]
    assert [m.siblings for m in page] == [(q1,), (a1,), (q2,), (a2,)] and more is False
    assert await leaf(redis, thread) == a2
    stored = {i: f for i, f in await redis.xrange(keys.history(thread))}
    assert [stored[i]["parent"] for i in (q1, a1, q2, a2)] == ["", q1, a1, q2]


async def test_an_edit_starts_a_branch_and_history_follows_it(
    drive: Driver, reader: HistoryReader, thread: ThreadId, redis: Any
) -> None:
    q1, a1 = await drive.turn("one")
    q2, a2 = await drive.turn("two")
    # Edit q2: a new message under q2's parent.
    e2, b2 = await drive.turn("two edited", anchor=a1)
    assert await leaf(redis, thread) == b2
    assert await path(reader, thread) == ["one", "re one", "two edited", "re two edited"]
    assert await path(reader, thread, a2) == ["one", "re one", "two", "re two"]
    page, _ = await reader.page(thread, None, 50)
    assert page[2].siblings == (q2, e2) and page[3].siblings == (b2,)
    # A new root: an edit of the very first message.
    r, _ = await drive.turn("other start", anchor="-")
    page, _ = await reader.page(thread, None, 50)
    assert page[0].id == r and page[0].parent_id is None and page[0].siblings == (q1, r)


async def test_regenerate_adds_a_sibling_reply_and_no_user_message(
    drive: Driver, reader: HistoryReader, thread: ThreadId, redis: Any
) -> None:
    q1, a1 = await drive.turn("one")
    answered, again = await drive.turn("", anchor=a1, regenerate=True)
    assert answered == q1
    answered, third = await drive.turn("", anchor=q1, regenerate=True)  # the user message itself
    assert answered == q1
    page, _ = await reader.page(thread, None, 50)
    assert [m.id for m in page] == [q1, third]
    assert page[1].siblings == (a1, again, third) and page[1].parent_id == q1
    assert len(await redis.xrange(keys.history(thread))) == 4  # one user message, three replies


async def test_switch_picks_the_newest_leaf_under_a_message(
    drive: Driver, reader: HistoryReader, thread: ThreadId, redis: Any
) -> None:
    q1, a1 = await drive.turn("one")
    _, a2 = await drive.turn("two")
    _, r1 = await drive.turn("", anchor=q1, regenerate=True)  # a1's sibling, newest child
    # Back on a1's branch, which then grows: its leaf is the newest under q1,
    # although r1 is q1's newest child.
    assert await drive.switch(a1) == a2
    _, a3 = await drive.turn("three")
    assert await drive.switch(q1) == a3
    assert await drive.switch(r1) == r1
    assert await leaf(redis, thread) == r1
    assert await path(reader, thread) == ["one", "re "]
    branch = [e for _, e in await redis.xrange(keys.events(thread))]
    branches = [orjson.loads(e["data"]) for e in branch if '"branch"' in e["data"]]
    assert [b["leaf_id"] for b in branches] == [a2, a3, r1]


async def test_newest_leaf_matches_a_full_scan_on_a_random_tree(
    drive: Driver, redis: Any, thread: ThreadId
) -> None:
    rng = random.Random(12)
    ids: list[str] = []
    parents: dict[str, str] = {}
    for i in range(60):
        anchor = rng.choice(ids) if ids and rng.random() < 0.4 else ""
        q, a = await drive.turn(f"m{i}", anchor=anchor)
        ids += [q, a]
    for entry_id, fields in await redis.xrange(keys.history(thread)):
        parents[entry_id] = fields["parent"]

    def newest_under(m: str) -> str:
        def under(x: str) -> bool:
            while x:
                if x == m:
                    return True
                x = parents[x]
            return False

        return max((x for x in parents if under(x)), key=keys.event_id)

    for m in rng.sample(ids, 30):
        assert await drive.switch(m) == newest_under(m), m


async def test_paging_walks_the_path_with_has_more(
    drive: Driver, reader: HistoryReader, thread: ThreadId
) -> None:
    for i in range(5):
        await drive.turn(f"m{i}")
    _, side = await drive.turn("side", anchor=(await reader.page(thread, None, 3))[0][0].id)
    newest, more = await reader.page(thread, None, 3, side)
    assert [m.content for m in newest] == ["re m3", "side", "re side"] and more
    older, more = await reader.page(thread, newest[0].id, 4)
    assert [m.content for m in older] == ["re m1", "m2", "re m2", "m3"] and more
    oldest, more = await reader.page(thread, older[0].id, 4)
    assert [m.content for m in oldest] == ["m0", "re m0", "m1"] and not more


async def test_context_is_the_branch_only(
    drive: Driver, reader: HistoryReader, thread: ThreadId
) -> None:
    _q1, a1 = await drive.turn("one")
    await drive.turn("two")
    e2, _ = await drive.turn("edited", anchor=a1)
    context = await reader.context(thread, e2, 10_000, lambda m: len(m.content))
    assert [m.content for m in context] == ["one", "re one", "edited"]


async def test_a_thread_written_before_trees_reads_as_one_line_and_branches(
    drive: Driver, reader: HistoryReader, thread: ThreadId, redis: Any
) -> None:
    old = []
    for i, role in enumerate(["user", "assistant", "user", "assistant"]):
        message = Message(
            id="", role=role, content=f"old{i}", user_id="u", created_at=1, status="complete"
        )  # type: ignore[arg-type]
        flat = entry_fields(message)  # no parent field: the old format
        old.append(
            await redis.xadd(keys.history(thread), dict(zip(flat[::2], flat[1::2], strict=True)))
        )
    page, _ = await reader.page(thread, None, 50)
    assert [m.parent_id for m in page] == [None, *old[:3]]
    assert [m.siblings for m in page] == [(i,) for i in old]
    # Continuing it follows the old leaf; an edit of old2 branches under old1.
    q, _ = await drive.turn("new")
    assert await path(reader, thread) == ["old0", "old1", "old2", "old3", "new", "re new"]
    e, e_reply = await drive.turn("old2 edited", anchor=old[1])
    page, _ = await reader.page(thread, None, 50)
    assert [m.content for m in page] == ["old0", "old1", "old2 edited", "re old2 edited"]
    assert page[2].siblings == (old[2], e) and page[1].siblings == (old[1],)
    assert await drive.switch(old[2]) != e
    assert await path(reader, thread) == ["old0", "old1", "old2", "old3", "new", "re new"]
    assert await drive.switch(old[0]) == e_reply
    second_root, _ = await drive.turn("root", anchor="-")
    page, _ = await reader.page(thread, None, 50)
    assert page[0].siblings == (old[0], second_root)
    assert q


async def write_old_line(redis: Any, thread: ThreadId, count: int) -> list[str]:
    """``count`` messages in the history format from before trees (no parent)."""
    old = []
    for i in range(count):
        message = Message(
            id="", role="user" if i % 2 == 0 else "assistant", content=f"old{i}", user_id="u",
            created_at=1, status="complete",
        )  # fmt: skip
        flat = entry_fields(message)
        old.append(
            await redis.xadd(keys.history(thread), dict(zip(flat[::2], flat[1::2], strict=True)))
        )
    return old


async def every_read(reader: HistoryReader, thread: ThreadId, ids: list[str]) -> list[Any]:
    """Each message's branch up to it and the page before it."""
    reads: list[Any] = [await reader.page(thread, None, 50)]
    for i in ids:
        reads.append(await reader.page(thread, None, 50, leaf=i))
        reads.append(await reader.page(thread, i, 2))
    return reads


async def test_linking_a_thread_written_before_trees_changes_no_read(
    drive: Driver, reader: HistoryReader, thread: ThreadId, redis: Any, scripts: Scripts
) -> None:
    old = await write_old_line(redis, thread, 4)
    q, r = await drive.turn("new")
    e, er = await drive.turn("old2 edited", anchor=old[1])
    root, rr = await drive.turn("root", anchor="-")
    everything = [*old, q, r, e, er, root, rr]
    before = await every_read(reader, thread, everything)
    last_id = (await redis.xinfo_stream(keys.history(thread)))["last-generated-id"]

    linked = await scripts.link_legacy(keys=[keys.history(thread), keys.tree(thread)])
    assert linked == "linked"
    assert await every_read(reader, thread, everything) == before
    entries = await redis.xrange(keys.history(thread))
    assert [i for i, _ in entries] == everything
    assert [f["parent"] for i, f in entries[:4]] == ["", *old[:3]]
    assert await redis.hget(keys.tree(thread), "legacy") is None
    assert (await redis.xinfo_stream(keys.history(thread)))["last-generated-id"] == last_id
    # The same newest leaves; once linked, nothing more to do.
    assert await drive.switch(old[2]) == r and await drive.switch(old[1]) == er
    assert await scripts.link_legacy(keys=[keys.history(thread), keys.tree(thread)]) == "linked"
    # A message without parent after linked ones (an old pod's, mid-upgrade): left alone.
    flat = entry_fields(user_message("late"))
    await redis.xadd(keys.history(thread), dict(zip(flat[::2], flat[1::2], strict=True)))
    assert await scripts.link_legacy(keys=[keys.history(thread), keys.tree(thread)]) == "mixed"


async def test_linking_a_thread_never_written_since_trees(
    drive: Driver, reader: HistoryReader, thread: ThreadId, redis: Any, scripts: Scripts
) -> None:
    old = await write_old_line(redis, thread, 3)
    before = await every_read(reader, thread, old)
    assert await scripts.link_legacy(keys=[keys.history(thread), keys.tree(thread)]) == "linked"
    assert await every_read(reader, thread, old) == before
    assert await drive.switch(old[0]) == old[2]
    await drive.turn("next")
    assert await path(reader, thread) == ["old0", "old1", "old2", "next", "re next"]


async def test_refusals_write_nothing(
    store: TurnStore, lock: TurnLock, drive: Driver, thread: ThreadId, redis: Any
) -> None:
    q1, _a1 = await drive.turn("one")
    before = await snapshot(redis, thread)
    tree = await redis.hgetall(keys.tree(thread))
    lease = await lock.acquire(thread)
    assert lease is not None
    with pytest.raises(NotFound):
        await store.begin(thread, lease, user_message(), loading(thread, "x"), POD, "99-9")
    with pytest.raises(NotFound):
        await store.begin(thread, lease, None, loading(thread, "x"), POD, "99-9")
    with pytest.raises(NotFound):
        await store.switch(thread, lease, "99-9")
    await lock.release(thread, lease)
    assert await snapshot(redis, thread) == before
    assert await redis.hgetall(keys.tree(thread)) == tree
    # A regenerate of a reply to no user message (an assistant root).
    lease = await lock.acquire(thread)
    assert lease is not None
    begun = await store.begin(thread, lease, None, loading(thread, "r"), POD, q1)
    assert isinstance(begun, Begun)
    with pytest.raises(ThreadBusy):  # a switch waits for the turn's end
        await store.switch(thread, lease, q1)
    await store.end(thread, lease, assistant_message("x"), done(thread, "r"))
    orphan = await redis.xadd(
        keys.history(thread), {"parent": "", "role": "assistant", "content": "lone"}
    )
    lease = await lock.acquire(thread)
    assert lease is not None
    with pytest.raises(InvalidRequest):
        await store.begin(thread, lease, None, loading(thread, "y"), POD, orphan)
    with pytest.raises(NotFound):
        await HistoryReader(redis, Scripts(redis)).page(thread, None, 5, "99-9")
