"""The reconnect storm: a pod drains, and its sockets resume on the other one.

``phase(bench)`` is bench.run's ``storm`` phase; ``python -m bench.storm
SPEC.json RESULT.json`` runs its two load generators, each a process of its
own: pod B's own streams (``streams``: their sockets, their prompts, the
latency), and pod A's sockets (``storm``: opened, drained, resumed), so
that thousands of reconnects never delay the reading of the streams measured.

Two durable-chat pods, A and B, on one Redis. Pod A holds ``storm_sockets``
sockets spread over ``storm_threads`` threads. On pod B, each of the first
``storm_active`` threads has ``storm_listeners`` sockets, the first of which
sends prompts back to back, so the turns run on pod B at an LLM's pace (one
token per 20 ms, no coalescing window) and pod A's sockets on those threads
receive them through Redis. After a warm-up (every streaming thread has
finished turns) and a calm window, pod A gets SIGTERM: its drain closes every
socket with 1012, and each client reconnects to pod B, the one pod left, with
``after`` (its last event's id) and ``epoch``, backing off between failed
attempts as app/client.py does (50 ms first).

Checked, for every socket of both pods, from the timeline's ``n`` (1, 2, 3, …
per thread): nothing lost (a hole in ``n``) or doubled (an ``n`` seen again),
across the reconnect; and once the prompts stop, every socket ends on its
thread's last event. Measured: the storm's duration (SIGTERM to the last
socket's ``ready`` on pod B), each socket's time without a socket, and the
emit-to-receive latency of the tokens pod B's own sockets received during
the storm, against the calm window before it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import load, wsclient
from bench.bigroom import LAG_PROBE_MS, _lag, _lag_buckets
from tests.procs import ROOT, Server, cpu_seconds, running

if TYPE_CHECKING:
    from bench.run import Bench

# app/client.py's reconnect delays: the first attempt after 50 ms, then backing off.
RECONNECT_DELAYS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
MAX_ATTEMPTS = 50
CONNECT_TIMEOUT_S = 10.0
STORM_TIMEOUT_S = 60.0
CATCH_UP_TIMEOUT_S = 20.0
STAMP = "[t="


class Run:
    """What every socket of the run shares (one event loop: no locks)."""

    def __init__(self) -> None:
        # (received at, emit-to-receive) of every token the probing sockets read
        self.latencies: list[tuple[float, float]] = []
        # (received at, commit-to-receive) of every delta they read
        self.commit_latencies: list[tuple[float, float]] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.progress = asyncio.Event()  # set by every timeline event received
        self.moving = 0  # pod A's sockets not yet resumed on pod B (nor given up)
        self.moved = asyncio.Event()
        # (when, how late) this process's own event loop ran a 5 ms ticker:
        # tokens read late because the client was busy are not the pod's.
        self.lag: list[tuple[float, float]] = []

    def settled(self) -> None:
        self.moving -= 1
        if self.moving == 0:
            self.moved.set()

    async def tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(0.005)
            self.lag.append((time.time(), loop.time() - started - 0.005))


class Sock:
    """One client of one thread: durable-chat's protocol, with the position
    (last event id, ``n``, epoch) a client keeps to resume exactly."""

    def __init__(self, run: Run, thread: str, probe: bool) -> None:
        self.run = run
        self.thread = thread
        self.probe = probe  # parse the stamps (pod B's connected streams)
        self.client: wsclient.WSClient | None = None
        self.ready = asyncio.Event()
        self.done = asyncio.Event()
        self.failed = False
        self.epoch: str | None = None
        self.last_id: str | None = None
        self.last_n: int | None = None
        self.events = 0
        self.lost = 0  # events skipped: holes in n
        self.doubled = 0  # events received again
        self.not_recovered = 0
        self.closed_at: float | None = None
        self.close_code: int | None = None
        self.resumed_at: float | None = None
        self.closed_again = 0  # closes after the first (not the drain's)
        self.attempts = 0

    def path(self) -> str:
        query = f"?after={self.last_id}&epoch={self.epoch}" if self.last_id else ""
        return f"/v1/threads/{self.thread}/ws{query}"

    def on_message(self, data: bytes, now: float) -> None:
        frame = json.loads(data)
        n = frame.get("n")
        kind = frame.get("type")
        if n is not None:
            self.events += 1
            if self.last_n is not None and n <= self.last_n:
                self.doubled += 1
                return
            if self.last_n is not None and n > self.last_n + 1:
                self.lost += n - self.last_n - 1
            self.last_n, self.last_id = n, frame["id"]
            self.run.progress.set()
            if kind == "delta" and self.probe:
                record = self.run.latencies.append
                # The event id's first part is Redis's clock at the commit.
                committed = int(frame["id"].split("-")[0]) / 1000
                self.run.commit_latencies.append((now, now - committed))
                for part in frame["text"].split(STAMP)[1:]:
                    record((now, now - float(part[: part.find("]")])))
            elif kind == "done":
                self.done.set()
        elif kind == "ready":
            self.epoch = frame["epoch"]
            if frame.get("recovered") is False:
                self.not_recovered += 1
            if self.last_id is None and not frame["generating"]:
                # As app/client.py: a first join of an idle thread resumes from here.
                self.last_id = frame["last_event_id"]
            self.ready.set()
        elif kind == "error":
            self.run.errors[f"{frame.get('code')}: {frame.get('message')}"[:200]] += 1
            self.failed = True
            self.done.set()

    async def connect(self, endpoint: tuple[str, int]) -> None:
        """One attempt: returns once ``ready`` came, raises if the socket
        could not be opened or was closed before it."""
        self.ready = asyncio.Event()
        self.client = await wsclient.connect(*endpoint, self.path(), self.on_message)
        ready = asyncio.ensure_future(self.ready.wait())
        try:
            await asyncio.wait([ready, self.client.closed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if not self.ready.is_set():
            raise ConnectionError(f"closed before ready ({self.client.close_code})")

    async def open(self, endpoint: tuple[str, int], first_delay: bool) -> bool:
        """Connect, trying again as app/client.py does (its delays, before
        each attempt after a drop; False after MAX_ATTEMPTS failed)."""
        for failures in range(MAX_ATTEMPTS):
            if failures or first_delay:
                await asyncio.sleep(RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)])
            self.attempts += 1
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await self.connect(endpoint)
                return True
            except (OSError, TimeoutError, wsclient.HandshakeError) as exc:
                self.run.errors[f"connect: {type(exc).__name__}: {exc}"[:120]] += 1
                if self.client is not None:
                    self.client.abort()
        return False

    async def keep(self, endpoint: tuple[str, int], moving: bool) -> None:
        """Whenever this socket closes (the drain, or anything else), resume on
        ``endpoint``, the pod left; ``moving``: one of the drained pod's."""
        while self.client is not None:
            await self.client.closed
            if self.closed_at is None:
                self.closed_at, self.close_code = time.time(), self.client.close_code
            else:
                self.closed_again += 1
            resumed = await self.open(endpoint, first_delay=True)
            if moving and self.resumed_at is None:
                self.resumed_at = time.time() if resumed else None
                self.run.settled()
            if not resumed:
                return


