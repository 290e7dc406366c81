"""Connections to Redis: the embedded in-process fake, one server, a primary
found through Sentinel, or a cluster.

Everything else receives a command client, a factory for the pod's pub/sub
connection and the publish command to use, and does not care which it is.

With Sentinel, every new connection asks the sentinels where the primary is
(redis-py's SentinelConnectionPool), so after a failover the pod follows the
new primary as soon as its old connections fail. They fail at once when the
demoted primary is reconfigured (Sentinel kills its clients) or refuses a
write; see _PrimaryConnection for the window before that.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.chat.redis_types import RedisClient, Subscriber
from app.chat.sharded import ShardedSubscriber
from app.settings import Settings

log = logging.getLogger(__name__)

# Retries, one owner per layer (docs/architecture.md, "Retries"). redis-py
# retries a command of the command client whose connection failed or timed
# out, COMMAND_RETRIES times with this backoff; a command then takes at most
# (COMMAND_RETRIES + 1) x REDIS_SOCKET_TIMEOUT_S (REDIS_CONNECT_TIMEOUT_S to
# connect) plus the backoff. The turn runner's writes go through a client
# redis-py does not retry, because the runner retries them itself (for at
# most app.chat.runner.WRITE_RETRY_S in all); the subscriber is never retried
# either: the fan-out hub reconnects it and refills what it missed.
COMMAND_RETRIES = 3
CLUSTER_COMMAND_RETRIES = 6
COMMAND_BACKOFF_BASE_S = 0.05
COMMAND_BACKOFF_CAP_S = 1.0


def _command_retry(retries: int) -> Retry:
    return Retry(
        ExponentialWithJitterBackoff(COMMAND_BACKOFF_BASE_S, COMMAND_BACKOFF_CAP_S), retries
    )


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)  # one per client: redis-py may amend a Retry it is given


@dataclass
class RedisHandles:
    """What the app needs from Redis, whichever kind it is: the command
    client, the client turn runners write through (``turn_writes``: no
    redis-py retries, the runner owns them) and the subscriber's factory."""

    commands: RedisClient
    turn_writes: RedisClient
    pubsub_factory: Callable[[], Subscriber]
    publish_command: str
    description: str
    _extra: tuple[Any, ...] = ()

    async def aclose(self) -> None:
        for client in {id(c): c for c in (self.commands, self.turn_writes, *self._extra)}.values():
            await client.aclose()


def connect(settings: Settings) -> RedisHandles:
    """Clients for the configured Redis (REDIS_URL or REDIS_SENTINELS), or the
    embedded fake."""
    if settings.embedded:
        import fakeredis

        fake = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), decode_responses=True)
        log.warning(
            "REDIS_URL is not set: using an EMBEDDED in-process Redis. Data lives only in "
            "this process and only ONE pod may run. Set REDIS_URL for anything real."
        )
        return RedisHandles(
            fake, fake, fake.pubsub, "PUBLISH", "embedded (in-process, one pod only)"
        )
    if settings.redis_sentinels:
        return _connect_sentinel(settings)
    url = settings.redis_url or ""
    if settings.redis_cluster:
        return _connect_cluster(url, settings)
    commands = aioredis.Redis.from_url(url, **_command_options(settings))
    turn_writes = aioredis.Redis.from_url(url, **_command_options(settings, retried=False))
    subscriber = aioredis.Redis.from_url(url, **_subscriber_options(settings))
    return RedisHandles(
        commands, turn_writes, subscriber.pubsub, "PUBLISH", _redacted(url),
        _extra=(subscriber,),
    )  # fmt: skip


def _command_options(settings: Settings, retried: bool = True) -> dict[str, Any]:
    """The command client's options; ``retried=False`` for turn writes."""
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        "socket_timeout": settings.redis_socket_timeout_s,
        "health_check_interval": 15,
        "retry": _no_retry(),
    }
    if retried:
        options["retry"] = _command_retry(COMMAND_RETRIES)
        options["retry_on_error"] = [RedisConnectionError, RedisTimeoutError]
    return options


def _subscriber_options(settings: Settings) -> dict[str, Any]:
    # The subscriber must not reconnect silently: messages published while it
    # was away would be lost without a trace. With no retries, a dropped
    # connection surfaces to the fan-out hub, which reconnects and then
    # refills every followed thread from the event log. A connection that
    # stays open but stops hearing (half-open, or on a demoted primary) is
    # caught by the hub's probe instead (app.chat.fanout).
    # RESP2: under RESP3 (redis-py's default) every message arrives as a push
    # and redis-py's push handler builds a debug line of it, logged or not,
    # which made a message about 40% dearer to read (about 26 us against 19).
    return {
        "protocol": 2,
        "decode_responses": True,
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        "health_check_interval": 10,
        "retry": _no_retry(),
    }


