"""Run the benchmarks: ``python -m bench.run [--quick]``.

Starts a private redis-server, then, for each measurement, the servers it
needs (two durable-chat pods, or two processes of a peer), and runs the load
generator (bench.load, its own process) against them; every figure is
measured in the same run as the baselines it is compared with. Writes
bench/results/latest.md, latest.json and latest.png (see bench/README.md).

``--soak MINUTES`` runs the soak instead (bench.soak): a steady mixed load
on two pods, sampled every minute, then checked for leaks.

Phases (``--only`` picks some):

limits
    the two physical limits of the path: raw redis-py pub/sub delivery
    (bench.redis_limit) and the bare uvicorn WebSocket broadcast (in fanout).
fanout
    the fan-out workload at full model speed, for durable-chat and each peer.
latency
    the same systems at a fixed, paced load (LLM-like token pace) with
    ``--latency-listeners`` sockets on two servers.
heavy
    fan-out-heavy at a paced load: few threads with many listeners each
    (``--heavy-threads`` x ``--heavy-listeners``), durable-chat against
    broadcaster and the bare uvicorn broadcast: server CPU per delivery.
idle
    idle sockets held by one server: RSS per socket, connect rate, idle CPU.
cost
    Redis commands and round trips per turn and per delta, as listeners
    and pods grow (MONITOR tally plus INFO commandstats).
storm
    durable-chat only: a pod drained under load, its sockets resuming on the
    other pod (bench.storm).
bigroom
    one thread with ``--bigroom-listeners`` sockets on one server beside a
    few ordinary threads: loop lag and the others' p99 (bench.bigroom).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import bigroom, report, soak, storm
from bench.peers import node
from bench.peers.common import PING_ENV, TurnConfig, run_turn
from tests import procs
from tests.procs import ROOT, RedisServer, Server, running

RESULTS = ROOT / "bench" / "results"
SYSTEMS = ("durable", "socketio", "node", "broadcaster", "bare")
PEER_MODULES = {
    "socketio": "bench.peers.socketio_server",
    "broadcaster": "bench.peers.broadcaster_server",
    "bare": "bench.peers.bare_ws",
}
# The fan-out-heavy phase's systems: durable-chat and the two its target names.
HEAVY_SYSTEMS = ("durable", "broadcaster", "bare")
PHASES = ("limits", "fanout", "latency", "heavy", "idle", "cost", "storm", "bigroom")
# Each system's keep-alive ping interval, in seconds (its default): the idle
# phase measures one such interval, after every socket's first ping.
# durable-chat: CHAT_WS_PING_INTERVAL_S (WebSocket pings, by uvicorn).
# python-socketio: Engine.IO's ping_interval (25), and uvicorn's WebSocket
# pings (its ws_ping_interval, 20) under it. Node Socket.IO: Engine.IO's
# pingInterval (25; the ws library sends no pings of its own). broadcaster,
# bare: uvicorn's WebSocket pings (20).
# --keepalive-s replaces them all (the quick run: 5 s, to wait less).
KEEPALIVE_S = {"durable": 20.0, "socketio": 25.0, "node": 25.0, "broadcaster": 20.0, "bare": 20.0}
# A durable-chat pod under load: the fake model stamping its tokens and no
# per-user limits (one load generator plays every user).
DURABLE_ENV = {
    "CHAT_FAKE_STAMP": "1",
    "CHAT_FAKE_TOKEN_DELAY_MS": "0",
    "CHAT_RATE_PROMPTS_PER_MIN": "0",
    "CHAT_MAX_THREADS_PER_USER": "0",
    "CHAT_MAX_SOCKETS_PER_POD": "50000",
    "CHAT_LOG_LEVEL": "WARNING",
}


@dataclass
class Config:
    """Workload sizes (the defaults are the full run; --quick shrinks them)."""

    # fan-out at full model speed
    threads: int = 100
    listeners: int = 10
    reply_tokens: int = 400
    warmup_s: float = 3.0
    duration_s: float = 8.0
    probe_fraction: float = 0.2
    # paced latency run
    latency_threads: int = 200
    latency_listeners: int = 10
    latency_active: int = 20
    latency_tokens: int = 100
    token_delay_ms: float = 20.0
    latency_windows: tuple[float, ...] = (0.0, 25.0)
    # fan-out-heavy, paced: every thread streaming, one token per
    # heavy_token_delay_ms, the default 25 ms coalescing window
    heavy_threads: int = 20
    heavy_listeners: int = 50
    heavy_token_delay_ms: float = 50.0
    # idle sockets
    idle_sockets: int = 10000
    idle_peer_sockets: int = 2000
    keepalive_s: float = 0.0  # 0: each system's own keep-alive interval (KEEPALIVE_S)
    # cost matrix: (pods, listeners per thread)
    cost_matrix: tuple[tuple[int, int], ...] = ((1, 2), (2, 2), (2, 8), (3, 8))
    cost_threads: int = 10
    cost_duration_s: float = 4.0
    # raw redis-py pub/sub
    limit_duration_s: float = 5.0
    # reconnect storm (bench.storm): sockets on the drained pod, their threads,
    # the threads streaming from the other pod and their sockets there
    storm_sockets: int = 5000
    storm_threads: int = 500
    storm_active: int = 10
    storm_listeners: int = 5
    storm_calm_s: float = 3.0
    # big rooms (bench.bigroom)
    bigroom_listeners: int = 10000
    bigroom_token_delay_ms: float = 250.0

    @classmethod
    def quick(cls) -> Config:
        return cls(
            threads=20, listeners=4, reply_tokens=200, warmup_s=1.0, duration_s=3.0,
            latency_threads=50, latency_listeners=4, latency_active=10, latency_tokens=50,
            latency_windows=(0.0,), heavy_threads=5, heavy_listeners=20, idle_sockets=500,
            idle_peer_sockets=300, keepalive_s=5.0,
            cost_matrix=((1, 2), (2, 4)), cost_threads=4, cost_duration_s=2.0,
            limit_duration_s=2.0, storm_sockets=500, storm_threads=50, storm_active=4,
            storm_listeners=3, storm_calm_s=2.0, bigroom_listeners=2000,
        )  # fmt: skip


def peer_server(
    module: str, name: str, redis_url: str | None, logdir: Path, turn_env: dict[str, str]
) -> Server:
    """A peer server (bench.peers.*) under uvicorn, with the same token stream."""
    port = procs.free_port()
    env = procs.base_env()
    env.update(turn_env)
    argv = [sys.executable, "-m", module, "--port", str(port)]
    if redis_url:
        argv += ["--redis", redis_url]
    return Server(name, argv, env, port, logdir / f"{name}.log")


class Bench:
    """One benchmark run: its Redis, its scratch directory, its results."""

    def __init__(self, config: Config, systems: list[str], tmp: Path, logdir: Path) -> None:
        self.config = config
        self.systems = systems
        self.tmp = tmp
        self.logdir = logdir
        self.redis = RedisServer(tmp / "redis", maxclients=20000).start()
        self.runs = 0

    def close(self) -> None:
        self.redis.stop()

    # --- plumbing --------------------------------------------------------------

    def _load(self, spec: dict[str, Any], module: str = "bench.load") -> dict[str, Any]:
        """Run the load generator (or the pub/sub limit) in its own process."""
        self.runs += 1
        spec_path = self.tmp / f"spec{self.runs}.json"
        result_path = self.tmp / f"result{self.runs}.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        timeout = 120 + sum(
            spec.get(k, 0) for k in ("warmup_s", "duration_s", "idle_s", "keepalive_wait_s")
        )
        proc = subprocess.run(
            [sys.executable, "-m", module, str(spec_path), str(result_path)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"{module} failed:\n{proc.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(result_path.read_text())
        return result

    def _servers(
        self, system: str, count: int, turn_env: dict[str, str], pod_env: dict[str, str] | None
    ) -> list[Server]:
        self.redis.client().flushall()
        self.runs += 1
        if system == "durable":
            env = {**DURABLE_ENV, **turn_env, **(pod_env or {})}
            names = [f"pod{self.runs}-{i}" for i in range(count)]
            return [procs.pod(n, self.redis.url, self.logdir / f"{n}.log", **env) for n in names]
        if system == "node":
            names = [f"node{self.runs}-{i}" for i in range(count)]
            log = self.logdir
            return [node.server(n, self.redis.url, log / f"{n}.log", turn_env) for n in names]
        url = None if system == "bare" else self.redis.url
        module = PEER_MODULES[system]
        return [
            peer_server(module, f"{system}{self.runs}-{i}", url, self.logdir, turn_env)
            for i in range(count)
        ]

    def fanout_once(
        self,
        system: str,
        *,
        threads: int,
        listeners: int,
        active: int | None,
        turn_env: dict[str, str],
        pods: int = 2,
        warmup_s: float,
        duration_s: float,
        monitor: bool = False,
        pod_env: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        servers = self._servers(system, pods, turn_env, pod_env)
        try:
            with running(servers):
                spec = {
                    "mode": "fanout", "system": system, "run_id": f"r{self.runs}",
                    "endpoints": [["127.0.0.1", s.port] for s in servers],
                    "threads": threads, "listeners": listeners, "active_threads": active,
                    "warmup_s": warmup_s, "duration_s": duration_s,
                    "probe_fraction": self.config.probe_fraction,
                    "server_pids": [s.pid for s in servers], "redis_pid": self.redis.pid,
                    "redis_url": self.redis.url, "redis_port": self.redis.port,
                    "monitor": monitor,
                }  # fmt: skip
                return self._load(spec)
        except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
            print(f"  {system}: FAILED: {exc}", file=sys.stderr)
            return {"system": system, "failed": str(exc)[-2000:]}

    # --- phases ----------------------------------------------------------------

    def full_speed_env(self) -> dict[str, str]:
        return {
            "CHAT_FAKE_REPLY_TOKENS": str(self.config.reply_tokens),
            "CHAT_FAKE_TOKEN_DELAY_MS": "0",
            "CHAT_DELTA_WINDOW_MS": "25",
            "CHAT_DELTA_MAX_BYTES": "2048",
        }

    def phase_fanout(self) -> dict[str, Any]:
        c = self.config
        out = {}
        for system in self.systems:
            print(f"fanout: {system} ({c.threads} threads x {c.listeners} listeners)", flush=True)
            out[system] = self.fanout_once(
                system, threads=c.threads, listeners=c.listeners, active=None,
                turn_env=self.full_speed_env(), warmup_s=c.warmup_s, duration_s=c.duration_s,
            )  # fmt: skip
            _say(out[system])
        return out

    def phase_latency(self) -> dict[str, Any]:
        c = self.config
        out: dict[str, Any] = {}
        for window in c.latency_windows:
            env = {
                "CHAT_FAKE_REPLY_TOKENS": str(c.latency_tokens),
                "CHAT_FAKE_TOKEN_DELAY_MS": str(c.token_delay_ms),
                "CHAT_DELTA_WINDOW_MS": str(window),
                "CHAT_DELTA_MAX_BYTES": "2048",
            }
            key = f"window_{window:g}ms"
            out[key] = {}
            for system in self.systems:
                print(
                    f"latency: {system}, window {window:g} ms ({c.latency_threads} threads x "
                    f"{c.latency_listeners} listeners, {c.latency_active} streaming)",
                    flush=True,
                )
                out[key][system] = self.fanout_once(
                    system, threads=c.latency_threads, listeners=c.latency_listeners,
                    active=c.latency_active, turn_env=env, warmup_s=c.warmup_s,
                    duration_s=c.duration_s,
                )  # fmt: skip
                _say(out[key][system])
        return out

    def phase_heavy(self) -> dict[str, Any]:
        c = self.config
        env = {
            "CHAT_FAKE_REPLY_TOKENS": str(c.latency_tokens),
            "CHAT_FAKE_TOKEN_DELAY_MS": str(c.heavy_token_delay_ms),
            "CHAT_DELTA_WINDOW_MS": "25",
            "CHAT_DELTA_MAX_BYTES": "2048",
        }
        out = {}
        for system in [s for s in self.systems if s in HEAVY_SYSTEMS]:
            print(
                f"heavy: {system} ({c.heavy_threads} threads x {c.heavy_listeners} listeners, "
                f"all streaming, one token per {c.heavy_token_delay_ms:g} ms)",
                flush=True,
            )
            out[system] = self.fanout_once(
                system, threads=c.heavy_threads, listeners=c.heavy_listeners,
                active=c.heavy_threads, turn_env=env, warmup_s=c.warmup_s,
                duration_s=c.duration_s,
            )  # fmt: skip
            _say(out[system])
        return out

    def phase_limits(self) -> dict[str, Any]:
        c = self.config
        frames = turn_frames(c.reply_tokens)
        out = {}
        for shape in ("hub", "per_listener"):
            print(f"limits: raw redis-py pub/sub, {shape}", flush=True)
            self.redis.client().flushall()
            spec = {
                "redis_url": self.redis.url, "shape": shape, "threads": c.threads,
                "listeners": c.listeners, "procs": 2, "frames": frames, "warmup_s": 1.0,
                "duration_s": c.limit_duration_s,
            }  # fmt: skip
            try:
                out[shape] = self._load(spec, module="bench.redis_limit")
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                out[shape] = {"failed": str(exc)[-2000:]}
            print(f"  {out[shape].get('deliveries_per_s', 0):,.0f} deliveries/s", flush=True)
        return out

    def phase_idle(self) -> dict[str, Any]:
        c = self.config
        out = {}
        for system in self.systems:
            sockets = c.idle_sockets if system == "durable" else c.idle_peer_sockets
            print(f"idle: {system}, {sockets} sockets on one server", flush=True)
            interval = c.keepalive_s or KEEPALIVE_S[system]
            env = self.full_speed_env()
            if c.keepalive_s:
                env |= {"CHAT_WS_PING_INTERVAL_S": str(interval), PING_ENV: str(interval)}
            servers = self._servers(system, 1, env, None)
            try:
                with running(servers):
                    # Measured after every socket's first keep-alive ping,
                    # over one ping interval (each socket is pinged once in
                    # it); durable-chat also past its audit's window for fresh
                    # follows (2 x CHAT_FANOUT_AUDIT_S): the figures are those
                    # of threads nobody has typed in for a while.
                    spec = {
                        "mode": "idle", "system": system, "run_id": f"r{self.runs}",
                        "endpoints": [["127.0.0.1", servers[0].port]], "sockets": sockets,
                        "server_pids": [servers[0].pid], "redis_url": self.redis.url,
                        "redis_port": self.redis.port,
                        "settle_s": 12.0 if system == "durable" else 2.0, "idle_s": interval,
                        "keepalive_wait_s": interval + 15.0, "keepalive_interval_s": interval,
                    }  # fmt: skip
                    out[system] = self._load(spec)
            except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
                out[system] = {"failed": str(exc)[-2000:]}
            r = out[system]
            print(
                f"  {r.get('rss_per_socket_kb', 0) or 0:.1f} KiB/socket, "
                f"{r.get('connect_per_s', 0):,.0f} connects/s, "
                f"{100 * r.get('idle_cpu_fraction', 0):.2f}% of a core idle "
                f"({r.get('keepalives_per_socket') or 0:.2f} pings/socket in the window), "
                f"{r.get('redis_round_trips_per_s') or 0:,.2f} Redis round trips/s idle "
                f"({r.get('redis_commands_per_s') or 0:,.1f} commands/s, in scripts too)",
                flush=True,
            )
        return out

    def phase_bigroom(self) -> dict[str, Any]:
        return bigroom.phase(self)

    def phase_cost(self) -> dict[str, Any]:
        c = self.config
        out = []
        for pods, listeners in c.cost_matrix:
            print(f"cost: {pods} pod(s), {listeners} listeners per thread", flush=True)
            result = self.fanout_once(
                "durable", threads=c.cost_threads, listeners=listeners, active=None,
                turn_env=self.full_speed_env(), pods=pods, warmup_s=1.0,
                duration_s=c.cost_duration_s, monitor=True,
            )  # fmt: skip
            result["pods"] = pods
            out.append(result)
            _say(result)
        return out

    def phase_storm(self) -> dict[str, Any]:
        return storm.phase(self)


def turn_frames(tokens: int) -> list[str]:
    """The frames of one peer turn (same shapes as durable-chat's), as text."""
    frames: list[str] = []

    async def collect(thread: str, frame: dict[str, Any]) -> None:
        frames.append(json.dumps(frame, separators=(",", ":")))

    asyncio.run(run_turn("t0", "bench prompt", collect, TurnConfig(tokens, 0.0, 0.025, 2048)))
    return frames


def _say(result: dict[str, Any]) -> None:
    if "failed" in result:
        return
    rates, lat = result["rates"], result["latency"]
    cpu = sum(result["server_cpu_s"].values())
    frames = result["counts"]["frames"]
    print(
        f"  {rates['frames_per_s']:,.0f} frames/s, {rates['tokens_per_s']:,.0f} tokens/s, "
        f"{rates['turns_per_s']:,.1f} turns/s; p50 {lat.get('p50_ms', 0):.1f} ms "
        f"p99 {lat.get('p99_ms', 0):.1f} ms; server CPU {cpu:.1f} s "
        f"({1000 * cpu / max(frames, 1):.3f} s/1000); loadgen CPU {result['loadgen_cpu_s']:.1f} s",
        flush=True,
    )


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke check")
    parser.add_argument("--only", default=",".join(PHASES), help="phases, comma-separated")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="systems, comma-separated")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument(
        "--soak", type=float, metavar="MINUTES",
        help="instead of the phases: a steady mixed load on two pods for MINUTES (bench.soak)",
    )  # fmt: skip
    parser.add_argument("--soak-sample-s", type=float, default=60.0, help="soak sample period")
    for name, value in asdict(Config()).items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None)
    args = parser.parse_args()
    config = Config.quick() if args.quick else Config()
    for name in asdict(config):
        value = getattr(args, name, None)
        if value is not None:
            setattr(config, name, value)
    phases = [p for p in args.only.split(",") if p]
    systems = [s for s in args.systems.split(",") if s]
    for p in phases:
        if p not in PHASES:
            parser.error(f"unknown phase {p!r}")
    for s in systems:
        if s not in SYSTEMS:
            parser.error(f"unknown system {s!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = args.out / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    if args.soak is not None:
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            sys.exit(soak.run(args.soak, args.out, Path(tmp), args.soak_sample_s))
    skipped = {}
    if "node" in systems and (why := node.unavailable()):
        print(f"skipping the Node Socket.IO peer: {why}", file=sys.stderr, flush=True)
        systems.remove("node")
        skipped["node"] = why
    started = time.monotonic()
    results: dict[str, Any] = {
        "config": asdict(config), "quick": args.quick, "machine": machine(),
        "systems": systems, "skipped": skipped,
    }  # fmt: skip
    logdir = scratch / "logs"
    shutil.rmtree(logdir, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        bench = Bench(config, systems, Path(tmp), logdir)
        try:
            results["machine"]["redis"] = bench.redis.version()
            for phase in phases:
                results[phase] = getattr(bench, f"phase_{phase}")()
        finally:
            bench.close()
    results["wall_s"] = time.monotonic() - started
    report.write(results, args.out)
    print(f"done in {results['wall_s']:.0f} s: {args.out}/latest.md, latest.json, latest.png")


if __name__ == "__main__":
    main()
