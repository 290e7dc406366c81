"""Real processes for integration tests: redis-server and durable-chat pods.

Factory fixtures start each ``redis-server`` on a free loopback port (never
the machine's shared Redis) and each pod as its own ``durable-chat serve``
process, and stop them all in teardown. Every wait is bounded.

Without a ``redis-server`` binary these tests skip, except when
DURABLE_CHAT_REQUIRE_REDIS=1 (CI sets it): then they fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

pytestmark = pytest.mark.integration

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class RedisServer:
    """One redis-server process on a free port; stop() and start() keep the port."""

    port: int
    workdir: Path
    persistent: bool = False
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            REDIS_SERVER or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else [
            "--appendonly", "no"
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._pings, 10, what=f"redis-server on port {self.port}")

    def _pings(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=5)


@pytest.fixture
def redis_factory() -> Iterator:
    """Start redis-servers: ``redis_factory(persistent=False) -> RedisServer``."""
    if REDIS_SERVER is None:
        message = "redis-server is not installed (apt-get install -y redis-server)"
        if os.environ.get("DURABLE_CHAT_REQUIRE_REDIS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    servers: list[RedisServer] = []
    tmp = tempfile.mkdtemp(prefix="dc-redis-")

    def make(persistent: bool = False) -> RedisServer:
        workdir = Path(tmp) / str(len(servers))
        workdir.mkdir()
        server = RedisServer(free_port(), workdir, persistent)
        servers.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def redis_server(redis_factory) -> RedisServer:
    return redis_factory()


@dataclass
class Pod:
    """One ``durable-chat serve`` process."""

    port: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _log: object = field(default=None, repr=False)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_until(self.ready, 20, what=f"pod on port {self.port} to be ready")

    def ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"pod exited early:\n{self.logs()}")
        try:
            return httpx.get(f"{self.http}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """kill -9: no drain, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, as Kubernetes does; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def pod_factory(tmp_path) -> Iterator:
    """Start pods: ``pod_factory(redis_server, **env) -> Pod``. Env names are
    the app's settings (CHAT_FAKE_TOKEN_DELAY_MS=..., CHAT_LOCK_TTL_MS=...)."""
    pods: list[Pod] = []

    def make(server: RedisServer | None, **overrides: str | int | float) -> Pod:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CHAT_", "REDIS_", "ANTHROPIC_"))
        }
        env.update(
            CHAT_AUTH="off",
            CHAT_LLM="fake",
            CHAT_FAKE_REPLY_TOKENS="30",
            CHAT_FAKE_TOKEN_DELAY_MS="5",
            CHAT_LOG_LEVEL="INFO",
            CHAT_POD_ID=f"pod{len(pods)}",
            PYTHONUNBUFFERED="1",
        )
        if server is not None:
            env["REDIS_URL"] = server.url
        env.update({k: str(v) for k, v in overrides.items()})
        pod = Pod(free_port(), env, tmp_path / f"pod{len(pods)}.log")
        pods.append(pod)
        pod.start()
        return pod

    try:
        yield make
    finally:
        for pod in pods:
            pod.stop()
