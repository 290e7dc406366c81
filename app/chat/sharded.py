"""Sharded pub/sub on a Redis Cluster (SSUBSCRIBE), shaped like a plain PubSub.

On a cluster a thread's channel ``chat:{T}:live`` lives on the shard that
owns the thread's hash slot, and SPUBLISH sends it only to that shard's
subscribers instead of broadcasting every message to every node. A pod
therefore needs one subscriber connection per shard it follows threads on.

redis-py's ClusterPubSub polls its per-shard connections one after another,
each with the full read timeout, so a message on the last shard can wait for
all the others to time out. Here each shard connection has its own reader
task feeding one inbox: a message is handed on as soon as it arrives,
whichever shard it came from.

When a slot moves (resharding) or a primary fails over, the shard's
connection is closed or the server sends an ``sunsubscribe`` we did not ask
for. Both surface from ``get_message`` as a ConnectionError: the fan-out hub
then reconnects (with a fresh slot map) and refills every thread from its
event log, exactly as after any subscriber outage.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from app.chat import tasks

_LOST = object()


class ShardedSubscriber:
    """SSUBSCRIBE across shards: subscribe / unsubscribe / get_message / aclose."""

    def __init__(self, cluster: RedisCluster, seed_url: str) -> None:
        self._cluster = cluster
        self._seed = urlsplit(seed_url)
        self._clients: dict[str, aioredis.Redis] = {}
        # redis-py's PubSub is mostly untyped: its calls would be checked against nothing.
        self._pubsubs: dict[str, Any] = {}
        self._readers: dict[str, asyncio.Task[None]] = {}
        self._channel_node: dict[str, str] = {}
        self._leaving: set[str] = set()
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._slots_loaded = False

    def _node_url(self, host: str, port: int) -> str:
        userinfo = self._seed.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
        return urlunsplit(self._seed._replace(netloc=netloc))

    async def _pubsub_for(self, channel: str) -> tuple[str, Any]:
        if not self._slots_loaded:
            # A subscriber is made anew after every loss, so this reads the
            # slot map as it is now, after any failover or resharding.
            await self._cluster.initialize()
            await self._cluster.nodes_manager.initialize()
            self._slots_loaded = True
        node = self._cluster.get_node_from_key(channel)
        if node is None:
            raise RedisConnectionError(f"no cluster node serves {channel}")
        name = node.name
        if name not in self._pubsubs:
            # No retries: a lost connection must surface (see module docstring).
            client = aioredis.Redis.from_url(
                self._node_url(node.host, int(node.port)),
                decode_responses=True,
                socket_connect_timeout=5,
                health_check_interval=10,
                retry=Retry(NoBackoff(), 0),
            )
            self._clients[name] = client
            self._pubsubs[name] = client.pubsub()
        return name, self._pubsubs[name]

    async def subscribe(self, *channels: str) -> None:
        for channel in channels:
            name, pubsub = await self._pubsub_for(channel)
            self._leaving.discard(channel)
            await pubsub.ssubscribe(channel)
            self._channel_node[channel] = name
            if name not in self._readers:
                self._readers[name] = asyncio.create_task(self._read(pubsub), name=f"shard-{name}")

    async def unsubscribe(self, *channels: str) -> None:
        for channel in channels:
            name = self._channel_node.pop(channel, None)
            if name is not None:
                self._leaving.add(channel)
                await self._pubsubs[name].sunsubscribe(channel)

    async def _read(self, pubsub: Any) -> None:
        try:
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                kind = message["type"]
                if kind == "smessage":
                    self._inbox.put_nowait({**message, "type": "message"})
                elif kind == "ssubscribe":
                    self._inbox.put_nowait({**message, "type": "subscribe"})
                elif kind == "sunsubscribe":
                    channel = message["channel"]
                    if channel in self._leaving:
                        self._leaving.discard(channel)
                    else:  # the server moved the slot away from this shard
                        self._inbox.put_nowait(_LOST)
                        return
        except asyncio.CancelledError:
            raise
        except Exception:
            self._inbox.put_nowait(_LOST)

    async def get_message(self, timeout: float) -> dict[str, Any] | None:  # noqa: ASYNC109 - PubSub's signature
        try:
            message = await asyncio.wait_for(self._inbox.get(), timeout)
        except TimeoutError:
            return None
        if message is _LOST:
            raise RedisConnectionError("a shard subscription was lost (failover or resharding)")
        result: dict[str, Any] = message
        return result

    async def aclose(self) -> None:
        # Cancelled until done (a reader in a Redis call can lose one cancel,
        # see app.chat.tasks): a hung close would keep the hub from reconnecting.
        await tasks.stop_all(list(self._readers.values()), tasks.RELEASE_S, quiet=True)
        for pubsub in self._pubsubs.values():
            with contextlib.suppress(Exception):
                await pubsub.aclose()
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                await client.aclose()
        self._readers.clear()
        self._pubsubs.clear()
        self._clients.clear()
