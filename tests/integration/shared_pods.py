"""Two pods on one redis-server, for a whole test module.

The client tests (SSE, the JS client, the browser) only read and write their
own threads, so one pair of pods serves all of a module's tests: starting
pods is what costs. A test that kills a pod starts its own instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.conftest import REDIS_SERVER, Pod, RedisServer, free_port


def require_redis() -> None:
    if REDIS_SERVER is None:
        message = "redis-server is not installed (apt-get install -y redis-server)"
        if os.environ.get("DURABLE_CHAT_REQUIRE_REDIS") == "1":
            pytest.fail(message)
        pytest.skip(message)


def pod_env(redis_url: str, name: str, **overrides: str | int | float) -> dict[str, str]:
    """A test pod's environment: the fake model, auth off unless overridden."""
    mine = ("CHAT_", "REDIS_", "ANTHROPIC_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(mine)}
    env.update(
        CHAT_AUTH="off", CHAT_LLM="fake", CHAT_FAKE_REPLY_TOKENS="30",
        CHAT_FAKE_TOKEN_DELAY_MS="5", CHAT_POD_ID=name, PYTHONUNBUFFERED="1",
        REDIS_URL=redis_url,
    )  # fmt: skip
    env.update({k: str(v) for k, v in overrides.items()})
    return env


@contextmanager
def pods(workdir: Path, count: int = 2, **env: str | int | float) -> Iterator[list[Pod]]:
    """``count`` pods on a fresh redis-server under ``workdir``, stopped on exit."""
    require_redis()
    server = RedisServer(free_port(), workdir)
    started: list[Pod] = []
    try:
        server.start()
        for i in range(count):
            pod = Pod(free_port(), pod_env(server.url, f"pod{i}", **env), workdir / f"pod{i}.log")
            started.append(pod)
            pod.start()
        yield started
    finally:
        for pod in started:
            pod.stop()
        server.stop()
