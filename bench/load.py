"""The load generator: real WebSocket clients, in a process of their own.

``python -m bench.load SPEC.json RESULT.json`` runs one measurement described
by SPEC (written by bench.run) against servers that are already running, and
writes what it measured to RESULT. Two modes:

``fanout``
    ``threads`` threads with ``listeners`` sockets each, spread round-robin
    over the endpoints (so each pod holds its share of every thread). The
    first socket of each of ``active_threads`` threads is its driver: it sends
    a prompt, waits for the turn's ``done``, and sends the next one, for as
    long as the run lasts. After ``warmup_s``, everything is counted for
    ``duration_s``: frames received (every frame by every socket is one
    delivery), ``delta`` frames, and tokens (each token carries its emission
    stamp ``[t=...]``, so counting stamps counts tokens). A random
    ``probe_fraction`` of the sockets also parses every stamp and records the
    token's emit-to-receive latency. Server and Redis CPU time (from /proc),
    Redis INFO commandstats (after CONFIG RESETSTAT) and, optionally, a
    MONITOR tally of every command by source (client or Lua) cover the same
    window.

``idle``
    Opens ``sockets`` idle sockets on one server (``sockets_per_thread`` to a
    thread), timing the connects, waits until every socket has answered the
    server's first keep-alive ping (and ``settle_s`` has passed), then reads
    the server's RSS and, over ``idle_s`` (one keep-alive interval), its CPU
    use and the keep-alive pings while they sit idle.

The clients are bench.wsclient (one minimal protocol, the same for every
system), speaking each system's own protocol: durable-chat's v1, Socket.IO
(Engine.IO 4, for both the Python and the Node server), or the plain JSON
frames of the broadcaster and bare peers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import resource
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import redis.asyncio as aioredis

from bench import wsclient
from tests.procs import cpu_seconds, rss_kb

STAMP = b"[t="
CONNECT_TIMEOUT_S = 30.0
# The systems that speak Socket.IO (Engine.IO 4 over a WebSocket): Python's and Node's.
SOCKETIO = frozenset({"socketio", "node"})
TURN_TIMEOUT_S = 30.0


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Stats:
    """Counters shared by every socket of the run (one event loop: no locks)."""

    def __init__(self) -> None:
        self.frames = 0
        self.deltas = 0
        self.tokens = 0
        self.turns = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.recording = False
        self.latencies: list[float] = []

    def snapshot(self) -> dict[str, int]:
        return {"frames": self.frames, "deltas": self.deltas, "tokens": self.tokens,
                "turns": self.turns}  # fmt: skip


class Conn:
    """One client socket of one thread, speaking one system's protocol."""

    def __init__(self, system: str, thread: str, stats: Stats, probe: bool) -> None:
        self.system = system
        self.thread = thread
        self.stats = stats
        self.probe = probe
        self.client: wsclient.WSClient | None = None
        self.ready = asyncio.get_running_loop().create_future()
        self.done = asyncio.Event()
        self.failed = False
        self.eio_pings = 0  # Engine.IO's own keep-alive pings (Socket.IO)
        self.on_message: Callable[[bytes, float], None] = (
            self._on_socketio if system in SOCKETIO else self._on_frame
        )

    # --- protocol ------------------------------------------------------------

    def path(self) -> str:
        if self.system == "durable":
            return f"/v1/threads/{self.thread}/ws"
        if self.system in SOCKETIO:
            return "/socket.io/?EIO=4&transport=websocket"
        return f"/ws/{self.thread}"

    def prompt(self, content: str) -> str:
        if self.system in SOCKETIO:
            return "42" + json.dumps(["prompt", {"thread": self.thread, "content": content}])
        return json.dumps({"type": "prompt", "content": content})

    def _on_socketio(self, data: bytes, now: float) -> None:
        assert self.client is not None
        if data.startswith(b'42["chat"'):
            self._on_frame(data, now)
        elif data == b"2":  # Engine.IO ping
            self.eio_pings += 1
            self.client.send_text(b"3")
        elif data.startswith(b'42["ready"'):
            if not self.ready.done():
                self.ready.set_result(None)
        elif data.startswith(b"40"):  # namespace connected: join the room
            self.client.send_text("42" + json.dumps(["join", self.thread]))
        elif data.startswith(b"0"):  # Engine.IO open: connect the default namespace
            self.client.send_text(b"40")

    def _on_frame(self, data: bytes, now: float) -> None:
        stats = self.stats
        at = data.find(b"type", 0, 160)
        kind = data[at + 4 : at + 14]
        if b"delta" in kind:
            stats.frames += 1
            stats.deltas += 1
            stats.tokens += data.count(STAMP)
            if self.probe and stats.recording:
                record = stats.latencies.append
                for part in data.split(STAMP)[1:]:
                    record(now - float(part[: part.find(b"]")]))
        elif b"done" in kind:
            stats.frames += 1
            if self.done is not None:
                self.done.set()
        elif b"ready" in kind:
            if not self.ready.done():
                self.ready.set_result(None)
        elif b"error" in kind:
            stats.errors[data[:200].decode(errors="replace")] += 1
            self.failed = True
            self.done.set()
        else:
            stats.frames += 1

    # --- lifecycle -----------------------------------------------------------

    async def open(self, host: str, port: int) -> None:
        self.client = await wsclient.connect(
            host, port, self.path(), self.on_message, on_open=self._bind
        )
        await self.ready

    @property
    def keepalives(self) -> int:
        """The server's keep-alive pings this socket answered: WebSocket
        pings and, for Socket.IO, Engine.IO's."""
        return self.eio_pings + (self.client.pings if self.client is not None else 0)

    def _bind(self, client: wsclient.WSClient) -> None:
        self.client = client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


