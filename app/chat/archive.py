"""The cold tier: a thread's archived messages in PostgreSQL.

The archiver (workers.archiver) copies a cold thread's history here, and
history reads (app.chat.history) continue here where Redis's copy ends. This
module owns the table's rows (see app/chat/migrations for the schema), the
pool of connections (bounded by CHAT_ARCHIVE_POOL_SIZE), and
``durable-chat migrate``. Writes are idempotent by message id: a message
archived twice (the archiver crashed before trimming Redis) is one row.

The connection string is a secret: it is handed to psycopg and Alembic and
never formatted into a message, an exception or a log line.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from app.chat import keys
from app.chat.history import tool_use_from_json, tool_use_json
from app.chat.keys import ThreadId, UserId
from app.chat.records import Message, MessageStatus, Role

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# How long a pool waits for PostgreSQL to hand it its first connection, and
# a caller for a free connection of the pool.
CONNECT_TIMEOUT_S = 10.0

_COLUMNS = (
    "ms, seq, parent_ms, parent_seq, role, content, user_id, created_at, status,"
    " client_msg_id, queue_id, usage, tool_calls"
)

# One page of a branch: the path of parent links from a message back towards
# the root, at most %(limit)s messages, newest first. Each step is one lookup
# of the primary key (thread_id, ms, seq): a page costs `limit` index probes
# whatever the size of the thread or the number of its branches.
PAGE_QUERY = f"""
WITH RECURSIVE path AS (
    SELECT {_COLUMNS}, 1 AS depth FROM archived_messages
     WHERE thread_id = %(thread)s AND ms = %(ms)s AND seq = %(seq)s
    UNION ALL
    SELECT m.ms, m.seq, m.parent_ms, m.parent_seq, m.role, m.content, m.user_id,
           m.created_at, m.status, m.client_msg_id, m.queue_id, m.usage, m.tool_calls,
           path.depth + 1
      FROM path JOIN archived_messages m
        ON m.thread_id = %(thread)s AND m.ms = path.parent_ms AND m.seq = path.parent_seq
     WHERE path.depth < %(limit)s
)
SELECT * FROM path ORDER BY depth
"""


class ArchiveMismatch(RuntimeError):
    """What PostgreSQL holds after a commit is not what was written."""


def split_id(message_id: str) -> tuple[int, int]:
    return keys.event_id(message_id)


def _id(ms: int, seq: int) -> str:
    return f"{ms}-{seq}"


def _message(row: dict[str, Any]) -> Message:
    parent = None if row["parent_ms"] is None else _id(row["parent_ms"], row["parent_seq"])
    calls = row["tool_calls"] or []
    return Message(
        id=_id(row["ms"], row["seq"]),
        parent_id=parent,
        role=cast(Role, row["role"]),
        content=row["content"],
        user_id=row["user_id"],
        created_at=row["created_at"],
        status=cast(MessageStatus, row["status"]),
        client_msg_id=row["client_msg_id"],
        queue_id=row["queue_id"],
        usage=row["usage"],
        tool_calls=tuple(tool_use_from_json(c) for c in calls),
    )


def _row(thread: ThreadId, message: Message) -> tuple[object, ...]:
    ms, seq = split_id(message.id)
    parent = split_id(message.parent_id) if message.parent_id else (None, None)
    calls = [tool_use_json(c) for c in message.tool_calls]
    return (
        thread, ms, seq, parent[0], parent[1], message.role, message.content,
        message.user_id, message.created_at, message.status, message.client_msg_id,
        message.queue_id, None if message.usage is None else Jsonb(dict(message.usage)),
        Jsonb(calls) if calls else None,
    )  # fmt: skip


def migrate(url: str) -> None:
    """Bring the archive's schema to the newest revision (``durable-chat migrate``)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["url"] = sqlalchemy_url(url)
    command.upgrade(config, "head")


