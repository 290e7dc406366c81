"""Pods on one redis-server for a whole test module.

The client tests (SSE, the JS client, the browser) only read and write their
own threads, so one set of pods serves all of a module's tests: starting
pods is what costs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests import procs
from tests.integration.conftest import POD_SETTINGS, require_redis, track_pods
from tests.procs import RedisServer, Server


@contextmanager
def pods(
    request: pytest.FixtureRequest, workdir: Path, count: int = 2, cross_origin: bool = False,
    **settings: str | int | float,
) -> Iterator[list[Server]]:  # fmt: skip
    """``count`` pods (the fake model, ``settings`` on top) on a fresh
    redis-server under ``workdir``, stopped on exit; a failing test of the
    fixture's scope shows their logs. With ``cross_origin`` each pod allows
    the others' pages (a page that resumes on another pod)."""
    with pods_on_redis(request, workdir, count, cross_origin, **settings) as (_, started):
        yield started


@contextmanager
def pods_on_redis(
    request: pytest.FixtureRequest, workdir: Path, count: int = 2, cross_origin: bool = False,
    **settings: str | int | float,
) -> Iterator[tuple[RedisServer, list[Server]]]:  # fmt: skip
    """As ``pods``, with their redis-server, for tests that check what Redis holds."""
    require_redis()
    server = RedisServer(workdir / "redis").start()
    try:
        settings = {**POD_SETTINGS, **settings}
        made = [
            procs.pod(f"pod{i}", server.url, workdir / f"pod{i}.log", **settings)
            for i in range(count)
        ]
        track_pods(request).extend(made)
        if cross_origin:
            origins = ",".join(pod.http for pod in made)
            for pod in made:
                pod.env["CHAT_ALLOWED_ORIGINS"] = origins
        with procs.running(made) as started:
            yield server, started
    finally:
        server.stop()


def module_pods_on_redis(tag: str, count: int, **settings: str | int | float) -> Any:
    """A module-scoped fixture of ``pods_on_redis``: (redis-server, pods)."""

    @pytest.fixture(scope="module")
    def pods_and_redis(
        request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[tuple[RedisServer, list[Server]]]:
        with pods_on_redis(request, tmp_path_factory.mktemp(tag), count, **settings) as both:
            yield both

    return pods_and_redis
