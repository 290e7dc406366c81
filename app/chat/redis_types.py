"""The Redis client types the domain is written against.

``RedisClient`` is what every store takes: one server (``redis.asyncio.Redis``,
and the embedded fakeredis, which subclasses it) or a Redis Cluster. Clients
are always made with ``decode_responses=True`` (app.redis_client), so replies
are ``str``; redis-py's annotations say ``bytes | str``, and the helpers
below narrow them in one place. The casts check nothing at run time.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol, cast

import redis
import redis.cluster
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

RedisClient = Redis | RedisCluster
# The operator's commands (app.ops) read with a synchronous client.
SyncRedisClient = redis.Redis | redis.cluster.RedisCluster


class Subscriber(Protocol):
    """A pod's pub/sub connection: redis-py's ``PubSub`` on one server, or
    app.chat.sharded's ``ShardedSubscriber`` on a cluster."""

    async def subscribe(self, *channels: str) -> None: ...

    def unsubscribe(self, *channels: str) -> Awaitable[Any]: ...

    async def get_message(self, *, timeout: float) -> dict[str, Any] | None: ...  # noqa: ASYNC109

    async def aclose(self) -> None: ...


# What a stream read (XRANGE, XREVRANGE) gives: (entry id, fields) pairs.
Entry = tuple[str, dict[str, str]]
_StreamReply = list[tuple[bytes | str | None, dict[bytes | str, bytes | str] | None]] | None


def entries(reply: _StreamReply) -> list[Entry]:
    """A stream read's entries (redis-py types an empty reply as maybe None)."""
    return cast("list[Entry]", reply or [])


def stream_reads(reply: object) -> list[tuple[str, list[Entry]]]:
    """XREAD: (stream, entries) pairs (None when the block timed out)."""
    return cast("list[tuple[str, list[Entry]]]", reply or [])


def text(reply: bytes | str | None) -> str | None:
    """A string reply (GET, HGET), decoded by the client."""
    return cast("str | None", reply)


def texts(reply: object) -> list[str]:
    """Strings in order (ZRANGE, ZREVRANGE)."""
    return cast("list[str]", reply)


def text_set(reply: set[bytes | str]) -> set[str]:
    """SMEMBERS."""
    return cast("set[str]", reply)


def optional_texts(reply: list[bytes | str | None]) -> list[str | None]:
    """HMGET: a string or None per field asked for."""
    return cast("list[str | None]", reply)


def scored(reply: object) -> list[tuple[str, float]]:
    """A sorted set range read WITHSCORES: (member, score) pairs."""
    return cast("list[tuple[str, float]]", reply)


def fields(reply: object) -> dict[str, str]:
    """A hash (HGETALL)."""
    return cast("dict[str, str]", reply)


def lua_hash(reply: object) -> dict[str, str]:
    """A hash read inside a Lua script (a flat field, value, ... list)."""
    flat = cast("list[str]", reply)
    return dict(zip(flat[::2], flat[1::2], strict=True))


def lua_entries(reply: object) -> list[Entry]:
    """A stream read inside a Lua script: (id, flat fields) pairs."""
    return [(entry_id, lua_hash(flat)) for entry_id, flat in cast("list[list[Any]]", reply)]
