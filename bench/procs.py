"""Processes of a benchmark run: a private redis-server, the servers under
test (durable-chat pods and the peers), and what the kernel says they used.

Like tests/integration/conftest.py: every redis-server and server listens on
a free loopback port (never 6379, never a Redis you already run), every wait
is bounded, and everything started is stopped, by its own pid.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import redis

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kb(pid: int) -> int:
    """Resident set size of a process, in KiB (/proc/<pid>/statm)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_KB


@dataclass
class RedisServer:
    """A private redis-server on a free loopback port, no persistence."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.workdir),
            "--logfile", str(self.workdir / f"redis-{self.port}.log"), "--maxclients", "20000",
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._pings, 10, f"redis-server on port {self.port}")
        return self

    def _pings(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=10)

    def version(self) -> str:
        return str(self.client().info("server")["redis_version"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@dataclass
class Server:
    """One server process under test, listening on ``port``."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    log_path: Path
    ready_path: str | None = None  # HTTP path answering 200 once ready; else TCP accept
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # closed in stop()
        self.proc = subprocess.Popen(
            self.argv, env=self.env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT
        )
        wait_until(self._ready, 30, f"{self.name} on port {self.port}")
        return self

    def _ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited early; see {self.log_path}")
        try:
            if self.ready_path is None:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
            try:
                conn.request("GET", self.ready_path)
                return conn.getresponse().status == 200
            finally:
                conn.close()
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


def base_env() -> dict[str, str]:
    """The caller's environment without anything durable-chat would read."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("CHAT_", "REDIS_", "ANTHROPIC_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def durable_pod(
    name: str, redis_url: str, logdir: Path, overrides: dict[str, str] | None = None
) -> Server:
    """A real durable-chat pod (``python -m app serve``) with the fake model
    stamping its tokens, authentication off and per-user limits off."""
    port = free_port()
    env = base_env()
    env.update(
        REDIS_URL=redis_url,
        CHAT_AUTH="off",
        CHAT_LLM="fake",
        CHAT_FAKE_STAMP="1",
        CHAT_FAKE_TOKEN_DELAY_MS="0",
        CHAT_RATE_PROMPTS_PER_MIN="0",
        CHAT_MAX_THREADS_PER_USER="0",
        CHAT_MAX_SOCKETS_PER_POD="50000",
        CHAT_LOG_LEVEL="WARNING",
        CHAT_POD_ID=name,
    )
    env.update(overrides or {})
    argv = [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return Server(name, argv, env, port, logdir / f"{name}.log", ready_path="/readyz")


def peer_server(
    module: str, name: str, redis_url: str | None, logdir: Path, turn_env: dict[str, str]
) -> Server:
    """A peer server (bench.peers.*) under uvicorn, with the same token stream."""
    port = free_port()
    env = base_env()
    env.update(turn_env)
    argv = [sys.executable, "-m", module, "--port", str(port)]
    if redis_url:
        argv += ["--redis", redis_url]
    return Server(name, argv, env, port, logdir / f"{name}.log")


@contextlib.contextmanager
def running(servers: list[Server]) -> Iterator[list[Server]]:
    """Start ``servers`` (in order) and stop them all on exit."""
    started: list[Server] = []
    try:
        for server in servers:
            started.append(server)
            server.start()
        yield started
    finally:
        for server in reversed(started):
            server.stop()
