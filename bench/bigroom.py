"""Big rooms: one thread with thousands of listeners on one server, beside
a few ordinary threads; ``python -m bench.run --only bigroom``.

For each system, two runs on one server, back to back: the ordinary threads
alone (``OTHER_THREADS`` x ``OTHER_LISTENERS``, every socket timing every
token), then the same with the big room (one thread, ``bigroom_listeners``
sockets) streaming too. Every thread runs turns back to back at one token per
``bigroom_token_delay_ms`` with no coalescing window, so each token is one
frame to every socket of its thread. Reported: the ordinary threads'
emit-to-receive p99 with and without the big room (their ratio is what the
big room costs its neighbours), the big room's deliveries per second, server
CPU per 1,000 deliveries, and, for durable-chat, its event loop's lag (the pod
measures it: ``CHAT_LOOP_LAG_PROBE_MS``, ``durable_chat_loop_lag_seconds``)
over the measured window: the loop's longest stall and its p99, to the
histogram's bucket, by the wall clock (the host's scheduling of two shared
cores included) and by the loop's own CPU time (its own stalls). The big
room's sockets have a load generator process of their own, so that the
ordinary threads' latency is not their shared client's backlog.

``python -m bench.bigroom SPEC.json RESULT.json`` is the load generator of
one run (bench.run starts it in its own process, like bench.load).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.load import Conn, Stats, _open_all, _percentiles, run_process
from tests.procs import ROOT, Server, cpu_seconds, running

if TYPE_CHECKING:
    from bench.run import Bench

# durable-chat against broadcaster and the bare uvicorn broadcast (each
# system's run opens the room's ten thousand sockets: a minute or two apiece).
SYSTEMS = ("durable", "broadcaster", "bare")
OTHER_THREADS = 10
OTHER_LISTENERS = 5
LAG_PROBE_MS = 5
TURN_TIMEOUT_S = 60.0
CONNECT_S = 300.0  # bound on opening the big room's sockets (a loaded machine: ~100/s)
SETTLE_S = 0.5  # the others' load generator starting, before its warm-up
LAG_METRIC = "durable_chat_loop_lag_seconds_bucket"


def phase(bench: Bench) -> dict[str, Any]:
    c = bench.config
    env = {
        "CHAT_FAKE_REPLY_TOKENS": "100",
        "CHAT_FAKE_TOKEN_DELAY_MS": str(c.bigroom_token_delay_ms),
        "CHAT_DELTA_WINDOW_MS": "0",
        "CHAT_DELTA_MAX_BYTES": "2048",
    }
    out: dict[str, Any] = {}
    for system in [s for s in bench.systems if s in SYSTEMS]:
        out[system] = {}
        for big in (0, c.bigroom_listeners):
            label = "with_bigroom" if big else "alone"
            print(
                f"bigroom: {system}, {OTHER_THREADS} x {OTHER_LISTENERS} listeners"
                + (f" beside one thread of {big:,} listeners" if big else " alone"),
                flush=True,
            )
            servers = bench._servers(system, 1, env, {"CHAT_LOOP_LAG_PROBE_MS": str(LAG_PROBE_MS)})
            try:
                with running(servers):
                    result = _measure(bench, system, servers[0], big)
            except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as exc:
                result = {"failed": str(exc)[-2000:]}
            out[system][label] = result
            _say(result)
    return out


def _measure(bench: Bench, system: str, server: Server, big: int) -> dict[str, Any]:
    """One run: the big room's sockets (when ``big``) in a load generator of
    their own, so the ordinary threads' latency is not their client's backlog."""
    c = bench.config
    common = {
        "system": system, "run_id": f"r{bench.runs}", "endpoint": ["127.0.0.1", server.port],
        "warmup_s": c.warmup_s, "duration_s": c.duration_s,
    }  # fmt: skip
    room: subprocess.Popen[bytes] | None = None
    room_result = bench.tmp / f"room{bench.runs}.json"
    if big:
        ready = bench.tmp / f"room{bench.runs}.ready"
        stop = bench.tmp / f"room{bench.runs}.stop"
        spec = {**common, "role": "room", "listeners": big, "ready_path": str(ready),
                "stop_path": str(stop)}  # fmt: skip
        spec_path = bench.tmp / f"room{bench.runs}.spec.json"
        spec_path.write_text(json.dumps(spec))
        room = subprocess.Popen(
            [sys.executable, "-m", "bench.bigroom", str(spec_path), str(room_result)],
            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )  # fmt: skip
        deadline = time.monotonic() + CONNECT_S
        while not ready.exists():
            if room.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the big room's {big} sockets did not open")
            time.sleep(0.1)
    try:
        spec = {**common, "role": "others", "server_pid": server.pid,
                "metrics": system == "durable"}  # fmt: skip
        result = bench._load(spec, module="bench.bigroom")
    finally:
        if room is not None:
            # The room leaves only now: two thousand sockets closing at once
            # are a burst of their own, not the streaming measured here.
            stop.write_text("stop")
            room.wait(timeout=CONNECT_S)
    result["big_listeners"] = big
    result["big_deliveries_per_s"] = 0.0
    if big:
        result["big_deliveries_per_s"] = json.loads(room_result.read_text())["deliveries_per_s"]
    deliveries = (result["others_deliveries_per_s"] + result["big_deliveries_per_s"]) * result[
        "elapsed_s"
    ]
    result["cpu_per_1000"] = 1000 * result["server_cpu_s"] / max(deliveries, 1.0)
    return result


def _say(r: dict[str, Any]) -> None:
    if "failed" in r:
        print(f"  FAILED: {r['failed'][-300:]}", flush=True)
        return
    lag = r.get("loop_lag") or {}
    wall, cpu = lag.get("wall", {}), lag.get("cpu", {})
    print(
        f"  others' p99 {r['others'].get('p99_ms', 0):.1f} ms; big room "
        f"{r['big_deliveries_per_s']:,.0f} deliveries/s; server CPU "
        f"{r['cpu_per_1000']:.3f} s/1000; loop lag (wall) p99 <= {wall.get('p99_ms', '-')} "
        f"max <= {wall.get('max_ms', '-')} ms, (cpu) p99 <= {cpu.get('p99_ms', '-')} max <= "
        f"{cpu.get('max_ms', '-')} ms; errors {r['errors']}",
        flush=True,
    )


# --- the load generator (its own process) -------------------------------------


def _lag_buckets(port: int) -> dict[str, dict[float, float]]:
    """The pod's loop-lag histograms by clock: cumulative count per bound (s)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found: dict[str, dict[float, float]] = {}
    for line in text.splitlines():
        if line.startswith(LAG_METRIC):
            clock = line.split('clock="')[1].split('"')[0]
            bound = line.split('le="')[1].split('"')[0]
            found.setdefault(clock, {})[float(bound)] = float(line.rsplit(" ", 1)[1])
    return found


