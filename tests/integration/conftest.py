"""Fixtures of the integration tests: real redis-servers and durable-chat pods
(tests/procs.py starts and stops them), and their logs on failure.

Factory fixtures start each ``redis-server`` on a free loopback port (never
the machine's shared Redis) and each pod as its own ``python -m app serve``
process, and stop them all in teardown. When a test fails, the logs of the
pods it started are attached to its report ("pod logs" sections).

Without a ``redis-server`` binary these tests skip, except when
DURABLE_CHAT_REQUIRE_REDIS=1 (CI sets it): then they fail. ``require`` does
the same for the other binaries tests run (nginx, haproxy, PostgreSQL).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import procs
from tests.procs import RedisServer, Server

pytestmark = pytest.mark.integration

# What every test pod runs with unless the test says otherwise: the fake
# model's short reply at a quick pace, and the INFO log a failure shows.
POD_SETTINGS: dict[str, str | int | float] = {
    "CHAT_FAKE_REPLY_TOKENS": 30,
    "CHAT_FAKE_TOKEN_DELAY_MS": 5,
    "CHAT_LOG_LEVEL": "INFO",
}
# The last lines of each pod's log that a failing test's report shows.
LOG_TAIL_LINES = 200


def require(binary: str | None, message: str, env: str) -> str:
    """The binary's path; without it skip the test, or fail it where ``env``
    is 1 (CI: the binary was to be installed)."""
    if binary is None:
        if os.environ.get(env) == "1":
            pytest.fail(f"{message} ({env}=1)")
        pytest.skip(message)
    return binary


def require_postgres() -> str:
    found = procs.POSTGRES_BIN
    return require(
        str(found) if found else None,
        "PostgreSQL is not installed (apt-get install -y postgresql)",
        "DURABLE_CHAT_REQUIRE_POSTGRES",
    )


def require_redis() -> str:
    return require(
        procs.REDIS_SERVER,
        "redis-server is not installed (apt-get install -y redis-server)",
        "DURABLE_CHAT_REQUIRE_REDIS",
    )


@pytest.fixture
def redis_factory() -> Iterator[Callable[..., RedisServer]]:
    """Start redis-servers: ``redis_factory(persistent=False) -> RedisServer``."""
    require_redis()
    servers: list[RedisServer] = []
    tmp = tempfile.mkdtemp(prefix="dc-redis-")

    def make(persistent: bool = False) -> RedisServer:
        server = RedisServer(Path(tmp) / str(len(servers)), persistent=persistent)
        servers.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def redis_server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    return redis_factory()


@pytest.fixture
def pod_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start pods: ``pod_factory(redis_server, **env) -> Server``. Env names are
    the app's settings (CHAT_FAKE_TOKEN_DELAY_MS=..., CHAT_LOCK_TTL_MS=...);
    ``redis_server`` None runs the pod embedded."""
    pods = track_pods(request)

    def make(server: RedisServer | None, **overrides: str | int | float) -> Server:
        settings = {**POD_SETTINGS, **overrides}
        name = f"pod{len(pods)}"
        pod = procs.pod(name, server.url if server else None, tmp_path / f"{name}.log", **settings)
        pods.append(pod)
        return pod.start()

    try:
        yield make
    finally:
        for pod in pods:
            pod.stop()


_PODS = pytest.StashKey[list[Server]]()


def track_pods(request: pytest.FixtureRequest) -> list[Server]:
    """The list a pod fixture appends its pods to, so that a failing test
    shows their logs: kept on the fixture's node (the test, or the module of a
    module-scoped fixture)."""
    return request.node.stash.setdefault(_PODS, [])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    """A failed test's report carries the tail of each of its pods' logs."""
    report = yield
    if report.failed:
        for pod in (pod for node in item.listchain() for pod in node.stash.get(_PODS, [])):
            tail = "\n".join(pod.logs().splitlines()[-LOG_TAIL_LINES:])
            report.sections.append((f"pod logs: {pod.name} (port {pod.port})", tail))
    return report
