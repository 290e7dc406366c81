"""Which Redis clients a configuration gets: one server, or a primary found
through Sentinel (with auth and TLS), and the warning about evicting policies."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from redis.asyncio.sentinel import SentinelConnectionPool

from app.chat.backoff import Backoff
from app.redis_client import (
    CLUSTER_COMMAND_RETRIES,
    COMMAND_RETRIES,
    _PrimaryConnection,
    _PrimarySSLConnection,
    connect,
    warn_if_evicting,
)
from app.settings import ConfigError, Settings

SENTINELS = "sentinel-0:26379, sentinel-1:26379,[::1]:26380"


def test_sentinels_are_parsed(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(redis_sentinels=SENTINELS)
    assert settings.embedded is False
    assert settings.sentinel_addresses == [
        ("sentinel-0", 26379), ("sentinel-1", 26379), ("::1", 26380)
    ]  # fmt: skip
    settings.check_startable()


@pytest.mark.parametrize("bad", ["sentinel-0", "sentinel-0:port", ":26379", "a:1,b:99999"])
def test_a_malformed_sentinel_list_cannot_start(
    make_settings: Callable[..., Settings], bad: str
) -> None:
    with pytest.raises(ConfigError, match="REDIS_SENTINELS"):
        make_settings(redis_sentinels=bad).check_startable()


def test_sentinels_and_a_url_together_cannot_start(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(redis_sentinels=SENTINELS, redis_url="redis://r:6379")
    with pytest.raises(ConfigError, match="not both"):
        settings.check_startable()


def test_sentinels_need_authentication_like_a_url(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ConfigError, match="CHAT_AUTH_SECRET"):
        make_settings(redis_sentinels=SENTINELS, chat_auth="jwt").check_startable()


def test_a_probe_deadline_past_the_interval_cannot_start(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(chat_subscriber_probe_s=1, chat_subscriber_deadline_s=2)
    with pytest.raises(ConfigError, match="CHAT_SUBSCRIBER_DEADLINE_S"):
        settings.check_startable()


def _pool_kwargs(client: Any) -> dict[str, Any]:
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    return dict(pool.connection_kwargs)


async def test_sentinel_clients_carry_auth_and_timeouts(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(
        redis_sentinels=SENTINELS, redis_sentinel_master="chat",
        redis_username="app", redis_password="data-secret",
        redis_sentinel_password="sentinel-secret", redis_socket_timeout_s=2.5,
    )  # fmt: skip
    handles = connect(settings)
    try:
        commands = _pool_kwargs(handles.commands)
        assert handles.commands.connection_pool.service_name == "chat"
        assert handles.commands.connection_pool.connection_class is _PrimaryConnection
        assert (commands["username"], commands["password"]) == ("app", "data-secret")
        assert commands["socket_timeout"] == 2.5
        sentinel = handles._extra[-1]
        sentinel_kwargs = sentinel.sentinels[0].connection_pool.connection_kwargs
        assert sentinel_kwargs["password"] == "sentinel-secret"
        assert [s.connection_pool.connection_kwargs["port"] for s in sentinel.sentinels] == [
            26379, 26379, 26380
        ]  # fmt: skip
        # The subscriber never retries on its own (app.chat.fanout refills after a loss).
        subscriber = handles._extra[0]
        assert subscriber.get_retry().get_retries() == 0
        assert "data-secret" not in handles.description
    finally:
        await handles.aclose()


async def test_sentinel_clients_over_tls(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(
        redis_sentinels=SENTINELS, redis_tls=True, redis_tls_ca_file="/etc/redis/ca.crt",
        redis_tls_cert_file="/etc/redis/tls.crt", redis_tls_key_file="/etc/redis/tls.key",
    )  # fmt: skip
    handles = connect(settings)
    try:
        commands = _pool_kwargs(handles.commands)
        assert handles.commands.connection_pool.connection_class is _PrimarySSLConnection
        assert commands["ssl_ca_certs"] == "/etc/redis/ca.crt"
        assert commands["ssl_certfile"] == "/etc/redis/tls.crt"
        assert commands["ssl_keyfile"] == "/etc/redis/tls.key"
        sentinel = handles._extra[-1]
        pool = sentinel.sentinels[0].connection_pool
        assert pool.connection_class.__name__ == "SSLConnection"
        assert pool.connection_kwargs["ssl_ca_certs"] == "/etc/redis/ca.crt"
    finally:
        await handles.aclose()


class _Info:
    def __init__(self, reply: Any) -> None:
        self.reply = reply

    async def info(self, section: str) -> Any:
        assert section == "memory"
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply


async def test_an_evicting_policy_is_reported_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="app.redis_client"):
        await warn_if_evicting(_Info({"maxmemory_policy": "noeviction"}))
        assert not caplog.records
        await warn_if_evicting(_Info({"maxmemory_policy": "allkeys-lru"}))
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert "allkeys-lru" in record.getMessage() and "noeviction" in record.getMessage()


async def test_an_evicting_cluster_node_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    nodes = {"a:1": {"maxmemory_policy": "noeviction"}, "b:2": {"maxmemory_policy": "volatile-lru"}}
    with caplog.at_level(logging.WARNING, logger="app.redis_client"):
        await warn_if_evicting(_Info(nodes))
    assert "volatile-lru" in caplog.text


async def test_an_unreadable_policy_is_a_warning_not_a_crash(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from redis.exceptions import ResponseError

    with caplog.at_level(logging.WARNING, logger="app.redis_client"):
        await warn_if_evicting(_Info(ResponseError("unknown command 'INFO'")))
    assert "must be noeviction" in caplog.text


def _retries(client: Any) -> int:
    retry = client.get_retry() if hasattr(client, "get_retry") else client.retry
    count: int = retry.get_retries()
    return count


@pytest.mark.parametrize("mode", ["single", "cluster", "sentinel"])
async def test_turn_writes_are_retried_by_the_runner_alone(
    make_settings: Callable[..., Settings], mode: str
) -> None:
    """redis-py retries the command client's commands; the client turns
    write through has its retries off (the runner owns those), so no write
    is retried at two levels (docs/architecture.md, "Retries"). Nothing here
    connects."""
    where: dict[str, Any] = (
        {"redis_sentinels": SENTINELS, "redis_sentinel_master": "chat"}
        if mode == "sentinel"
        else {"redis_url": "redis://127.0.0.1:1", "redis_cluster": mode == "cluster"}
    )
    handles = connect(make_settings(**where))
    try:
        expected = CLUSTER_COMMAND_RETRIES if mode == "cluster" else COMMAND_RETRIES
        assert _retries(handles.commands) == expected
        assert handles.turn_writes is not handles.commands
        assert _retries(handles.turn_writes) == 0
    finally:
        await handles.aclose()


@pytest.mark.parametrize("mode", ["single", "sentinel"])
async def test_the_subscriber_speaks_resp2(
    make_settings: Callable[..., Settings], mode: str
) -> None:
    """The subscriber reads its messages as RESP2 arrays, not RESP3 pushes
    (redis-py formats a debug line of every push). Nothing here connects."""
    where: dict[str, Any] = (
        {"redis_sentinels": SENTINELS, "redis_sentinel_master": "chat"}
        if mode == "sentinel"
        else {"redis_url": "redis://127.0.0.1:1"}
    )
    handles = connect(make_settings(**where))
    try:
        pubsub = handles.pubsub_factory()
        assert pubsub.connection_pool.connection_kwargs["protocol"] == 2  # type: ignore[union-attr]
        await pubsub.aclose()
    finally:
        await handles.aclose()


def test_the_embedded_redis_is_one_client(make_settings: Callable[..., Settings]) -> None:
    handles = connect(make_settings())
    assert handles.turn_writes is handles.commands


def test_backoff_doubles_up_to_its_cap() -> None:
    delays = iter(Backoff(0.1, 0.5))
    assert [next(delays) for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