def sqlalchemy_url(url: str) -> str:
    """The same database for SQLAlchemy (Alembic), through psycopg 3."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


class Archive:
    """The archived messages, through a bounded pool of connections."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, url: str, size: int) -> Archive:
        pool = AsyncConnectionPool(
            url, min_size=1, max_size=size, open=False, timeout=CONNECT_TIMEOUT_S,
            kwargs={"autocommit": True}, name="archive",
        )  # fmt: skip
        await pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    async def store(self, thread: ThreadId, messages: list[Message]) -> None:
        """Write ``messages`` in one transaction (a message already there is
        kept as it is: ids are immutable), then read them back: ArchiveMismatch
        unless every one is there as written."""
        async with self._pool.connection() as conn:
            async with conn.transaction(), conn.cursor() as cur:
                await cur.executemany(
                    f"INSERT INTO archived_messages (thread_id, {_COLUMNS})"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (thread_id, ms, seq) DO NOTHING",
                    [_row(thread, m) for m in messages],
                )
            ids = [split_id(m.id) for m in messages]
            cur2 = await conn.execute(
                "SELECT ms, seq, content, user_id FROM archived_messages"
                " WHERE thread_id = %s AND (ms, seq) IN"
                " (SELECT * FROM unnest(%s::bigint[], %s::bigint[]))",
                (thread, [i[0] for i in ids], [i[1] for i in ids]),
            )
            stored = {(r[0], r[1]): (r[2], r[3]) for r in await cur2.fetchall()}
        wanted = {split_id(m.id): (m.content, m.user_id) for m in messages}
        if stored != wanted:
            raise ArchiveMismatch(f"thread {thread}: {len(stored)} of {len(wanted)} rows match")

    async def path(self, thread: ThreadId, start: str, limit: int) -> tuple[list[Message], bool]:
        """Up to ``limit`` messages of the branch ending at ``start``, root
        side first, and whether older ones exist; empty when ``start`` is
        not archived."""
        ms, seq = split_id(start)
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(PAGE_QUERY, {"thread": thread, "ms": ms, "seq": seq, "limit": limit})
            rows = await cur.fetchall()
        messages = [_message(r) for r in reversed(rows)]
        return messages, bool(messages) and messages[0].parent_id is not None

    async def messages(
        self, thread: ThreadId, after: str | None = None, below: str | None = None
    ) -> AsyncIterator[Message]:
        """The thread's archived messages after ``after`` and below ``below``
        (either end open when None), oldest first (exports)."""
        low = split_id(after) if after else (-1, -1)
        high = split_id(below) if below else None
        bound = "" if high is None else " AND (ms, seq) < (%s, %s)"
        async with self._pool.connection() as conn, conn.transaction():
            cur = conn.cursor("export", row_factory=dict_row)
            await cur.execute(
                f"SELECT {_COLUMNS} FROM archived_messages WHERE thread_id = %s"
                f" AND (ms, seq) > (%s, %s){bound} ORDER BY ms, seq",
                (thread, *low, *(high or ())),
            )
            async for row in cur:
                yield _message(row)

    async def count(self, thread: ThreadId) -> int:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM archived_messages WHERE thread_id = %s", (thread,)
            )
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def delete_thread(self, thread: ThreadId) -> int:
        """Remove every archived message of the thread; how many there were."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "DELETE FROM archived_messages WHERE thread_id = %s", (thread,)
            )
        return cur.rowcount

    async def ids_by(self, user: UserId) -> dict[ThreadId, list[str]]:
        """The ids of every archived message ``user`` wrote, by thread."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT thread_id, ms, seq FROM archived_messages WHERE user_id = %s", (user,)
            )
            found: dict[ThreadId, list[str]] = {}
            for thread, ms, seq in await cur.fetchall():
                found.setdefault(ThreadId(thread), []).append(_id(ms, seq))
        return found

    async def erase_author(self, user: UserId) -> int:
        """Redact every archived message ``user`` wrote, and the model's
        replies to them, in one transaction, as ERASE_AUTHOR does in Redis:
        the rows keep their place in the tree; how many were redacted."""
        async with self._pool.connection() as conn, conn.transaction():
            replies = await conn.execute(
                "UPDATE archived_messages r SET content = '', user_id = '',"
                " client_msg_id = NULL, tool_calls = NULL FROM archived_messages q"
                " WHERE q.user_id = %s AND r.role = 'assistant' AND r.thread_id = q.thread_id"
                " AND r.parent_ms = q.ms AND r.parent_seq = q.seq",
                (user,),
            )
            own = await conn.execute(
                "UPDATE archived_messages SET content = '', user_id = '', client_msg_id = NULL,"
                " tool_calls = NULL WHERE user_id = %s",
                (user,),
            )
        return replies.rowcount + own.rowcount