async def _open_all(
    conns: list[tuple[Conn, tuple[str, int]]], concurrency: int
) -> tuple[float, int]:
    """Open every socket (``concurrency`` handshakes at a time); returns the
    seconds it took and how many failed."""
    gate = asyncio.Semaphore(concurrency)
    failures = 0

    async def one(conn: Conn, endpoint: tuple[str, int]) -> None:
        nonlocal failures
        async with gate:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await conn.open(*endpoint)
            except (OSError, TimeoutError, wsclient.HandshakeError) as exc:
                failures += 1
                conn.stats.errors[f"connect: {type(exc).__name__}: {exc}"[:200]] += 1

    started = time.perf_counter()
    await asyncio.gather(*(one(c, e) for c, e in conns))
    return time.perf_counter() - started, failures


class Monitor:
    """Counts every command Redis runs, by source (a client, or Lua) and name."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.counts: collections.Counter[str] = collections.Counter()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 24)
        writer.write(b"MONITOR\r\n")
        await reader.readline()
        self._task = asyncio.create_task(self._read(reader, writer))

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                close = line.find(b"]")
                source = "lua" if line[close - 3 : close] == b"lua" else "client"
                start = line.find(b'"', close) + 1
                end = line.find(b'"', start)
                command = line[start:end].decode().upper()
                if command == "EVALSHA":  # which script: its SHA1 (bench.run names it)
                    command += ":" + line[end + 3 : end + 43].decode()
                self.counts[f"{source}:{command}"] += 1
        finally:
            writer.close()

    async def stop(self) -> dict[str, int]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return dict(self.counts)


def _percentiles(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    values.sort()
    n = len(values)

    def at(q: float) -> float:
        return values[min(n - 1, int(q * n))] * 1000

    # 200 points of the distribution, for the plot.
    cdf = [round(values[min(n - 1, int(i * n / 200))] * 1000, 3) for i in range(200)]
    return {
        "count": n, "p50_ms": at(0.50), "p90_ms": at(0.90), "p99_ms": at(0.99),
        "p999_ms": at(0.999), "max_ms": values[-1] * 1000, "min_ms": values[0] * 1000,
        "cdf_ms": cdf,
    }  # fmt: skip


def _cpu(pids: list[int]) -> dict[str, float]:
    return {str(pid): cpu_seconds(pid) for pid in pids}


async def fanout(spec: dict[str, Any]) -> dict[str, Any]:
    system = spec["system"]
    endpoints = [tuple(e) for e in spec["endpoints"]]
    threads, listeners = spec["threads"], spec["listeners"]
    active = min(spec.get("active_threads") or threads, threads)
    rng = random.Random(spec.get("seed", 1))
    stats = Stats()
    run_id = spec.get("run_id", "r")
    names = [f"{run_id}-t{i}" for i in range(threads)]
    by_thread: list[list[Conn]] = []
    plan: list[tuple[Conn, tuple[str, int]]] = []
    for i, thread in enumerate(names):
        conns = []
        for j in range(listeners):
            conn = Conn(system, thread, stats, rng.random() < spec.get("probe_fraction", 0.2))
            conns.append(conn)
            plan.append((conn, endpoints[(i + j) % len(endpoints)]))
        by_thread.append(conns)
    connect_s, failed = await _open_all(plan, spec.get("connect_concurrency", 100))
    if failed:
        raise RuntimeError(f"{failed} sockets failed to connect: {stats.errors.most_common(3)}")

    stopping = asyncio.Event()
    # The bare peer has no cross-process delivery: its prompt goes to every process.
    per_thread_drivers = len(endpoints) if system == "bare" else 1

    async def drive(conns: list[Conn], k: int) -> None:
        drivers = conns[:per_thread_drivers]
        turn = 0
        while not stopping.is_set():
            for d in drivers:
                d.done.clear()
                d.failed = False
                assert d.client is not None
                d.client.send_text(d.prompt(f"bench prompt {k} {turn}"))
            try:
                async with asyncio.timeout(TURN_TIMEOUT_S):
                    for d in drivers:
                        await d.done.wait()
            except TimeoutError:
                stats.errors["turn timed out"] += 1
                continue
            if any(d.failed for d in drivers):
                await asyncio.sleep(0.01)  # thread_busy or the like: try again
                continue
            stats.turns += 1
            turn += 1
            if spec.get("think_s"):
                await asyncio.sleep(spec["think_s"])

    tasks = [asyncio.create_task(drive(by_thread[k], k)) for k in range(active)]
    redis = aioredis.Redis.from_url(spec["redis_url"]) if spec.get("redis_url") else None
    pids: list[int] = spec.get("server_pids", [])
    redis_pid = spec.get("redis_pid")
    monitor = Monitor(spec["redis_port"]) if spec.get("monitor") else None
    try:
        await asyncio.sleep(spec.get("warmup_s", 2.0))
        if redis is not None:
            await redis.config_resetstat()
        if monitor is not None:
            await monitor.start()
        before = stats.snapshot()
        cpu0, rcpu0 = _cpu(pids), cpu_seconds(redis_pid) if redis_pid else 0.0
        self0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        stats.recording = True
        await asyncio.sleep(spec.get("duration_s", 8.0))
        stats.recording = False
        elapsed = time.perf_counter() - t0
        after = stats.snapshot()
        cpu1, rcpu1 = _cpu(pids), cpu_seconds(redis_pid) if redis_pid else 0.0
        self1 = resource.getrusage(resource.RUSAGE_SELF)
        commandstats = await redis.info("commandstats") if redis is not None else {}
        monitored = await monitor.stop() if monitor is not None else None
    finally:
        stopping.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(TURN_TIMEOUT_S):
                await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            task.cancel()
        for conn, _ in plan:
            conn.close()
        if redis is not None:
            await redis.aclose()
    counts = {k: after[k] - before[k] for k in after}
    return {
        "mode": "fanout", "system": system, "threads": threads, "listeners": listeners,
        "active_threads": active, "sockets": len(plan), "endpoints": len(endpoints),
        "connect_s": connect_s, "elapsed_s": elapsed, "counts": counts,
        "rates": {f"{k}_per_s": v / elapsed for k, v in counts.items()},
        "latency": _percentiles(stats.latencies),
        "server_cpu_s": {pid: cpu1[pid] - cpu0[pid] for pid in cpu0},
        "redis_cpu_s": rcpu1 - rcpu0,
        "loadgen_cpu_s": (self1.ru_utime + self1.ru_stime) - (self0.ru_utime + self0.ru_stime),
        "commandstats": {k.removeprefix("cmdstat_"): v["calls"] for k, v in commandstats.items()},
        "monitor": monitored, "errors": dict(stats.errors.most_common(10)),
    }  # fmt: skip


async def idle(spec: dict[str, Any]) -> dict[str, Any]:
    system = spec["system"]
    endpoint = tuple(spec["endpoints"][0])
    pid = spec["server_pids"][0]
    sockets, per_thread = spec["sockets"], spec.get("sockets_per_thread", 1)
    stats = Stats()
    run_id = spec.get("run_id", "r")
    plan = [
        (Conn(system, f"{run_id}-i{i // per_thread}", stats, False), endpoint)
        for i in range(sockets)
    ]
    await asyncio.sleep(0.5)
    rss0 = rss_kb(pid)
    connect_cpu0 = cpu_seconds(pid)
    connect_s, failed = await _open_all(plan, spec.get("connect_concurrency", 100))
    connect_cpu = cpu_seconds(pid) - connect_cpu0
    held_conns = [conn for conn, _ in plan if conn.ready.done() and not conn.ready.cancelled()]
    # What the idle server sends Redis: every command but this one's own.
    redis = aioredis.Redis.from_url(spec["redis_url"]) if spec.get("redis_url") else None
    try:
        # Idle means after the first keep-alive ping: every socket has answered
        # one (and at least settle_s has passed), so the window below is the
        # steady state, pings and their timers included.
        settled = time.perf_counter()
        deadline = settled + spec.get("keepalive_wait_s", 60.0)
        while any(conn.keepalives == 0 for conn in held_conns):
            if time.perf_counter() > deadline:
                raise RuntimeError(
                    f"{sum(c.keepalives == 0 for c in held_conns)} of {len(held_conns)} sockets "
                    f"had no keep-alive ping within {spec.get('keepalive_wait_s', 60.0)} s"
                )
            await asyncio.sleep(0.25)
        first_ping_s = time.perf_counter() - settled
        await asyncio.sleep(max(0.0, spec.get("settle_s", 2.0) - first_ping_s))
        rss1 = rss_kb(pid)
        if redis is not None:
            await redis.config_resetstat()
        # The commands the server sends (round trips), apart from those its
        # scripts run: only MONITOR tells them apart.
        monitor = Monitor(spec["redis_port"]) if spec.get("redis_port") else None
        if monitor is not None:
            await monitor.start()
        pings0 = sum(conn.keepalives for conn in held_conns)
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        # The window is one keep-alive interval: every socket is pinged once in it.
        await asyncio.sleep(spec.get("idle_s", 5.0))
        elapsed = time.perf_counter() - t0
        idle_cpu = (cpu_seconds(pid) - cpu0) / elapsed
        pings = sum(conn.keepalives for conn in held_conns) - pings0
        rss2 = rss_kb(pid)
        monitored = await monitor.stop() if monitor is not None else {}
        stats_now = await redis.info("commandstats") if redis is not None else {}
    finally:
        for conn, _ in plan:
            conn.close()
        if redis is not None:
            await redis.aclose()
    ours = {"cmdstat_config|resetstat", "cmdstat_info"}
    calls = sum(v["calls"] for k, v in stats_now.items() if k not in ours)
    held = sockets - failed
    return {
        "mode": "idle", "system": system, "sockets": sockets, "held": held,
        "connect_failures": failed, "connect_s": connect_s,
        "connect_per_s": held / connect_s if connect_s else 0.0,
        # The server's CPU while the sockets connected, per socket held.
        "connect_cpu_ms": connect_cpu * 1000 / held if held else None,
        "rss0_kb": rss0, "rss1_kb": rss1, "rss2_kb": rss2,
        "rss_per_socket_kb": (max(rss1, rss2) - rss0) / held if held else None,
        "idle_cpu_fraction": idle_cpu, "errors": dict(stats.errors.most_common(5)),
        "idle_s": elapsed, "first_ping_s": first_ping_s,
        "keepalive_interval_s": spec.get("keepalive_interval_s"),
        "keepalives_per_socket": pings / held if held else None,
        "redis_commands_per_s": calls / elapsed if redis is not None else None,
        "redis_round_trips_per_s": (
            sum(n for k, n in monitored.items() if k.startswith("client:")) / elapsed
            if monitor is not None else None
        ),
        "redis_commands": {
            k.removeprefix("cmdstat_"): v["calls"] for k, v in stats_now.items() if k not in ours
        },
    }  # fmt: skip


async def main_async(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["mode"] == "fanout":
        return await fanout(spec)
    if spec["mode"] == "idle":
        return await idle(spec)
    raise ValueError(f"unknown mode {spec['mode']!r}")


def run_process(work: Callable[[dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]]) -> None:
    """A load generator process: read the spec (argv[1]), run ``work`` on it
    (on uvloop when installed), write its result (argv[2])."""
    spec_path, result_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    _raise_fd_limit()
    try:
        import uvloop

        result = uvloop.run(work(spec))
    except ImportError:
        result = asyncio.run(work(spec))
    with open(result_path, "w") as f:
        json.dump(result, f, indent=1)


def main() -> None:
    run_process(main_async)


if __name__ == "__main__":
    main()
