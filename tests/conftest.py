"""Shared fixtures of the unit tests: an in-memory Redis (fakeredis, with Lua
and pub/sub) per test, the chat parts built on it, and bounded waits.

Integration tests (tests/integration) have their own conftest and real
processes; nothing here starts a process or touches the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from app.chat import keys
from app.chat.fanout import FanoutHub
from app.chat.keys import ThreadId, UserId
from app.chat.lock import TurnLock
from app.chat.scripts import Scripts
from app.chat.service import ChatService
from app.chat.threads import Threads
from app.chat.timeline import BATCH, Timeline
from app.chat.turns import TurnStore
from app.llm.fake import FakeModel
from app.settings import Settings

USER = keys.user_id("alice")
ROOT = Path(__file__).resolve().parent.parent


# --- the type check, started early ---------------------------------------

# A directory of this test run's, shared by its xdist workers (each inherits
# the variable from the process that starts them).
RUN_DIR_ENV = "DURABLE_CHAT_TEST_RUN_DIR"


class TypeCheck:
    """``mypy --strict`` over the tree (pyproject.toml says which files), run
    once per test run in a process group of its own: its output and exit
    code land in ``<run dir>/mypy``, for whichever worker runs the test."""

    def __init__(self, run_dir: Path) -> None:
        self._dir = run_dir / "mypy"

    def start_once(self) -> None:
        """Start it, unless another worker of this run already did."""
        try:
            self._dir.mkdir()
        except FileExistsError:
            return
        script = (
            '"$1" -m mypy > "$2/output" 2>&1; echo $? > "$2/exit.tmp"; mv "$2/exit.tmp" "$2/exit"'
        )
        proc = subprocess.Popen(
            ["sh", "-c", script, "sh", sys.executable, str(self._dir)], cwd=ROOT,
            start_new_session=True, preexec_fn=lambda: os.nice(10),
        )  # fmt: skip
        (self._dir / "pid").write_text(str(proc.pid))
        _STARTED.append(proc)

    def result(self, timeout_s: float) -> tuple[int, str]:
        """Its exit code and output, once it is done."""
        exit_file = self._dir / "exit"
        deadline = time.monotonic() + timeout_s
        while not exit_file.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"mypy did not finish within {timeout_s}s")
            time.sleep(0.2)
        output = (self._dir / "output").read_text(errors="replace")
        return int(exit_file.read_text()), output

    def stop(self) -> None:
        """Kill it if it still runs (the run ended first, or was interrupted)."""
        pid_file = self._dir / "pid"
        if pid_file.exists() and not (self._dir / "exit").exists():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)


# The type check's processes started here, kept until the session ends.
_STARTED: list[subprocess.Popen[bytes]] = []


def run_dir() -> Path:
    return Path(os.environ[RUN_DIR_ENV])


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the controller, or a run without workers
        os.environ[RUN_DIR_ENV] = tempfile.mkdtemp(prefix="durable-chat-tests-")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A cold mypy takes a minute of one core. When the run includes
    test_mypy_strict, mypy starts now, at a low priority, beside the other
    tests (which mostly wait on sockets and timers), and the test collects
    its result at its turn."""
    if any(item.name == "test_mypy_strict" for item in items):
        TypeCheck(run_dir()).start_once()


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and RUN_DIR_ENV in os.environ:
        TypeCheck(run_dir()).stop()
        shutil.rmtree(run_dir(), ignore_errors=True)


