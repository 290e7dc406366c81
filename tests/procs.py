"""Real processes for the integration tests and the benchmarks: a private
redis-server, durable-chat pods and other servers, and what the kernel says
they used.

Every redis-server and server listens on a free loopback port (never 6379,
never a Redis you already run), every wait is bounded, and everything started
is stopped by its own pid. This module needs no pytest: tests/integration's
conftest wraps it in fixtures, and bench/ imports it as it is.
"""

from __future__ import annotations

import contextlib
import glob
import http.client
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import psycopg
import redis

ROOT = Path(__file__).resolve().parent.parent
REDIS_SERVER = shutil.which("redis-server")


def _postgres_bin() -> Path | None:
    """Debian's PostgreSQL server binaries (not on PATH), or any on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


POSTGRES_BIN = _postgres_bin()
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

T = TypeVar("T")


# Under pytest-xdist each worker ("gw0", "gw1"...) takes its ports from a
# range of its own, below the kernel's ephemeral range (32768 and up, where
# bind(0) and outgoing connections take theirs): between the check here and
# the server's own bind, another worker could otherwise be handed the same
# free port.
WORKER_PORTS = 3000
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
_worker_ports: Iterator[int] | None = None
if _WORKER.startswith("gw"):
    _first = 10000 + int(_WORKER[2:]) * WORKER_PORTS
    _worker_ports = itertools.cycle(range(_first, _first + WORKER_PORTS))


def free_port() -> int:
    """A loopback port no one listens on."""
    if _worker_ports is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    while True:
        port = next(_worker_ports)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # taken: the next one
                continue
        return port


def wait_until(
    predicate: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "condition"
) -> T:
    """Poll ``predicate`` until it returns something truthy (returned), or
    fail with an AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


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
    """One redis-server on a free loopback port, its files in ``workdir``.
    stop() and start() again keep the port (and, when ``persistent``, the
    data: append-only file, fsync always)."""

    workdir: Path
    port: int = field(default_factory=free_port)
    persistent: bool = False
    maxclients: int = 10000  # redis-server's own default
    proc: subprocess.Popen[bytes] | None = None
    # More redis-server arguments (``--replicaof``, ``--maxmemory``...).
    args: tuple[str, ...] = ()
    # ``requirepass`` (and ``masterauth``, for a replica of a server like it).
    password: str | None = None
    # TLS only, on ``port`` (replication too): the CA, certificate and key files.
    tls: tuple[Path, Path, Path] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> RedisServer:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log"),
            "--maxclients", str(self.maxclients),
        ]  # fmt: skip
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else [
            "--appendonly", "no"
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        if self.tls:
            ca, cert, key = (str(path) for path in self.tls)
            args += [
                "--port", "0", "--tls-port", str(self.port), "--tls-replication", "yes",
                "--tls-ca-cert-file", ca, "--tls-cert-file", cert, "--tls-key-file", key,
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        args += self.args
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._pings, 10, what=f"redis-server on port {self.port}")
        return self

    def _pings(self) -> bool:
        try:
            client = redis.Redis(port=self.port, socket_timeout=0.5, **self.credentials)
            return bool(client.ping())
        except redis.RedisError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(
            port=self.port, decode_responses=True, socket_timeout=10, **self.credentials
        )

    @property
    def credentials(self) -> dict[str, Any]:
        """redis-py's arguments for this server's password and TLS."""
        found: dict[str, Any] = {"password": self.password}
        if self.tls:
            found |= {"ssl": True, "ssl_ca_certs": str(self.tls[0])}
        return found

    def version(self) -> str:
        return str(self.client().info("server")["redis_version"])

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Kill it (SIGKILL unless ``sig`` says otherwise) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
        self.proc = None


@dataclass
class PostgresServer:
    """One PostgreSQL on a free loopback port, its cluster in ``workdir``
    (initdb'd on first start; trust authentication, user ``chat``, no
    fsync: a test's data need not outlive the machine). PostgreSQL refuses
    to run as root: as root, it runs as the ``postgres`` user (which the
    Debian package creates), so ``workdir``'s parents must let it through
    (a directory right under /tmp does)."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://chat@127.0.0.1:{self.port}/postgres"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _user(self) -> str | None:
        return "postgres" if os.geteuid() == 0 else None

    def start(self) -> PostgresServer:
        if POSTGRES_BIN is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install -y postgresql)")
        user = self._user()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if user is not None:
            record = pwd.getpwnam(user)
            os.chown(self.workdir, record.pw_uid, record.pw_gid)
        data = self.workdir / "data"
        if not data.exists():
            subprocess.run(
                [str(POSTGRES_BIN / "initdb"), "-D", str(data), "-U", "chat", "--auth=trust",
                 "-E", "UTF8", "--no-sync", "--no-instructions"],
                user=user, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
        with open(self.workdir / "postgres.log", "ab") as log:
            self.proc = subprocess.Popen(
                [str(POSTGRES_BIN / "postgres"), "-D", str(data), "-p", str(self.port),
                 "-k", str(self.workdir), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                 "-c", "full_page_writes=off", "-c", "synchronous_commit=off"],
                user=user, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_until(self._accepts, 30, what=f"postgres on port {self.port}")
        return self

    def _accepts(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"postgres exited early:\n{self.logs()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                pass
        except OSError:
            return False
        try:
            psycopg.connect(self.url, connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def logs(self) -> str:
        path = self.workdir / "postgres.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Immediate shutdown (SIGQUIT), then wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None


@dataclass
class Server:
    """One server process (a pod, a peer) listening on ``port``, its output
    in ``log_path``. Ready when ``ready_path`` answers 200 over HTTP, or,
    without one, when the port accepts a connection."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    log_path: Path
    ready_path: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> Server:
        """Start (or start again, same port, log appended) and wait until ready."""
        return self.launch().wait_ready(timeout)

    def launch(self) -> Server:
        """Start the process (or start it again, same port, log appended)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._close_log()
        self._log = open(self.log_path, "ab")  # closed in stop()
        self.proc = subprocess.Popen(
            self.argv, env=self.env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT
        )
        return self

    def wait_ready(self, timeout: float = 30) -> Server:
        wait_until(self.ready, timeout, what=f"{self.name} on port {self.port} to be ready")
        return self

    def ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited early:\n{self.logs()}")
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
        """SIGTERM, then SIGKILL if it is still there after 15 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def base_env() -> dict[str, str]:
    """The caller's environment without anything durable-chat would read."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("CHAT_", "REDIS_", "ANTHROPIC_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def pod(name: str, redis_url: str | None, log_path: Path, **settings: str | int | float) -> Server:
    """A real durable-chat pod (``python -m app serve``, not yet started):
    the fake model, authentication off, ``REDIS_URL`` unless None (embedded),
    then ``settings`` (the app's environment names: CHAT_LOCK_TTL_MS=...)."""
    port = free_port()
    env = base_env()
    env.update(CHAT_AUTH="off", CHAT_LLM="fake", CHAT_POD_ID=name)
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    env.update({k: str(v) for k, v in settings.items()})
    argv = [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return Server(name, argv, env, port, log_path, ready_path="/readyz")


@contextlib.contextmanager
def running(servers: list[Server]) -> Iterator[list[Server]]:
    """Start ``servers`` side by side (a pod's start is mostly its imports, one
    core each), wait until each is ready, and stop them all on exit."""
    started: list[Server] = []
    try:
        for server in servers:
            started.append(server.launch())
        for server in started:
            server.wait_ready()
        yield started
    finally:
        for server in reversed(started):
            server.stop()
