"""Read markers, unread counts, thread cards and auto-titles on the real
scripts (fakeredis with Lua): what a member's inbox shows as a thread moves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from app.chat import keys
from app.chat.inbox import Inbox, parse_notice
from app.chat.keys import ThreadId, UserId
from app.chat.lock import TurnLock
from app.chat.records import Done, Loading, Message, ThreadCard
from app.chat.scripts import Scripts
from app.chat.threads import Threads
from app.chat.titles import AutoTitles
from app.chat.turns import Begun, TurnStore
from app.llm import LLMError, ToolCall, ToolSpec, Usage
from app.llm.fake import FakeModel

OWNER, GUEST = UserId("owner"), UserId("guest")


async def turn(
    store: TurnStore, lock: TurnLock, thread: ThreadId, user: str, n: int, anchor: str = ""
) -> tuple[str, str]:
    lease = await lock.acquire(thread)
    assert lease is not None
    ask = Message("", "user", f"question {n}", user, n, "complete")
    begun = await store.begin(thread, lease, ask, Loading(thread, f"g{n}", "fake"), "p", anchor)
    assert isinstance(begun, Begun), begun
    reply = Message("", "assistant", f"answer {n}", "assistant", n, "complete")
    ended = await store.end(thread, lease, reply, Done(thread, f"g{n}", "complete"))
    assert ended is not None
    return begun.message_id, ended.message_id


async def card(inbox: Inbox, thread: ThreadId, user: UserId) -> ThreadCard:
    (found,) = await inbox.cards(user, [(thread, 0)])
    return found


def test_the_scripts_name_the_keys_and_channels_app_chat_keys_names() -> None:
    t, u = keys.thread_id("T"), keys.user_id("u@x")
    assert keys.reads(t) == keys.meta(t)[: -len("meta")] + "reads"
    assert keys.roles(t) == keys.meta(t)[: -len("meta")] + "roles"
    assert keys.user_inbox(u) == "chat:user:{u@x}:inbox"
    assert keys.user_of_inbox(keys.user_inbox(u)) == u
    assert keys.user_of_inbox(keys.live(t)) is None


async def test_unread_follows_the_active_branch_and_the_read_marker(
    redis: Any, scripts: Scripts, store: TurnStore, lock: TurnLock
) -> None:
    threads = Threads(redis, scripts)
    inbox = Inbox(redis, scripts, "PUBLISH", "reject", open_access=False)
    thread = keys.thread_id("tree")
    await threads.create(thread, OWNER, "")
    await threads.add_member(thread, OWNER, GUEST)
    first_q, first_a = await turn(store, lock, thread, OWNER, 1)
    # The owner wrote the prompt: the reply is unread for them; both for the guest.
    assert (await card(inbox, thread, OWNER)).unread == 1
    assert (await card(inbox, thread, GUEST)).unread == 2
    await turn(store, lock, thread, GUEST, 2)
    assert (await card(inbox, thread, OWNER)).unread == 3
    assert (await card(inbox, thread, GUEST)).unread == 1  # sending read up to the prompt
    await inbox.read(thread, OWNER, first_a)
    assert (await card(inbox, thread, OWNER)).unread == 2
    await inbox.read(thread, OWNER, first_q)  # never backwards
    assert (await card(inbox, thread, OWNER)).unread == 2
    # An edit of the first prompt: the active branch is the new one, two long.
    await turn(store, lock, thread, OWNER, 3, anchor="-")
    assert (await card(inbox, thread, GUEST)).unread == 2
    owner = await card(inbox, thread, OWNER)
    assert owner.unread == 1 and owner.role == "owner" and not owner.generating
    assert owner.last_message is not None and owner.last_message.preview == "answer 3"
    # A viewer's card says so; a stranger gets none.
    await threads.add_member(thread, OWNER, GUEST, "viewer")
    assert (await card(inbox, thread, GUEST)).role == "viewer"
    assert await inbox.cards(UserId("stranger"), [(thread, 0)]) == []


async def test_cards_are_published_to_each_member_in_the_changing_step(
    redis: Any, scripts: Scripts, store: TurnStore, lock: TurnLock
) -> None:
    threads = Threads(redis, scripts)
    thread = keys.thread_id("cards")
    await threads.create(thread, OWNER, "")
    await threads.add_member(thread, OWNER, GUEST)
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.user_inbox(OWNER), keys.user_inbox(GUEST))
    await turn(store, lock, thread, OWNER, 1)
    await threads.remove_member(thread, OWNER, GUEST)
    got: list[tuple[str, Any]] = []
    async with asyncio.timeout(5):
        while len(got) < 5:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if message is not None:
                got.append((message["channel"], parse_notice(message["data"], "reject")))
    await pubsub.aclose()
    # Turn start and end for both members, then the guest's removal.
    owner_cards = [n for c, n in got if c == keys.user_inbox(OWNER)]
    assert [(n.generating, n.unread) for n in owner_cards] == [(True, 0), (False, 1)]
    assert [n.rev for n in owner_cards] == sorted(n.rev for n in owner_cards)
    guest = [n for c, n in got if c == keys.user_inbox(GUEST)]
    assert [getattr(n, "unread", None) for n in guest[:2]] == [1, 2]
    assert guest[2].reason == "revoked"


class Flaky:
    """A model that always fails: counts how often it is asked."""

    name = provider = "flaky"

    def __init__(self) -> None:
        self.calls = 0

    async def stream(
        self, messages: Sequence[Message], usage: Usage, tools: Sequence[ToolSpec] = ()
    ) -> AsyncIterator[str | ToolCall]:
        self.calls += 1
        raise LLMError("overloaded", retryable=True)
        yield ""  # pragma: no cover

    async def aclose(self) -> None:
        return None


async def test_auto_titles_once_never_over_a_rename_retried_once(
    redis: Any, scripts: Scripts, store: TurnStore, lock: TurnLock
) -> None:
    threads = Threads(redis, scripts)
    titled, renamed, failing = (keys.thread_id(t) for t in ("titled", "renamed", "failing"))
    for thread in (titled, renamed, failing):
        await threads.create(thread, OWNER, "")
        lease = await lock.acquire(thread)
        assert lease is not None
        ask = Message("", "user", "how do sharded channels work in a cluster", OWNER, 1, "complete")
        await store.begin(thread, lease, ask, Loading(thread, "g", "fake"), "p")
        await store.end(thread, lease, Message("", "assistant", "so", "assistant", 1, "complete"),
                        Done(thread, "g", "complete"))  # fmt: skip
    titles = AutoTitles(redis, scripts, threads, FakeModel(3, 0))
    await threads.rename(renamed, OWNER, "Mine")
    for thread in (titled, renamed):
        titles.after_turn(thread)
    flaky = Flaky()
    failing_titles = AutoTitles(redis, scripts, threads, flaky)  # type: ignore[arg-type]
    failing_titles.after_turn(failing)
    async with asyncio.timeout(5):
        await titles.settled()
        await failing_titles.settled()
    assert await redis.hget(keys.meta(titled), "title") == "how do sharded channels work in"
    assert await redis.hget(keys.meta(renamed), "title") == "Mine"
    assert flaky.calls == 2 and await redis.hget(keys.meta(failing), "title") is None
    failing_titles.after_turn(failing)  # a later turn: never tried again
    async with asyncio.timeout(5):
        await failing_titles.settled()
    assert flaky.calls == 2
    # An auto-title that comes after a rename does not overwrite it.
    assert not await threads.auto_title(renamed, "too late")
    await titles.stop()
    await failing_titles.stop()
