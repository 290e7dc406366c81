"""Pods on one redis-server for a whole test module.

The client tests (SSE, the JS client, the browser) only read and write their
own threads, so one set of pods serves all of a module's tests: starting
pods is what costs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests import procs
from tests.procs import RedisServer, Server


def require_redis() -> None:
    if procs.REDIS_SERVER is None:
        message = "redis-server is not installed (apt-get install -y redis-server)"
        if os.environ.get("DURABLE_CHAT_REQUIRE_REDIS") == "1":
            pytest.fail(message)
        pytest.skip(message)


@contextmanager
def pods(
    workdir: Path, count: int = 2, cross_origin: bool = False, **settings: str | int | float
) -> Iterator[list[Server]]:
    """``count`` pods (the fake model, ``settings`` on top) on a fresh
    redis-server under ``workdir``, stopped on exit. With ``cross_origin``
    each pod allows the others' pages (a page that resumes on another pod)."""
    require_redis()
    server = RedisServer(workdir / "redis").start()
    try:
        settings = {"CHAT_FAKE_REPLY_TOKENS": 30, "CHAT_FAKE_TOKEN_DELAY_MS": 5, **settings}
        made = [
            procs.pod(f"pod{i}", server.url, workdir / f"pod{i}.log", **settings)
            for i in range(count)
        ]
        if cross_origin:
            origins = ",".join(pod.http for pod in made)
            for pod in made:
                pod.env["CHAT_ALLOWED_ORIGINS"] = origins
        with procs.running(made) as started:
            yield started
    finally:
        server.stop()