def _lag(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """p99 and max of the window's lag samples, each as its bucket's bound (ms)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0
    if not total:
        return {"samples": 0}

    def bound_of(cumulative: float) -> float | str:
        for b, n in zip(bounds, counts, strict=True):
            if n >= cumulative:
                return "inf" if b == float("inf") else round(b * 1000, 1)
        return "inf"

    return {"samples": int(total), "p99_ms": bound_of(0.99 * total), "max_ms": bound_of(total)}


async def _drive(driver: Conn, stopping: asyncio.Event) -> None:
    """The thread's first socket prompts again as soon as a turn is done."""
    turn = 0
    while not stopping.is_set():
        driver.done.clear()
        assert driver.client is not None
        driver.client.send_text(driver.prompt(f"bench prompt {turn}"))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(TURN_TIMEOUT_S):
                await driver.done.wait()
        turn += 1


async def load_room(spec: dict[str, Any]) -> dict[str, Any]:
    """The big room: open its sockets, say so, stream (counting its
    deliveries over the window) until told to stop."""
    stats = Stats()
    room = [Conn(spec["system"], f"{spec['run_id']}-big", stats, False)
            for _ in range(spec["listeners"])]  # fmt: skip
    endpoint = tuple(spec["endpoint"])
    _, failed = await _open_all([(conn, endpoint) for conn in room], 100)
    if failed:
        raise RuntimeError(f"{failed} sockets failed to connect: {stats.errors}")
    stopping = asyncio.Event()
    driver = asyncio.create_task(_drive(room[0], stopping))
    Path(spec["ready_path"]).write_text("ready")  # noqa: ASYNC240 (one tiny write)
    try:
        # The other load generator opens its few sockets, then warms up.
        await asyncio.sleep(spec["warmup_s"] + SETTLE_S)
        before, t0 = stats.frames, time.perf_counter()
        await asyncio.sleep(spec["duration_s"])
        frames, elapsed = stats.frames - before, time.perf_counter() - t0
        stop, deadline = Path(spec["stop_path"]), time.monotonic() + CONNECT_S
        while not stop.exists() and time.monotonic() < deadline:  # noqa: ASYNC110, ASYNC240
            await asyncio.sleep(0.1)
    finally:
        stopping.set()
        driver.cancel()
        for conn in room:
            conn.close()
    return {"deliveries_per_s": frames / elapsed, "errors": dict(stats.errors.most_common(5))}


async def load_others(spec: dict[str, Any]) -> dict[str, Any]:
    """The ordinary threads: every socket times every token."""
    stats = Stats()
    threads = [[Conn(spec["system"], f"{spec['run_id']}-o{i}", stats, True)
                for _ in range(OTHER_LISTENERS)] for i in range(OTHER_THREADS)]  # fmt: skip
    endpoint = tuple(spec["endpoint"])
    plan = [(conn, endpoint) for conns in threads for conn in conns]
    _, failed = await _open_all(plan, 100)
    if failed:
        raise RuntimeError(f"{failed} sockets failed to connect: {stats.errors}")
    stopping = asyncio.Event()
    tasks = [asyncio.create_task(_drive(conns[0], stopping)) for conns in threads]
    pid, port = spec["server_pid"], endpoint[1]
    try:
        await asyncio.sleep(spec["warmup_s"])
        lag0 = await asyncio.to_thread(_lag_buckets, port) if spec["metrics"] else {}
        before, cpu0, t0 = stats.frames, cpu_seconds(pid), time.perf_counter()
        stats.recording = True
        await asyncio.sleep(spec["duration_s"])
        stats.recording = False
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
        frames = stats.frames - before
        lag1 = await asyncio.to_thread(_lag_buckets, port) if spec["metrics"] else {}
    finally:
        stopping.set()
        for task in tasks:
            task.cancel()
        for conn, _ in plan:
            conn.close()
    return {
        "system": spec["system"], "elapsed_s": elapsed,
        "others": {k: v for k, v in _percentiles(stats.latencies).items() if k != "cdf_ms"},
        "others_deliveries_per_s": frames / elapsed, "server_cpu_s": cpu,
        "loop_lag": {clock: _lag(lag0.get(clock, {}), lag1[clock]) for clock in lag1} or None,
        "errors": dict(stats.errors.most_common(5)),
    }  # fmt: skip


async def _work(spec: dict[str, Any]) -> dict[str, Any]:
    return await (load_room(spec) if spec["role"] == "room" else load_others(spec))


def main() -> None:
    run_process(_work)


if __name__ == "__main__":
    main()
