"""Erasing a user while they are connected, on real processes: two pods on
one redis-server and a PostgreSQL of the test's own (the archive's fixtures
and scan helpers, tests/integration/test_archive.py).

The user has a thread socket open on one pod, their user socket and an
event stream on the other, a prompt of theirs waits in a thread's queue
behind someone else's running turn, the thread's auto-title was made from
their first prompt, and that prompt is already archived. Erasing them
closes both sockets (1008) and ends the stream, drops the queued prompt so
that it never runs, clears the title, and leaves nothing of theirs in
either store. A reply being generated to them is stopped and redacted.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from app.chat import keys
from tests import procs
from tests.integration import test_archive
from tests.integration.conftest import track_pods
from tests.integration.helpers import (
    REFUSED,
    close_code,
    expect,
    expect_quiet,
    open_ready,
    read_until,
    refusal,
    send,
)
from tests.integration.sse import open_stream
from tests.integration.test_archive import archive_url, cli, everything_in_redis, rows
from tests.integration.tokens import AUTH_ENV, bearer

pytestmark = pytest.mark.integration

# The archive tests' module fixtures, for this module's own servers.
postgres = test_archive.postgres
redis_db = test_archive.redis_db
migrated = test_archive.migrated

ADMIN = "erase-admin"
BOB = "bob-gone-7q"
ALICE = "alice-stays"
MARKER = "qx-bob-private"


@pytest.fixture(scope="module")
def pods(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
    redis_db: procs.RedisServer, postgres: procs.PostgresServer, migrated: str,
) -> Iterator[list[procs.Server]]:  # fmt: skip
    """Two pods with authentication, an admin, the archive, and the tests'
    ``slow`` tool (a turn that holds its thread as long as a test needs)."""
    workdir: Path = tmp_path_factory.mktemp("erase")
    settings = {
        **AUTH_ENV, "CHAT_ADMIN_USERS": ADMIN, "CHAT_ARCHIVE_URL": archive_url(postgres),
        "CHAT_TOOLS": "tests.integration.pod_tools",
        "DURABLE_CHAT_TEST_TOOL_LOG": str(workdir / "tools.log"),
        "CHAT_FAKE_TOKEN_DELAY_MS": 1, "CHAT_FAKE_REPLY_TOKENS": 6,
        "CHAT_RATE_PROMPTS_PER_MIN": 0, "CHAT_LOG_LEVEL": "INFO",
    }  # fmt: skip
    made = [
        procs.pod(f"erase{i}", redis_db.url, workdir / f"pod{i}.log", **settings) for i in range(2)
    ]
    track_pods(request).extend(made)
    with procs.running(made) as started:
        yield started


def is_queued(event: dict[str, Any]) -> bool:
    return event["type"] == "queued"


async def title_of(http: httpx.AsyncClient, thread: str) -> str:
    got = await http.get(f"/v1/threads/{thread}", headers=bearer(ALICE))
    assert got.status_code == 200, got.text
    return str(got.json()["title"])


async def test_erasing_a_connected_user_closes_drops_clears_and_leaves_nothing(
    pods: list[procs.Server], redis_db: procs.RedisServer, postgres: procs.PostgresServer
) -> None:
    a, b = pods
    thread = "erase-shared"
    r = redis_db.client()
    alice, _ = await open_ready(a.ws, thread, additional_headers=bearer(ALICE))
    http = httpx.AsyncClient(base_url=a.http, timeout=30)
    on_b = AsyncExitStack()
    try:
        patched = await http.patch(
            f"/v1/threads/{thread}", json={"prompt_policy": "queue"}, headers=bearer(ALICE)
        )
        assert patched.status_code == 200, patched.text
        added = await http.put(f"/v1/threads/{thread}/members/{BOB}", headers=bearer(ALICE))
        assert added.status_code == 204, added.text
        bob_thread, _ = await open_ready(a.ws, thread, additional_headers=bearer(BOB))
        bob_user = await websockets.connect(
            f"{b.ws}/v1/ws", additional_headers=bearer(BOB), open_timeout=10, max_queue=None
        )
        await expect(bob_user, "inbox")
        b_http = await on_b.enter_async_context(httpx.AsyncClient(base_url=b.http, timeout=30))
        bob_sse = await on_b.enter_async_context(open_stream(b_http, thread, headers=bearer(BOB)))
        await bob_sse.until("ready")

        # Bob's first prompt names the thread (the fake model: its first six
        # words), and is archived with everything but the newest message.
        await send(bob_thread, {"type": "prompt", "content": f"{MARKER} names this thread"})
        await read_until(bob_thread, "done")
        card = await read_until(bob_user, lambda e: e["type"] == "thread" and e["thread"]["title"])
        assert MARKER in card[-1]["thread"]["title"]
        archived = cli(redis_db, postgres, "archiver", "--once", CHAT_ARCHIVE_KEEP_HOT="1")
        assert archived.returncode == 0, archived.stderr
        assert rows(postgres.url, "SELECT 1 FROM archived_messages WHERE user_id = %s", BOB)

        # Alice's turn holds the thread (in its tool); Bob's prompt waits behind it.
        await send(alice, {"type": "prompt", "content": '/tool slow {"seconds": 30}'})
        await read_until(alice, "tool_call")
        await send(bob_thread, {"type": "prompt", "content": f"{MARKER} never runs"})
        queue_id = (await read_until(bob_thread, is_queued))[-1]["queue_id"]

        erased = await http.delete(f"/v1/users/{BOB}/data", headers=bearer(ADMIN))
        assert erased.status_code == 200, erased.text
        report = erased.json()
        assert report["sockets_closed"] == 3 and report["queued_prompts_dropped"] == 1
        assert report["titles_cleared"] == 1 and report["memberships_removed"] == 1
        # Bob's first prompt (archived) and the model's reply to it (hot).
        assert report["messages_erased"] == 1 and report["archived_messages_erased"] == 1

        # Both of Bob's sockets close 1008, on both pods, and his event stream ends.
        for ws in (bob_thread, bob_user):
            _, code = await close_code(ws)
            assert code == 1008
        with pytest.raises(EOFError):
            while True:
                await bob_sse.next()
        unqueued = await read_until(alice, "unqueued")
        assert unqueued[-1]["queue_id"] == queue_id and unqueued[-1]["reason"] == "revoked"

        # Alice's turn ends; Bob's prompt never runs: nothing starts after it.
        await send(alice, {"type": "cancel"})
        done = (await read_until(alice, "done"))[-1]
        assert done["status"] == "cancelled"
        await expect_quiet(alice)
        assert not r.exists(keys.queue(keys.thread_id(thread)))
        assert not r.exists(keys.turn(keys.thread_id(thread)))
        assert await title_of(http, thread) == ""
        history = (await http.get(f"/v1/threads/{thread}/messages", headers=bearer(ALICE))).json()
        messages = history["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
        assert [(m["user_id"], m["content"]) for m in messages[:2]] == [("", ""), ("", "")]
        assert messages[2]["user_id"] == ALICE and BOB not in str(messages)

        # Nothing of Bob's in either store (the sockets' leases and presence
        # go as their pods finish closing them).
        procs.wait_until(
            lambda: BOB not in (stored := everything_in_redis(r)) and MARKER not in stored,
            10, what="Redis to hold nothing of the erased user",
        )  # fmt: skip
        left = rows(
            postgres.url,
            "SELECT thread_id, ms FROM archived_messages WHERE user_id = %s OR content LIKE %s",
            BOB, f"%{MARKER}%",
        )  # fmt: skip
        assert left == []

        # Reconnecting does not bring anything back: the thread is no longer his.
        assert (
            await refusal(f"{b.ws}/v1/threads/{thread}/ws", additional_headers=bearer(BOB))
            in REFUSED
        )
    finally:
        await alice.close()
        await http.aclose()
        await on_b.aclose()


async def test_erasing_oneself_mid_reply_stops_the_reply_and_redacts_it(
    pods: list[procs.Server], redis_db: procs.RedisServer
) -> None:
    """A reply still being generated to the erased user is cancelled and
    waited for, then redacted with their prompt: no reply made from their
    text is committed after the erase. Any user may erase themself."""
    a, b = pods
    carol, thread = "carol-gone-3k", "erase-running"
    alice, _ = await open_ready(a.ws, thread, additional_headers=bearer(ALICE))
    http = httpx.AsyncClient(base_url=a.http, timeout=30)
    try:
        added = await http.put(f"/v1/threads/{thread}/members/{carol}", headers=bearer(ALICE))
        assert added.status_code == 204, added.text
        mine, _ = await open_ready(b.ws, thread, additional_headers=bearer(carol))
        await send(mine, {"type": "prompt", "content": '/tool slow {"seconds": 30}'})
        await read_until(mine, "tool_call")

        erased = await http.delete(f"/v1/users/{carol}/data", headers=bearer(carol))
        assert erased.status_code == 200, erased.text
        assert erased.json()["messages_erased"] == 2
        _, code = await close_code(mine)
        assert code == 1008
        done = (await read_until(alice, "done"))[-1]
        assert done["status"] == "cancelled"
        t = keys.thread_id(thread)
        assert not redis_db.client().exists(keys.turn(t))
        history = (await http.get(f"/v1/threads/{thread}/messages", headers=bearer(ALICE))).json()
        assert [(m["role"], m["user_id"], m["content"]) for m in history["messages"]] == [
            ("user", "", ""), ("assistant", "", "")
        ]  # fmt: skip
        assert history["messages"][1]["status"] == "cancelled"
        assert not history["messages"][1].get("tool_calls")
    finally:
        await alice.close()
        await http.aclose()


async def test_a_pods_kept_context_forgets_an_erased_users_words(
    pods: list[procs.Server],
) -> None:
    """A pod keeps each thread's model context from turn to turn
    (app.chat.contexts); the fake model counts its context's words as the
    turn's input tokens. Turn after turn on the same pod, the kept context is
    the branch as stored; after an erasure, the next turn no longer counts
    the erased user's words."""
    a, _ = pods
    thread, carol = "erase-kept-context", "carol-erased"
    alice, _ = await open_ready(a.ws, thread, additional_headers=bearer(ALICE))
    http = httpx.AsyncClient(base_url=a.http, timeout=30, headers=bearer(ALICE))

    async def prompt(ws: Any, content: str) -> int:
        """The input tokens of the turn ``content`` starts, once Alice saw it end."""
        await send(ws, {"type": "prompt", "content": content})
        return int((await read_until(alice, "done"))[-1]["usage"]["input_tokens"])

    async def words_before_the_reply() -> int:
        page = (await http.get(f"/v1/threads/{thread}/messages")).json()["messages"]
        return sum(len(m["content"].split()) for m in page[:-1])

    try:
        added = await http.put(f"/v1/threads/{thread}/members/{carol}")
        assert added.status_code == 204, added.text
        theirs, _ = await open_ready(a.ws, thread, additional_headers=bearer(carol))
        await prompt(theirs, f"{MARKER} " * 40)
        for n in range(3):  # the same pod: from the second on, a kept context
            assert await prompt(alice, f"alice {n}") == await words_before_the_reply()
        erased = await http.delete(f"/v1/users/{carol}/data", headers=bearer(ADMIN))
        assert erased.status_code == 200 and erased.json()["messages_erased"] == 2
        counted = await prompt(alice, "alice again")
        assert counted == await words_before_the_reply() and MARKER not in str(
            (await http.get(f"/v1/threads/{thread}/messages")).json()
        )
    finally:
        await alice.close()
        await http.aclose()
