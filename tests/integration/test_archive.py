"""The cold tier on real processes: a PostgreSQL of the test's own, a
redis-server, a pod reading through both, and ``durable-chat archiver``
killed -9 at its named points (CHAT_ARCHIVE_CRASH_AT).

What a client reads never changes while messages move: full pages, short
pages walked with ``before``, another branch by ``leaf``, ``has_more`` and
siblings are the same before archiving, after each crash and after the last
sweep; the archive holds every cold message once; the owner's export is
every message ever sent, once, whichever tier holds it, also when a sweep
trims the thread between two of its reads (the pod stops itself there:
CHAT_PAUSE_AT); the model's context still reaches the archived start of a
thread; edits, regenerates and switches reach archived messages; a thread
written before trees is archived along its line; pods archive behind the
reaper's leader lease (CHAT_ARCHIVER_IN_POD); deleting a thread removes
its rows.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest

from app.chat import keys
from app.chat.history import EXPORT_PAGE
from tests import procs
from tests.integration.conftest import require_postgres, require_redis, track_pods
from tests.integration.helpers import Event, get_history, open_ready, read_until, send
from tests.integration.tokens import AUTH_ENV, bearer

pytestmark = pytest.mark.integration

KEEP_HOT = 3
# The password is never checked (trust authentication): it is there to be
# looked for in every output, where it must never appear.
SECRET = "pw-never-logged-7f3a"


@pytest.fixture(scope="module")
def postgres() -> Iterator[procs.PostgresServer]:
    require_postgres()
    workdir = Path(tempfile.mkdtemp(prefix="dc-pg-"))
    os.chmod(workdir, 0o755)
    server = procs.PostgresServer(workdir).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def redis_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[procs.RedisServer]:
    require_redis()
    server = procs.RedisServer(tmp_path_factory.mktemp("archive-redis")).start()
    try:
        yield server
    finally:
        server.stop()


def archive_url(postgres: procs.PostgresServer) -> str:
    return postgres.url.replace("chat@", f"chat:{SECRET}@")


def cli(redis_db: procs.RedisServer, postgres: procs.PostgresServer, *argv: str, **env: Any):
    """``durable-chat ARGV`` against the test's Redis and PostgreSQL."""
    environ = procs.base_env()
    environ.update(
        REDIS_URL=redis_db.url, CHAT_ARCHIVE_URL=archive_url(postgres),
        CHAT_ARCHIVE_AFTER_DAYS="0", CHAT_ARCHIVE_KEEP_HOT=str(KEEP_HOT), CHAT_LOG_LEVEL="INFO",
    )  # fmt: skip
    environ.update({k: str(v) for k, v in env.items()})
    return subprocess.run(
        [sys.executable, "-m", "app", *argv], env=environ, cwd=procs.ROOT,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.fixture(scope="module")
def migrated(redis_db: procs.RedisServer, postgres: procs.PostgresServer) -> str:
    """The schema, by ``durable-chat migrate`` (twice: the second does nothing)."""
    outputs = ""
    for _ in range(2):
        done = cli(redis_db, postgres, "migrate")
        assert done.returncode == 0, done.stderr
        outputs += done.stdout + done.stderr
    assert SECRET not in outputs
    return postgres.url


def running_pod(
    request: pytest.FixtureRequest, workdir: Path, redis_db: procs.RedisServer,
    postgres: procs.PostgresServer, **env: str,
) -> Iterator[procs.Server]:  # fmt: skip
    """A pod reading through to the archive, for the whole module; its log
    never shows the archive's password."""
    server = procs.pod(
        workdir.name, redis_db.url, workdir / "pod.log", CHAT_ARCHIVE_URL=archive_url(postgres),
        CHAT_FAKE_TOKEN_DELAY_MS=1, CHAT_FAKE_REPLY_TOKENS=6, CHAT_RATE_PROMPTS_PER_MIN=0,
        CHAT_LOG_LEVEL="INFO", **env,
    )  # fmt: skip
    track_pods(request).append(server)
    with procs.running([server]):
        yield server
    assert SECRET not in server.logs()


@pytest.fixture(scope="module")
def pod(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
    redis_db: procs.RedisServer, postgres: procs.PostgresServer, migrated: str,
) -> Iterator[procs.Server]:  # fmt: skip
    yield from running_pod(request, tmp_path_factory.mktemp("open"), redis_db, postgres)


def rows(url: str, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


SENT: dict[str, list[Event]] = {}


async def turn(ws: Any, content: str, **extra: Any) -> tuple[Event, Event, Event]:
    """A prompt's user message, reply and ``done``, read past any other
    socket's turn still in this socket's queue (every message is kept in
    SENT, by thread, for the exports)."""
    await send(ws, {"type": "prompt", "content": content, **extra})
    start: list[int] = []
    seen: list[Event] = []

    def ours(event: Event) -> bool:
        assert event["type"] != "error", event
        seen.append(event)
        message = event.get("message", {})
        if not start and message.get("role") == "user" and message.get("content") == content:
            start.append(len(seen) - 1)
        return bool(start) and event["type"] == "done"

    await read_until(ws, ours)
    events = seen[start[0] :]
    done = events[-1]
    messages = [e["message"] for e in events if e["type"] == "message"]
    SENT.setdefault(done["thread_id"], []).extend(messages)
    return messages[0], messages[-1], done


async def export(pod: procs.Server, thread: str, **headers: str) -> list[Event]:
    """The thread's export: its JSON lines, each a message."""
    async with httpx.AsyncClient(base_url=pod.http, timeout=10) as http:
        got = await http.get(f"/v1/threads/{thread}/export", headers=headers)
    assert got.status_code == 200, got.text
    assert got.headers["content-type"] == "application/x-ndjson"
    return [orjson.loads(line) for line in got.text.splitlines()]


def everything_sent(thread: str) -> list[Event]:
    return sorted(SENT[thread], key=lambda m: keys.event_id(m["id"]))


async def views(ws: Any, other_leaf: str) -> list[Any]:
    """Everything a client can read of the thread's history."""
    full = await get_history(ws, limit=100)
    pages = []
    page = await get_history(ws, limit=KEEP_HOT)
    pages.append(page)
    while page["has_more"]:
        page = await get_history(ws, limit=KEEP_HOT, before=page["messages"][0]["id"])
        pages.append(page)
    other = await get_history(ws, leaf=other_leaf, limit=100)
    other_short = await get_history(ws, leaf=other_leaf, limit=2)
    strip = ("messages", "has_more")
    return [{k: p[k] for k in strip} for p in [full, *pages, other, other_short]]


def words(messages: list[Event]) -> int:
    return sum(len(m["content"].split()) for m in messages)


async def test_archiving_killed_anywhere_changes_nothing_a_client_reads(
    pod: procs.Server, redis_db: procs.RedisServer, postgres: procs.PostgresServer
) -> None:
    r = redis_db.client()
    threads = ["cold-tree", "cold-line"]
    ws, _ = await open_ready(pod.ws, threads[0])
    line, _ = await open_ready(pod.ws, threads[1])
    try:
        # A tree: q1 r1 q2 r2, an edit of q2 (e2 r3), then more on that branch.
        _q1, r1, _ = await turn(ws, "one two three")
        _q2, r2, _ = await turn(ws, "four five")
        await turn(ws, "six seven eight", parent_id=r1["id"])
        for i in range(3):
            await turn(ws, f"more words number {i}")
        for i in range(4):
            await turn(line, f"a line of {i} words")
        before = await views(ws, r2["id"])
        line_leaf = (await get_history(line))["messages"][-1]["id"]
        line_before = await views(line, line_leaf)
        lengths = {t: r.xlen(keys.history(keys.thread_id(t))) for t in threads}

        # Killed between the PostgreSQL commit and the Redis trim: one
        # thread's rows are there, nothing left Redis; reads are unchanged.
        crashed = cli(
            redis_db, postgres, "archiver", "--once", CHAT_ARCHIVE_CRASH_AT="after_commit"
        )
        assert crashed.returncode == -9, crashed.stderr
        archived = rows(
            postgres.url, "SELECT thread_id, count(*) FROM archived_messages GROUP BY 1"
        )
        assert len(archived) == 1
        first = archived[0][0]
        assert archived[0][1] == lengths[first] - KEEP_HOT
        assert {t: r.xlen(keys.history(keys.thread_id(t))) for t in threads} == lengths
        assert await views(ws, r2["id"]) == before
        for t in threads:  # messages in both tiers are exported once
            assert await export(pod, t) == everything_sent(t)

        # Killed between two threads: the first is archived again (the same
        # rows) and trimmed, the other is untouched.
        crashed = cli(
            redis_db, postgres, "archiver", "--once", CHAT_ARCHIVE_CRASH_AT="between_threads"
        )
        assert crashed.returncode == -9, crashed.stderr
        assert r.xlen(keys.history(keys.thread_id(first))) == KEEP_HOT
        (other,) = set(threads) - {first}
        assert r.xlen(keys.history(keys.thread_id(other))) == lengths[other]
        assert await views(ws, r2["id"]) == before
        assert await views(line, line_leaf) == line_before

        # The last sweep finishes the job.
        done = cli(redis_db, postgres, "archiver", "--once")
        assert done.returncode == 0, done.stderr
        assert SECRET not in done.stdout + done.stderr + crashed.stderr
        for t in threads:
            assert r.xlen(keys.history(keys.thread_id(t))) == KEEP_HOT
        counted = rows(
            postgres.url,
            "SELECT thread_id, count(*), count(DISTINCT (ms, seq)) FROM archived_messages"
            " GROUP BY 1 ORDER BY 1",
        )
        assert counted == sorted((t, lengths[t] - KEEP_HOT, lengths[t] - KEEP_HOT) for t in threads)
        assert await views(ws, r2["id"]) == before
        assert await views(line, line_leaf) == line_before
        for t in threads:
            assert await export(pod, t) == everything_sent(t)

        # A turn on the archived thread: the model is given the whole branch,
        # archived start included; the new messages are appended in Redis.
        branch = before[0]["messages"]
        q, reply, finished = await turn(ws, "and now something new")
        assert finished["usage"]["input_tokens"] == words(branch) + len(q["content"].split())
        assert q["parent_id"] == branch[-1]["id"]
        assert r.xlen(keys.history(keys.thread_id(threads[0]))) == KEEP_HOT + 2
        after = (await get_history(ws, limit=100))["messages"]
        assert after == [*branch, *after[-2:]] and [m["id"] for m in after[-2:]] == [
            q["id"], reply["id"]
        ]  # fmt: skip
        assert await export(pod, threads[0]) == everything_sent(threads[0])
    finally:
        await ws.close()
        await line.close()

    # Deleting a thread removes its archived rows too.
    async with httpx.AsyncClient(base_url=pod.http, timeout=10) as http:
        assert (await http.delete(f"/v1/threads/{threads[0]}")).status_code == 204
    left = rows(postgres.url, "SELECT DISTINCT thread_id FROM archived_messages")
    assert left == [(threads[1],)]


async def regenerate(ws: Any, message_id: str) -> tuple[Event, Event]:
    """A regenerate's new reply and its ``done``."""
    await send(ws, {"type": "regenerate", "message_id": message_id})
    events = await read_until(ws, lambda e: e["type"] in ("done", "error"))
    assert events[-1]["type"] == "done", events[-1]
    (reply,) = [e["message"] for e in events if e["type"] == "message"]
    return reply, events[-1]


def ids(page: Event) -> list[str]:
    return [m["id"] for m in page["messages"]]


async def test_edit_regenerate_and_switch_reach_archived_messages(
    pod: procs.Server, redis_db: procs.RedisServer, postgres: procs.PostgresServer
) -> None:
    """Tree operations on messages only the archive holds: the new branch is
    appended in Redis, its history reads on into the archive with the right
    siblings, and the model sees that branch."""
    thread = "cold-edits"
    ws, _ = await open_ready(pod.ws, thread)
    try:
        # q1 r1 q2 r2, then q2 edited (e1 re1), then two more turns on it.
        q1, r1, _ = await turn(ws, "first question here")
        q2, r2, _ = await turn(ws, "second question")
        e1, re1, _ = await turn(ws, "second question edited", parent_id=r1["id"])
        l0q, l0r, _ = await turn(ws, "later words zero")
        await turn(ws, "later words one")
        assert cli(redis_db, postgres, "archiver", "--once").returncode == 0
        hot = {e[0] for e in redis_db.client().xrange(keys.history(keys.thread_id(thread)))}
        assert len(hot) == KEEP_HOT and l0r["id"] in hot and l0q["id"] not in hot

        # switch to q2: the branch q1 r1 q2 r2, whose leaf is archived.
        await send(ws, {"type": "switch", "message_id": q2["id"]})
        branch = await read_until(ws, "branch")
        assert branch[-1]["leaf_id"] == r2["id"]
        page = await get_history(ws, limit=100)
        assert ids(page) == [q1["id"], r1["id"], q2["id"], r2["id"]]
        assert page["messages"][2]["siblings"] == [q2["id"], e1["id"]]
        assert page["messages"] == [
            {**m, "siblings": page["messages"][i]["siblings"]}
            for i, m in enumerate([q1, r1, q2, r2])
        ]

        # edit q2 again: a third sibling under r1 (archived), appended in Redis.
        e2, re2, done = await turn(ws, "second question edited twice", parent_id=r1["id"])
        assert e2["parent_id"] == r1["id"] and re2["parent_id"] == e2["id"]
        assert done["usage"]["input_tokens"] == words([q1, r1, e2])
        page = await get_history(ws, limit=100)
        assert ids(page) == [q1["id"], r1["id"], e2["id"], re2["id"]]
        assert page["messages"][2]["siblings"] == [q2["id"], e1["id"], e2["id"]]
        short = await get_history(ws, limit=2, before=e2["id"])
        assert ids(short) == [q1["id"], r1["id"]] and short["has_more"] is False

        # regenerate r1 (archived): a new reply to q1 (archived).
        n1, done = await regenerate(ws, r1["id"])
        assert n1["parent_id"] == q1["id"] and done["usage"]["input_tokens"] == words([q1])
        page = await get_history(ws, limit=100)
        assert ids(page) == [q1["id"], n1["id"]]
        assert page["messages"][1]["siblings"] == [r1["id"], n1["id"]]

        # regenerate l0r (still hot) whose question l0q is archived.
        n2, done = await regenerate(ws, l0r["id"])
        assert n2["parent_id"] == l0q["id"]
        assert done["usage"]["input_tokens"] == words([q1, r1, e1, re1, l0q])
        page = await get_history(ws, limit=100)
        assert ids(page) == [q1["id"], r1["id"], e1["id"], re1["id"], l0q["id"], n2["id"]]
        assert page["messages"][-1]["siblings"] == [l0r["id"], n2["id"]]

        # Ids of no message of the thread are still refused.
        await send(ws, {"type": "regenerate", "message_id": "1-1"})
        error = await read_until(ws, "error")
        assert error[-1]["code"] == "not_found"
        await send(ws, {"type": "switch", "message_id": "1-1"})
        error = await read_until(ws, "error")
        assert error[-1]["code"] == "not_found"
    finally:
        await ws.close()


async def test_a_thread_written_before_trees_is_archived_along_its_line(
    pod: procs.Server, redis_db: procs.RedisServer, postgres: procs.PostgresServer
) -> None:
    """A first-edition thread (history entries without parent links, no tree
    index) is linked, archived with the parents reads gave it, and reads,
    continues and branches as before."""
    thread = "first-edition"
    history = keys.history(keys.thread_id(thread))
    ws, _ = await open_ready(pod.ws, thread)  # its meta, as any thread's
    await ws.close()
    r = redis_db.client()
    old = [
        r.xadd(history, {
            "role": "user" if i % 2 == 0 else "assistant", "content": f"old words {i}",
            "user_id": "anonymous", "status": "complete", "created_at": str(1000 + i),
        })
        for i in range(7)
    ]  # fmt: skip
    assert not r.exists(keys.tree(keys.thread_id(thread)))
    ws, _ = await open_ready(pod.ws, thread)
    try:
        before = await views(ws, old[3])
        line = before[0]["messages"]
        assert [(m["id"], m["parent_id"]) for m in line] == list(
            zip(old, [None, *old[:-1]], strict=True)
        )

        assert cli(redis_db, postgres, "archiver", "--once").returncode == 0
        assert r.xlen(history) == KEEP_HOT
        archived = rows(
            postgres.url, "SELECT ms, seq, parent_ms, parent_seq FROM archived_messages"
            " WHERE thread_id = %s ORDER BY ms, seq", thread,
        )  # fmt: skip
        cold = len(old) - KEEP_HOT
        assert [f"{a}-{b}" for a, b, _, _ in archived] == old[:cold]
        assert [p and f"{p}-{s}" for _, _, p, s in archived] == [None, *old[: cold - 1]]
        assert await views(ws, old[3]) == before
        exported = await export(pod, thread)
        assert [(m["id"], m["parent_id"], m["content"]) for m in exported] == [
            (m["id"], m["parent_id"], m["content"]) for m in line
        ]  # fmt: skip

        # It goes on (the model sees the whole line) and branches.
        q, _, done = await turn(ws, "new words")
        assert q["parent_id"] == old[-1]
        assert done["usage"]["input_tokens"] == words(line) + 2
        e, _, _ = await turn(ws, "edited words", parent_id=old[0])
        page = await get_history(ws, limit=100)
        assert ids(page)[:2] == [old[0], e["id"]]
        assert page["messages"][1]["siblings"] == [old[1], e["id"]]
    finally:
        await ws.close()


async def stopped(pid: int) -> None:
    """Wait until the process has stopped itself (state T in /proc)."""

    def state() -> str:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]

    for _ in range(500):
        if state() == "T":
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop itself")


ADMIN = "root-admin"
MARKER = "zq-private-words"


@pytest.fixture(scope="module")
def auth_pod(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
    redis_db: procs.RedisServer, postgres: procs.PostgresServer, migrated: str,
) -> Iterator[procs.Server]:  # fmt: skip
    """With authentication, and stopping itself (SIGSTOP) between its first
    export's first read and its next, until the test continues it."""
    yield from running_pod(
        request, tmp_path_factory.mktemp("auth"), redis_db, postgres,
        **AUTH_ENV, CHAT_ADMIN_USERS=ADMIN, CHAT_PAUSE_AT="export_read",
    )  # fmt: skip


async def test_an_export_racing_the_first_sweep_gives_every_message_once(
    auth_pod: procs.Server, redis_db: procs.RedisServer, postgres: procs.PostgresServer
) -> None:
    """The pod has read the first page of a thread's history (more than a
    page of messages, none archived yet) when the archiver's first sweep of
    the thread copies and trims it past that page (the pod stops itself
    there: CHAT_PAUSE_AT); the export then goes on, and still gives every
    message once."""
    thread, owner = "export-race", "racer"
    history = keys.history(keys.thread_id(thread))
    ws, _ = await open_ready(auth_pod.ws, thread, additional_headers=bearer(owner))
    try:
        for i in range((EXPORT_PAGE + KEEP_HOT) // 2 + 4):
            await turn(ws, f"racing words {i}")
    finally:
        await ws.close()
    r = redis_db.client()
    assert r.xlen(history) > EXPORT_PAGE + KEEP_HOT + 1
    assert not rows(postgres.url, "SELECT 1 FROM archived_messages WHERE thread_id = %s", thread)

    exporting = asyncio.create_task(export(auth_pod, thread, **bearer(owner)))
    await stopped(auth_pod.pid)
    try:
        swept = await asyncio.to_thread(cli, redis_db, postgres, "archiver", "--once")
        assert swept.returncode == 0, swept.stderr
        # Trimmed past the page the export has read.
        assert r.xlen(history) == KEEP_HOT
    finally:
        os.kill(auth_pod.pid, signal.SIGCONT)
    assert await exporting == everything_sent(thread)


# How to read each kind of key whole.
READS: dict[str, tuple[Any, ...]] = {
    "string": ("get",), "hash": ("hgetall",), "set": ("smembers",),
    "zset": ("zrange", 0, -1), "list": ("lrange", 0, -1), "stream": ("xrange",),
}  # fmt: skip


def everything_in_redis(r: Any) -> str:
    """Every key of the Redis and every value it holds, as one text."""
    dump = []
    for key in r.scan_iter(count=1000):
        read, *args = READS[r.type(key)]
        dump.append(f"{key} {getattr(r, read)(key, *args)}")
    return "\n".join(dump)


async def test_erasing_a_user_leaves_nothing_of_theirs_in_either_tier(
    auth_pod: procs.Server, redis_db: procs.RedisServer, postgres: procs.PostgresServer
) -> None:
    alice, bob = "alice-e", "bob-e"
    own, _ = await open_ready(auth_pod.ws, "b-own", additional_headers=bearer(bob))
    shared, _ = await open_ready(auth_pod.ws, "shared-e", additional_headers=bearer(alice))
    async with httpx.AsyncClient(base_url=auth_pod.http, timeout=10) as http:
        added = await http.put(f"/v1/threads/shared-e/members/{bob}", headers=bearer(alice))
        assert added.status_code == 204
    as_bob, _ = await open_ready(auth_pod.ws, "shared-e", additional_headers=bearer(bob))
    try:
        for i in range(2):
            await turn(own, f"{MARKER} mine {i}")
        await turn(shared, "hello from alice")
        for i in range(2):
            await turn(as_bob, f"{MARKER} in the shared thread {i}")
            await turn(shared, f"alice again {i}")
        await turn(shared, "alice at the end")
        before = (await get_history(shared, limit=100))["messages"]
    finally:
        for ws in (own, shared, as_bob):
            await ws.close()
    # Bob's second prompt is archived, the model's reply to it is still hot.
    assert cli(redis_db, postgres, "archiver", "--once").returncode == 0
    assert rows(postgres.url, "SELECT count(*) FROM archived_messages WHERE user_id = %s", bob)[
        0
    ][0] == 3  # fmt: skip

    async with httpx.AsyncClient(base_url=auth_pod.http, timeout=30) as http:
        refused = await http.delete(f"/v1/users/{bob}/data", headers=bearer(alice))
        assert refused.status_code == 403
        erased = await http.delete(f"/v1/users/{bob}/data", headers=bearer(ADMIN))
    assert erased.status_code == 200, erased.text
    report = erased.json()
    assert report["user_id"] == bob and report["threads_deleted"] == 1
    assert report["memberships_removed"] == 1 and report["user_keys_deleted"] >= 1
    # Bob's two prompts in the shared thread and the model's two replies.
    assert report["messages_erased"] + report["archived_messages_erased"] == 4

    stored = everything_in_redis(redis_db.client())
    assert bob not in stored and MARKER not in stored
    left = rows(
        postgres.url,
        "SELECT thread_id, ms FROM archived_messages WHERE user_id = %s OR content LIKE %s"
        " OR thread_id = 'b-own'",
        bob, f"%{MARKER}%",
    )  # fmt: skip
    assert left == []

    # Alice's thread keeps its shape: the same messages, bob's now blank.
    viewer, _ = await open_ready(auth_pod.ws, "shared-e", additional_headers=bearer(alice))
    try:
        after = (await get_history(viewer, limit=100))["messages"]
    finally:
        await viewer.close()
    assert [(m["id"], m["parent_id"]) for m in after] == [
        (m["id"], m["parent_id"]) for m in before
    ]  # fmt: skip
    blank = [m for m in after if m["content"] == ""]
    assert len(blank) == 4 and all(m["user_id"] == "" for m in blank)
    assert [m for m in after if m["content"]] == [
        m for m in before if MARKER not in m["content"]
    ]  # fmt: skip


async def test_retention_deletes_idle_threads_from_both_tiers(
    request: pytest.FixtureRequest, pod: procs.Server, redis_db: procs.RedisServer,
    postgres: procs.PostgresServer,
) -> None:  # fmt: skip
    thread = "expiring"
    ws, _ = await open_ready(pod.ws, thread)
    try:
        for i in range(KEEP_HOT + 1):
            await turn(ws, f"soon gone {i}")
    finally:
        await ws.close()
    assert cli(redis_db, postgres, "archiver", "--once").returncode == 0
    assert rows(postgres.url, "SELECT 1 FROM archived_messages WHERE thread_id = %s", thread)

    # Every thread is older than a millisecond: all of them go, counted.
    port = procs.free_port()
    environ = procs.base_env()
    environ.update(
        REDIS_URL=redis_db.url, CHAT_ARCHIVE_URL=archive_url(postgres), CHAT_LOG_LEVEL="INFO",
        CHAT_RETENTION_DAYS="0.00000001", CHAT_ARCHIVE_INTERVAL_S="0.2",
    )  # fmt: skip
    archiver = procs.Server(
        "archiver", [sys.executable, "-m", "app", "archiver", "--metrics-port", str(port)],
        environ, port, Path(postgres.workdir) / "archiver.log", ready_path="/metrics",
    )  # fmt: skip
    track_pods(request).append(archiver)
    with procs.running([archiver]):
        expired = procs.wait_until(
            lambda: expired_count(port), 30, what="the archiver's threads_expired counter"
        )
    output = archiver.logs()
    r = redis_db.client()
    assert expired >= 1
    assert f"thread {thread} deleted by retention" in output and SECRET not in output
    assert rows(postgres.url, "SELECT thread_id FROM archived_messages") == []
    left = [k for k in r.scan_iter(match=f"chat:{{{thread}}}:*") if not k.endswith(":fence")]
    assert left == []
    assert not r.zscore(keys.user_threads(keys.user_id("anonymous")), thread)


def counter(url: str, name: str) -> float:
    """A counter as a process serves it on /metrics (0 until up)."""
    try:
        body = httpx.get(f"{url}/metrics", timeout=2).text
    except httpx.HTTPError:
        return 0
    for line in body.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return 0


def expired_count(port: int) -> float:
    return counter(f"http://127.0.0.1:{port}", "durable_chat_threads_expired_total")


async def test_pods_archive_behind_the_reapers_leader_lease(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
    postgres: procs.PostgresServer, migrated: str,
) -> None:  # fmt: skip
    """CHAT_ARCHIVER_IN_POD: of two pods (on a Redis of their own), the one
    whose reaper holds the leader lease archives; the other never does."""
    workdir = tmp_path_factory.mktemp("in-pod")
    redis = procs.RedisServer(workdir / "redis").start()
    try:
        settings = dict(
            CHAT_ARCHIVE_URL=archive_url(postgres), CHAT_ARCHIVER_IN_POD=1,
            CHAT_ARCHIVE_AFTER_DAYS=0, CHAT_ARCHIVE_KEEP_HOT=KEEP_HOT, CHAT_ARCHIVE_INTERVAL_S=0.1,
            CHAT_FAKE_TOKEN_DELAY_MS=1, CHAT_FAKE_REPLY_TOKENS=6, CHAT_RATE_PROMPTS_PER_MIN=0,
            CHAT_LOG_LEVEL="INFO",
        )  # fmt: skip
        pods = [
            procs.pod(f"in-pod-{i}", redis.url, workdir / f"pod{i}.log", **settings)
            for i in range(2)
        ]
        track_pods(request).extend(pods)
        thread = "in-pod"
        history = keys.history(keys.thread_id(thread))
        with procs.running(pods):
            ws, _ = await open_ready(pods[1].ws, thread)
            try:
                for i in range(4):
                    await turn(ws, f"archived by a pod {i}")
            finally:
                await ws.close()
            r = redis.client()
            cold = 8 - KEEP_HOT
            for _ in range(300):
                archived = rows(
                    postgres.url, "SELECT count(*) FROM archived_messages WHERE thread_id = %s",
                    thread,
                )[0][0]  # fmt: skip
                if archived == cold and r.xlen(history) == KEEP_HOT:
                    break
                await asyncio.sleep(0.05)
            assert (archived, r.xlen(history)) == (cold, KEEP_HOT)
            leader = r.get(keys.REAPER_LEADER)
            counts = {
                f"pod:{p.name}": counter(p.http, "durable_chat_archived_messages_total")
                for p in pods
            }
        assert counts == {name: cold if name == leader else 0 for name in counts}, counts
    finally:
        redis.stop()


def test_a_history_page_is_primary_key_lookups_only(migrated: str) -> None:
    """The page query on a thread among many: PostgreSQL plans it on the
    primary key, never a scan of the table."""
    from app.chat.archive import PAGE_QUERY

    with psycopg.connect(migrated) as conn:
        conn.execute(
            "INSERT INTO archived_messages (thread_id, ms, seq, parent_ms, parent_seq, role,"
            " content, user_id, created_at, status)"
            " SELECT 'plan-' || (i % 50), i, 0, CASE WHEN i >= 50 THEN i - 50 END,"
            " CASE WHEN i >= 50 THEN 0 END, 'user', 'words', 'u', i, 'complete'"
            " FROM generate_series(1, 20000) AS i"
        )
        conn.execute("ANALYZE archived_messages")
        params = {"thread": "plan-7", "ms": 19957, "seq": 0, "limit": 50}
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + PAGE_QUERY, params).fetchall())
        walked = conn.execute(PAGE_QUERY, params).fetchall()
        conn.execute("DELETE FROM archived_messages WHERE thread_id LIKE 'plan-%'")
    assert len(walked) == 50 and [r[0] for r in walked] == list(range(19957, 19957 - 2500, -50))
    assert "archived_messages_pkey" in plan and "Seq Scan" not in plan, plan
