"""The cold tier on real processes: a PostgreSQL of the test's own, a
redis-server, a pod reading through both, and ``durable-chat archiver``
killed -9 at its named points (CHAT_ARCHIVE_CRASH_AT).

What a client reads never changes while messages move: full pages, short
pages walked with ``before``, another branch by ``leaf``, ``has_more`` and
siblings are the same before archiving, after each crash and after the last
sweep; the archive holds every cold message once; the model's context still
reaches the archived start of a thread; deleting a thread removes its rows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from app.chat import keys
from tests import procs
from tests.integration.conftest import require_postgres, require_redis, track_pods
from tests.integration.helpers import Event, get_history, open_ready, read_until, send

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


@pytest.fixture(scope="module")
def pod(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
    redis_db: procs.RedisServer, postgres: procs.PostgresServer, migrated: str,
) -> Iterator[procs.Server]:  # fmt: skip
    server = procs.pod(
        "pod0", redis_db.url, tmp_path_factory.mktemp("archive") / "pod0.log",
        CHAT_ARCHIVE_URL=archive_url(postgres), CHAT_FAKE_TOKEN_DELAY_MS=1,
        CHAT_FAKE_REPLY_TOKENS=6, CHAT_RATE_PROMPTS_PER_MIN=0, CHAT_LOG_LEVEL="INFO",
    )  # fmt: skip
    track_pods(request).append(server)
    with procs.running([server]):
        yield server
    assert SECRET not in server.logs()


def rows(url: str, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


async def turn(ws: Any, content: str, **extra: Any) -> tuple[Event, Event, Event]:
    """A prompt's user message, reply and ``done``."""
    await send(ws, {"type": "prompt", "content": content, **extra})
    events = await read_until(ws, "done")
    done = events[-1]
    messages = [e["message"] for e in events if e["type"] == "message"]
    return messages[0], messages[-1], done


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
    finally:
        await ws.close()
        await line.close()

    # Deleting a thread removes its archived rows too.
    import httpx

    async with httpx.AsyncClient(base_url=pod.http, timeout=10) as http:
        assert (await http.delete(f"/v1/threads/{threads[0]}")).status_code == 204
    left = rows(postgres.url, "SELECT DISTINCT thread_id FROM archived_messages")
    assert left == [(threads[1],)]