# Every environment variable the settings read starts with one of these.
_ENV_PREFIXES = ("CHAT_", "REDIS_", "ANTHROPIC_")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No configuration from the machine's environment leaks into a test."""
    for name in list(os.environ):
        if name.upper().startswith(_ENV_PREFIXES):
            monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def make_settings(clean_env: pytest.MonkeyPatch) -> Callable[..., Settings]:
    """Settings for tests: embedded, auth off, fast timings; overrides by keyword."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "chat_auth": "off",
            "chat_llm": "fake",
            "chat_pod_id": "pod-test",
            "chat_lock_ttl_ms": 3000,
            "chat_reaper_interval_ms": 100,
            "chat_delta_window_ms": 5,
            "chat_drain_grace_s": 0,
            "chat_rate_prompts_per_min": 0,
        }
        values.update(overrides)
        return Settings(**values)

    return make


class Clock:
    """The test's Redis clock, moved by hand: fakeredis reads ``time.time()``
    for TIME (the Lua scripts' clock) and for key expiry, so ``advance``
    expires a lease or refills a bucket at once, without sleeping. Nothing
    else the unit tests run reads the wall clock for a deadline (asyncio and
    the waits here use the monotonic clock)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._offset = 0.0
        wall = time.time
        monkeypatch.setattr(time, "time", lambda: wall() + self._offset)

    def advance(self, seconds: float) -> None:
        self._offset += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    return Clock(monkeypatch)


@pytest.fixture
async def redis() -> AsyncIterator[Any]:
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def scripts(redis: Any) -> Scripts:
    return Scripts(redis)


@pytest.fixture
def lock(scripts: Scripts) -> TurnLock:
    return TurnLock(scripts, ttl_ms=5000)


@pytest.fixture
def store(redis: Any, scripts: Scripts) -> TurnStore:
    return TurnStore(redis, scripts, "PUBLISH", retention=10000, dedup_ttl_s=3600)


@pytest.fixture
def threads(redis: Any, scripts: Scripts) -> Threads:
    return Threads(redis, scripts)


@pytest.fixture
async def thread(threads: Threads) -> ThreadId:
    """A freshly created thread owned by USER."""
    t = keys.thread_id("t1")
    await threads.open(t, USER)
    return t


@pytest.fixture
async def make_service(
    redis: Any, make_settings: Callable[..., Settings]
) -> AsyncIterator[Callable[..., Awaitable[ChatService]]]:
    """ChatServices built as app.main builds them, on the test's Redis; each
    is started, and drained in teardown."""
    services: list[ChatService] = []

    async def make(tokens: int = 20, delay_ms: float = 1, **overrides: Any) -> ChatService:
        settings = make_settings(**overrides)
        service = ChatService(settings, redis, redis.pubsub, FakeModel(tokens, delay_ms), "PUBLISH")
        await service.start()
        services.append(service)
        return service

    try:
        yield make
    finally:
        for service in services:
            await service.drain()


async def open_thread(threads: Threads, name: str, user: UserId = USER) -> ThreadId:
    t = keys.thread_id(name)
    await threads.open(t, user)
    return t


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[None]:
    """Wrap the coroutine method ``owner.name``; the list grows by one per call."""
    calls: list[None] = []
    method = getattr(owner, name)

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(None)
        return await method(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


async def wait_until(
    predicate: Callable[[], Any | Awaitable[Any]],
    timeout: float = 5.0,
    interval: float = 0.01,
    what: str = "condition",
) -> Any:
    """Poll ``predicate`` (sync or async) until truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


class Listener:
    """A raw subscriber of one channel, collecting its frames in order: a
    message holding several frames (app.chat.timeline.BATCH) counts as its
    frames in ``messages``, and as one in ``published``."""

    def __init__(self, redis: Any, channel: str) -> None:
        self._pubsub = redis.pubsub()
        self._channel = channel
        self.messages: list[str] = []
        self.published: list[str] = []

    async def __aenter__(self) -> Listener:
        await self._pubsub.subscribe(self._channel)
        confirm = await self._pubsub.get_message(timeout=1.0)
        assert confirm is not None and confirm["type"] == "subscribe"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._pubsub.aclose()

    async def drain(self, timeout: float = 0.05) -> list[str]:
        """Every frame published so far (waits ``timeout`` for the next message)."""
        while True:
            message = await self._pubsub.get_message(timeout=timeout)
            if message is None:
                return self.messages
            if message["type"] == "message":
                data = message["data"]
                self.published.append(data)
                self.messages += data[1:].split(BATCH) if data.startswith(BATCH) else [data]


@pytest.fixture
async def hub_factory(redis: Any) -> AsyncIterator[Callable[[float], Awaitable[FanoutHub]]]:
    """Started fan-out hubs on the test's fakeredis, stopped in teardown:
    ``await hub_factory(audit_interval_s)``."""
    hubs: list[FanoutHub] = []

    async def make(audit_interval_s: float) -> FanoutHub:
        hub = FanoutHub(redis.pubsub, redis, Timeline(redis), audit_interval_s=audit_interval_s)
        await hub.start()
        hubs.append(hub)
        return hub

    try:
        yield make
    finally:
        for hub in hubs:
            await hub.stop()