async def _open(socks: list[Sock], endpoint: tuple[str, int], concurrency: int = 100) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(sock: Sock) -> None:
        async with gate:
            if not await sock.open(endpoint, first_delay=False):
                raise RuntimeError(
                    f"a socket of {sock.thread} could not connect: {sock.run.errors}"
                )

    await asyncio.gather(*(one(s) for s in socks))


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)
    n = len(values)
    return {
        "p50_s": values[n // 2], "p99_s": values[min(n - 1, int(0.99 * n))], "max_s": values[-1]
    }  # fmt: skip


def _window(samples: list[tuple[float, float]], start: float, end: float) -> dict[str, Any]:
    return load._percentiles([v for at, v in samples if start <= at < end])


async def _until(path: Path, timeout_s: float) -> dict[str, Any]:
    """The JSON another process writes to ``path``, once it is there."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():  # noqa: ASYNC240 (another process writes it: a stat, no more)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path.name} did not come within {timeout_s:.0f} s")
        await asyncio.sleep(0.05)
    result: dict[str, Any] = json.loads(path.read_text())  # noqa: ASYNC240 (a few bytes)
    return result


def _write(path: Path, value: object) -> None:
    """Write ``path`` whole (renamed into place: its reader never sees half)."""
    part = path.with_suffix(".part")
    part.write_text(json.dumps(value))
    os.replace(part, path)


async def _caught_up(run: Run, socks: list[Sock], final: dict[str, int | None]) -> int:
    """Wait (bounded) for every socket to reach its thread's last event;
    returns how many did not."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(CATCH_UP_TIMEOUT_S):
            while any(s.last_n != final[s.thread] for s in socks if s.thread in final):
                run.progress.clear()
                await run.progress.wait()
    return sum(1 for s in socks if s.thread in final and s.last_n != final[s.thread])


def _checks(socks: list[Sock]) -> dict[str, int]:
    return {
        "events": sum(s.events for s in socks), "lost": sum(s.lost for s in socks),
        "doubled": sum(s.doubled for s in socks),
    }  # fmt: skip


async def streams(spec: dict[str, Any]) -> dict[str, Any]:
    """Pod B's own streams, in a process of their own (so that the storm's
    5,000 reconnects in the other process never delay reading them): the
    sockets of the streaming threads on pod B, their drivers, the latency."""
    run = Run()
    pod_b = tuple(spec["endpoints"][1])
    listeners = spec["listeners"]
    socks = [Sock(run, t, probe=True) for t in spec["active"] for _ in range(listeners)]
    await _open(socks, pod_b)
    keeping = [asyncio.create_task(s.keep(pod_b, moving=False)) for s in socks]
    drivers = socks[::listeners]
    stopping = asyncio.Event()
    turns = collections.Counter[str]()

    async def drive(driver: Sock, k: int) -> None:
        turn = 0
        while not stopping.is_set():
            driver.done.clear()
            driver.failed = False
            assert driver.client is not None
            driver.client.send_text(
                json.dumps({"type": "prompt", "content": f"storm prompt {k} {turn}"})
            )
            try:
                async with asyncio.timeout(load.TURN_TIMEOUT_S):
                    await driver.done.wait()
            except TimeoutError:
                run.errors["turn timed out"] += 1
                continue
            if driver.failed:
                await asyncio.sleep(0.05)
                continue
            turns[driver.thread] += 1
            turn += 1

    driving = [asyncio.create_task(drive(d, k)) for k, d in enumerate(drivers)]
    ticker = asyncio.create_task(run.tick())
    _write(Path(spec["ready_path"]), {})
    try:
        times = await _until(Path(spec["stop_path"]), spec["stop_wait_s"])
    finally:
        stopping.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(load.TURN_TIMEOUT_S):
                await asyncio.gather(*driving, return_exceptions=True)
        for task in [*driving, ticker]:
            task.cancel()
    final = {d.thread: d.last_n for d in drivers}
    _write(Path(spec["final_path"]), final)
    behind = await _caught_up(run, socks, final)
    for task in keeping:
        task.cancel()
    for s in socks:
        if s.client is not None:
            s.client.close()
    calm0, t0, t_end = times["calm0"], times["t0"], times["t_end"]
    return {
        "turns": sum(turns.values()), **_checks(socks), "behind_at_end": behind,
        "closed": sum(1 for s in socks if s.closed_at is not None),
        "latency_calm": _window(run.latencies, calm0, t0),
        "latency_storm": _window(run.latencies, t0, t_end),
        "commit_storm": _window(run.commit_latencies, t0, t_end),
        "commit_calm": _window(run.commit_latencies, calm0, t0),
        "lag_calm": _window(run.lag, calm0, t0), "lag_storm": _window(run.lag, t0, t_end),
        "errors": dict(run.errors.most_common(10)),
    }  # fmt: skip


async def storm(spec: dict[str, Any]) -> dict[str, Any]:
    """Pod A's sockets: opened, drained with pod A, resumed on pod B."""
    run = Run()
    pod_a, pod_b = (tuple(e) for e in spec["endpoints"])
    threads = [f"{spec['run_id']}-s{i}" for i in range(spec["threads"])]
    on_a = [Sock(run, threads[i % len(threads)], probe=False) for i in range(spec["sockets"])]
    started = time.perf_counter()
    await _open(on_a, pod_a)
    connect_s = time.perf_counter() - started
    run.moving = len(on_a)
    connect_attempts = sum(s.attempts for s in on_a)
    keeping = [asyncio.create_task(s.keep(pod_b, moving=True)) for s in on_a]
    b_pid, a_pid = spec["server_pids"][1], spec["server_pids"][0]
    stop = Path(spec["stop_path"])
    times = {"calm0": 0.0, "t0": 0.0, "t_end": 0.0}
    try:
        await asyncio.sleep(spec["warmup_s"])
        times["calm0"] = time.time()
        await asyncio.sleep(spec["calm_s"])
        active = set(spec["active"])
        unchecked = sum(1 for s in on_a if s.thread in active and s.last_n is None)
        lag0 = await _pod_lag(pod_b[1])
        cpu0, self0 = cpu_seconds(b_pid), _self_cpu()
        t0 = times["t0"] = time.time()
        os.kill(a_pid, signal.SIGTERM)  # pod A drains: its sockets close with 1012
        with contextlib.suppress(TimeoutError):  # reported: failed_to_resume, timed_out
            async with asyncio.timeout(STORM_TIMEOUT_S):
                await run.moved.wait()
        t_end = times["t_end"] = time.time()
        b_cores = (cpu_seconds(b_pid) - cpu0) / (t_end - t0)
        loadgen_cores = (_self_cpu() - self0) / (t_end - t0)
        lag1 = await _pod_lag(pod_b[1])
        await asyncio.sleep(spec.get("after_s", 1.0))
    finally:
        _write(stop, times)  # the streams stop their prompts
    final = await _until(Path(spec["final_path"]), load.TURN_TIMEOUT_S + 10)
    behind = await _caught_up(run, on_a, final)
    for task in keeping:
        task.cancel()
    for s in on_a:
        if s.client is not None:
            s.client.close()
    resumed = [s for s in on_a if s.resumed_at is not None]
    return {
        "mode": "storm", "sockets": len(on_a), "threads": len(threads),
        "active_threads": len(spec["active"]), "listeners": spec["listeners"],
        "connect_s": connect_s, "storm_s": t_end - t0, "timed_out": not run.moved.is_set(),
        "closed_s": max((s.closed_at or t0) for s in on_a) - t0,
        "close_codes": dict(collections.Counter(str(s.close_code) for s in on_a)),
        "resumed": len(resumed), "failed_to_resume": len(on_a) - len(resumed),
        "attempts": sum(s.attempts for s in on_a) - connect_attempts,
        "connect_attempts": connect_attempts,
        "closed_again": sum(s.closed_again for s in on_a),
        "not_recovered": sum(s.not_recovered for s in on_a),
        "offline": _spread([s.resumed_at - s.closed_at for s in resumed if s.closed_at]),
        **_checks(on_a), "behind_at_end": behind, "unchecked_sockets": unchecked,
        "pod_b_cores_in_storm": b_cores, "loadgen_cores_in_storm": loadgen_cores,
        "pod_b_loop_lag": {clock: _lag(lag0.get(clock, {}), lag1[clock]) for clock in lag1},
        "errors": dict(run.errors.most_common(10)),
    }  # fmt: skip


async def _pod_lag(port: int) -> dict[str, dict[float, float]]:
    """Pod B's loop-lag histograms, or none when it does not answer in time:
    on a loaded machine a storm can outlast STORM_TIMEOUT_S, and pod B's
    listen backlog is then still full of reconnects. The storm's own figures
    are reported all the same."""
    try:
        return await asyncio.to_thread(_lag_buckets, port)
    except OSError as exc:  # urllib's timeouts are OSErrors too
        print(f"  pod B's loop lag not read: {exc}", file=sys.stderr, flush=True)
        return {}


def phase(bench: Bench) -> dict[str, Any]:
    """bench.run's ``storm`` phase: two pods, pod A drained under load."""
    c = bench.config
    print(
        f"storm: {c.storm_sockets} sockets on pod A over {c.storm_threads} threads, "
        f"{c.storm_active} streaming from pod B ({c.storm_listeners} sockets each there); "
        "pod A drained",
        flush=True,
    )
    env = {
        "CHAT_FAKE_REPLY_TOKENS": "100", "CHAT_FAKE_TOKEN_DELAY_MS": "20",
        "CHAT_DELTA_WINDOW_MS": "0", "CHAT_DELTA_MAX_BYTES": "2048",
    }  # fmt: skip
    # The pods' own event-loop lag probe (read from pod B's /metrics around the storm).
    servers = bench._servers("durable", 2, env, {"CHAT_LOOP_LAG_PROBE_MS": str(LAG_PROBE_MS)})
    run_id = f"r{bench.runs}"
    files = {k: bench.tmp / f"storm{bench.runs}.{k}" for k in ("ready", "stop", "final", "streams")}
    try:
        with running(servers):
            spec = {
                "run_id": run_id, "endpoints": [["127.0.0.1", s.port] for s in servers],
                "server_pids": [s.pid for s in servers],
                "sockets": c.storm_sockets, "threads": c.storm_threads,
                "active": [f"{run_id}-s{i}" for i in range(c.storm_active)],
                "listeners": c.storm_listeners, "warmup_s": c.warmup_s + 2.0,
                "calm_s": c.storm_calm_s, "duration_s": STORM_TIMEOUT_S + 120,
                "stop_wait_s": STORM_TIMEOUT_S + 180,
                **{f"{k}_path": str(path) for k, path in files.items()},
            }  # fmt: skip
            r = _run(bench, spec, files)
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
        print(f"  storm: FAILED: {exc}", file=sys.stderr)
        return {"failed": str(exc)[-2000:], "pod_log_warnings": _warnings(servers)}
    r["pod_log_warnings"] = _warnings(servers)
    calm, during = r["latency_calm"], r["latency_storm"]
    print(
        f"  {r['resumed']}/{r['sockets']} resumed on pod B in {r['storm_s']:.2f} s; "
        f"lost {r['lost']}, doubled {r['doubled']}, behind {r['behind_at_end']} "
        f"({r['events']:,} events checked); pod B's streams p99 {during.get('p99_ms', 0):.1f} ms "
        f"in the storm, {calm.get('p99_ms', 0):.1f} ms before",
        flush=True,
    )
    return r


def _run(bench: Bench, spec: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
    """The streams' process first (streaming once its file ``ready`` is
    there), then the storm's; the two results merged."""
    spec_path = files["streams"].with_suffix(".spec")
    spec_path.write_text(json.dumps({**spec, "role": "streams"}))
    streams_proc = subprocess.Popen(
        [sys.executable, "-m", "bench.storm", str(spec_path), str(files["streams"])],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + load.CONNECT_TIMEOUT_S * 2
        while not files["ready"].exists():
            if streams_proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("pod B's streams did not start")
            time.sleep(0.1)
        r = bench._load({**spec, "role": "storm"}, module="bench.storm")
        streams_proc.wait(timeout=load.TURN_TIMEOUT_S + CATCH_UP_TIMEOUT_S + 30)
    finally:
        if streams_proc.poll() is None:
            streams_proc.kill()
            streams_proc.wait()
    if streams_proc.returncode != 0:
        raise RuntimeError(f"pod B's streams failed (exit {streams_proc.returncode})")
    b = json.loads(files["streams"].read_text())
    for key in ("events", "lost", "doubled", "behind_at_end"):
        r[key] += b[key]
    r["b_sockets_closed"] = b["closed"]
    r["turns"] = b["turns"]
    r["errors"] = {**r["errors"], **{f"pod B's streams: {k}": v for k, v in b["errors"].items()}}
    for key in (
        "latency_calm",
        "latency_storm",
        "commit_calm",
        "commit_storm",
        "lag_calm",
        "lag_storm",
    ):
        r[key] = b[key]
    return r


def _warnings(servers: list[Server]) -> dict[str, int]:
    """The pods' warnings and errors, by kind (thread ids left out), most first."""
    kinds: collections.Counter[str] = collections.Counter()
    for pod, server in zip(("pod A", "pod B"), servers, strict=True):
        for line in server.logs().splitlines():
            if (" WARNING [" in line or " ERROR [" in line) and "CHAT_LLM is FAKE" not in line:
                text = re.sub(r"\S+-s\d+", "<thread>", line.split("] ", 1)[-1])
                kinds[f"{pod}: {text}"[:160]] += 1
    return dict(kinds.most_common(8))


ROLES = {"streams": streams, "storm": storm}


def main() -> None:
    spec_path, result_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    load._raise_fd_limit()
    try:
        import uvloop

        result = uvloop.run(ROLES[spec["role"]](spec))
    except ImportError:
        result = asyncio.run(ROLES[spec["role"]](spec))
    with open(result_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