def _tls_options(settings: Settings) -> dict[str, Any]:
    """redis-py's TLS arguments for REDIS_TLS and its files (none without)."""
    if not settings.redis_tls:
        return {}
    options: dict[str, Any] = {"ssl": True, "ssl_cert_reqs": "required"}
    for option, path in (
        ("ssl_ca_certs", settings.redis_tls_ca_file),
        ("ssl_certfile", settings.redis_tls_cert_file),
        ("ssl_keyfile", settings.redis_tls_key_file),
    ):
        if path:
            options[option] = path
    return options


class _PrimaryConnection(SentinelManagedConnection):
    """A connection to the primary that Sentinel named, which lets go of a
    primary that refuses writes for want of replicas.

    After a forced failover (SENTINEL FAILOVER, or a partition) the old
    primary stays a primary for seconds (Sentinel reconfigures it only about
    8 s later), and every write it takes meanwhile is lost when it becomes a
    replica. Configured with ``min-replicas-to-write`` (docs/operations.md),
    it refuses those writes with NOREPLICAS the moment its replica is
    promoted. redis-py treats that as a plain error and would keep the
    connection; here it is dropped and raised as a connection error, so the
    retry asks the sentinels again and reaches the new primary as soon as
    they name it. (READONLY, once the old primary is demoted, redis-py
    handles the same way.)
    """

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if str(exc).startswith("NOREPLICAS") and self.connection_pool.is_master:
                await self.disconnect()
                raise RedisConnectionError(f"the primary refuses writes ({exc})") from exc
            raise


class _PrimarySSLConnection(_PrimaryConnection, SSLConnection):
    pass


def _connect_sentinel(settings: Settings) -> RedisHandles:
    """The primary that REDIS_SENTINELS name REDIS_SENTINEL_MASTER, for commands
    and pub/sub alike; every (re)connection asks the sentinels anew."""
    tls = _tls_options(settings)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        settings.sentinel_addresses,
        sentinel_kwargs={
            "socket_connect_timeout": settings.redis_connect_timeout_s,
            "socket_timeout": settings.redis_socket_timeout_s,
            "username": settings.redis_sentinel_username,
            "password": settings.redis_sentinel_password,
            **tls,
        },
        username=settings.redis_username,
        password=settings.redis_password,
        **tls,
    )
    name = settings.redis_sentinel_master
    connection_class = _PrimarySSLConnection if tls else _PrimaryConnection
    commands = sentinel.master_for(
        name, connection_class=connection_class, **_command_options(settings)
    )
    turn_writes = sentinel.master_for(
        name, connection_class=connection_class, **_command_options(settings, retried=False)
    )
    subscriber = sentinel.master_for(
        name, connection_class=connection_class, **_subscriber_options(settings)
    )
    where = ",".join(f"{host}:{port}" for host, port in settings.sentinel_addresses)
    return RedisHandles(
        commands,
        turn_writes,
        subscriber.pubsub,
        "PUBLISH",
        f"sentinel master {name!r} via {where}",
        _extra=(subscriber, sentinel),
    )


async def warn_if_evicting(commands: RedisClient) -> None:
    """Log loudly when Redis may evict keys: an evicted lock, turn record or
    history stream is data loss (a second writer, a stuck turn, a lost
    conversation). Memory must be bounded by trimming and TTLs, with
    ``maxmemory-policy noeviction`` so that a full Redis refuses writes
    (retryable errors) instead of dropping data."""
    try:
        info = await commands.info("memory")
    except (RedisError, OSError) as exc:
        log.warning("could not read Redis's maxmemory-policy (%s); it must be noeviction", exc)
        return
    # A cluster answers per node: {node: {...}}.
    nodes = info.values() if all(isinstance(v, dict) for v in info.values()) else [info]
    policies = {node.get("maxmemory_policy") for node in nodes} - {None, "noeviction"}
    if policies:
        log.error(
            "REDIS MAY EVICT KEYS: maxmemory-policy is %s. An evicted lock, turn or history "
            "key is lost data (two writers, stuck turns, vanished conversations). Set "
            "maxmemory-policy noeviction on every Redis node: a full Redis then refuses "
            "writes with a retryable error instead.",
            ",".join(sorted(str(p) for p in policies)),
        )


def _connect_cluster(url: str, settings: Settings) -> RedisHandles:
    """A Redis Cluster from one seed node: sharded pub/sub (SPUBLISH), so a
    thread's messages stay on the shard that owns its hash slot."""

    def client(retry: Retry) -> RedisCluster:
        return RedisCluster.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=settings.redis_connect_timeout_s,
            socket_timeout=settings.redis_socket_timeout_s,
            retry=retry,
        )

    cluster = client(_command_retry(CLUSTER_COMMAND_RETRIES))
    return RedisHandles(
        cluster,
        client(_no_retry()),
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
