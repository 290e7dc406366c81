"""Connections to Redis: the embedded in-process fake, one server, or a cluster.

Everything else receives a command client, a factory for the pod's pub/sub
connection and the publish command to use, and does not care which it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.chat.redis_types import RedisClient, Subscriber
from app.chat.sharded import ShardedSubscriber
from app.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class RedisHandles:
    """What the app needs from Redis, whichever kind it is."""

    commands: RedisClient
    pubsub_factory: Callable[[], Subscriber]
    publish_command: str
    description: str
    _extra: tuple[Any, ...] = ()

    async def aclose(self) -> None:
        for client in (self.commands, *self._extra):
            await client.aclose()


def connect(settings: Settings) -> RedisHandles:
    """Clients for the configured Redis (REDIS_URL), or the embedded fake."""
    if settings.embedded:
        import fakeredis

        fake = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), decode_responses=True)
        log.warning(
            "REDIS_URL is not set: using an EMBEDDED in-process Redis. Data lives only in "
            "this process and only ONE pod may run. Set REDIS_URL for anything real."
        )
        return RedisHandles(fake, fake.pubsub, "PUBLISH", "embedded (in-process, one pod only)")
    url = settings.redis_url or ""
    if settings.redis_cluster:
        return _connect_cluster(url)
    commands = aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=5,
        socket_timeout=10,
        health_check_interval=15,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    # The subscriber must not reconnect silently: messages published while it
    # was away would be lost without a trace. With no retries, a dropped
    # connection surfaces to the fan-out hub, which reconnects and then
    # refills every followed thread from the event log.
    subscriber = aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=5,
        health_check_interval=10,
        retry=Retry(NoBackoff(), 0),
    )
    return RedisHandles(
        commands, subscriber.pubsub, "PUBLISH", _redacted(url), _extra=(subscriber,)
    )


def _connect_cluster(url: str) -> RedisHandles:
    """A Redis Cluster from one seed node: sharded pub/sub (SPUBLISH), so a
    thread's messages stay on the shard that owns its hash slot."""
    cluster = RedisCluster.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=5,
        socket_timeout=10,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 6),
    )
    return RedisHandles(
        cluster,
        lambda: ShardedSubscriber(cluster, url),
        "SPUBLISH",
        f"cluster via {_redacted(url)}",
    )


def _redacted(url: str) -> str:
    """The URL without its password, for logs."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
