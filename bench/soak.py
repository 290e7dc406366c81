"""The soak: ``python -m bench.run --soak MINUTES``.

Two pods on a private redis-server carry a steady mixed load for MINUTES:
conversations (prompt, wait for the reply, sometimes drop the connection and
resume with ``after``, then leave), joiners that open a socket on a thread,
read a little and leave, and slow clients that never read until the pod cuts
them. Every ``--soak-sample-s`` (a minute) it records, per pod, the resident
memory, open file descriptors and asyncio tasks, and Redis's memory and key
count. After the load stops and every socket is closed it checks:

- the pods' memory is flat after warm-up (the last sample against the first
  after the first fifth of the run), and their tasks and descriptors are back
  where they were before any load;
- Redis holds nothing a finished turn or a closed socket left: no lock, no
  turn record, no turn index entry, no socket slot, no live channel still
  subscribed, and a fixed number of keys per thread.

Writes bench/results/soak.md and soak.json; exits 1 when a check fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import orjson
import websockets
from websockets.exceptions import ConnectionClosed

from tests import procs
from tests.procs import RedisServer, Server, running

SOAK_ENV = {
    "CHAT_FAKE_TOKEN_DELAY_MS": "20",
    "CHAT_FAKE_REPLY_TOKENS": "60",
    "CHAT_RATE_PROMPTS_PER_MIN": "0",
    "CHAT_MAX_THREADS_PER_USER": "0",
    # Small, so that the slow clients are cut within a few turns.
    "CHAT_SEND_QUEUE": "64",
    "CHAT_LOG_LEVEL": "WARNING",
}
# Keys a finished turn must not leave behind (see also Soak.leftovers). A
# thread keeps at most 8 keys once idle (app.chat.keys: history, events,
# meta, fence, members, dedup, and the branch keys of conversation trees).
LEFTOVER_PATTERNS = ("chat:{*}:lock", "chat:{*}:turn")
BUSY = "soakbusy"


@dataclass
class SoakConfig:
    minutes: float
    sample_s: float = 60.0
    conversations: int = 12
    joiners: int = 6
    slow_clients: int = 2
    # A conversation drops its connection and resumes after this share of turns.
    reconnect_share: float = 0.3


@dataclass
class Tally:
    turns: int = 0
    threads: int = 0
    resumes: int = 0
    joins: int = 0
    slow_cut: int = 0
    errors: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, config: SoakConfig, pods: list[Server], redis: RedisServer) -> None:
        self.config = config
        self.pods = pods
        self.redis = redis
        self.tally = Tally()
        self.threads: list[str] = []
        self.stop = asyncio.Event()
        self.rng = random.Random(16)
        self.started = time.monotonic()

    def url(self, thread: str, **query: str) -> str:
        pod = self.rng.choice(self.pods)
        suffix = f"?{urlencode(query)}" if query else ""
        return f"{pod.ws.rstrip('/')}/v1/threads/{thread}/ws{suffix}"

    # --- the load ----------------------------------------------------------------

    async def conversation(self, worker: int) -> None:
        n = 0
        while not self.stop.is_set():
            thread = f"soak{worker}x{n}"
            n += 1
            self.threads.append(thread)
            try:
                await self._converse(thread, turns=self.rng.randint(1, 3))
                self.tally.threads += 1
            except (OSError, TimeoutError, ConnectionClosed) as exc:
                self.tally.errors.append(f"{thread}: {exc!r}")
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))

    async def _converse(self, thread: str, turns: int) -> None:
        ws = await websockets.connect(self.url(thread), open_timeout=10)
        last: str | None = None
        epoch = ""
        try:
            for turn in range(turns):
                await ws.send(orjson.dumps({"type": "prompt", "content": f"turn {turn}"}).decode())
                resumed = False
                while True:
                    event = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
                    if event["type"] == "ready":
                        epoch = event["epoch"]
                    last = event.get("id", last)
                    if event["type"] == "done":
                        break
                    share = self.config.reconnect_share / 10  # per delta, ~10 a turn
                    if event["type"] == "delta" and not resumed and self.rng.random() < share:
                        # Drop the connection mid-reply and resume on any pod.
                        resumed = True
                        await ws.close()
                        query = {"after": last, "epoch": epoch} if last else {}
                        ws = await websockets.connect(self.url(thread, **query), open_timeout=10)
                        self.tally.resumes += 1
                self.tally.turns += 1
                await asyncio.sleep(self.rng.uniform(0.1, 0.5))
        finally:
            await ws.close()

    async def joiner(self) -> None:
        while not self.stop.is_set():
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))
            if not self.threads:
                continue
            try:
                async with websockets.connect(
                    self.url(self.rng.choice(self.threads[-50:])), open_timeout=10
                ) as ws:
                    deadline = time.monotonic() + self.rng.uniform(0.5, 3.0)
                    while time.monotonic() < deadline:
                        try:
                            await asyncio.wait_for(ws.recv(), deadline - time.monotonic())
                        except TimeoutError:
                            break
                self.tally.joins += 1
            except (OSError, TimeoutError, ConnectionClosed) as exc:
                self.tally.errors.append(f"join: {exc!r}")

    async def busy(self) -> None:
        """One thread that never rests, for the slow clients to follow."""
        while not self.stop.is_set():
            try:
                await self._converse(BUSY, turns=5)
            except (OSError, TimeoutError, ConnectionClosed) as exc:
                self.tally.errors.append(f"{BUSY}: {exc!r}")

    async def slow_client(self) -> None:
        """Follows the busy thread and never reads, through a small receive
        buffer: the pod must cut it (1013) once its send queue is full."""
        while not self.stop.is_set():
            await asyncio.sleep(1.0)
            url = self.url(BUSY)
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            port = int(url.split(":")[2].split("/")[0])
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            ws = await websockets.connect(url, sock=sock, open_timeout=10, max_queue=1)
            try:
                await asyncio.wait_for(ws.wait_closed(), 120)
                self.tally.slow_cut += 1
            except TimeoutError:
                pass
            finally:
                ws.transport.abort()

    # --- what is measured ----------------------------------------------------------

    def sample(self, label: str) -> dict[str, Any]:
        pods = []
        for pod in self.pods:
            gauges = _gauges(pod)
            pods.append({
                "rss_kb": procs.rss_kb(pod.pid),
                "fds": len(os.listdir(f"/proc/{pod.pid}/fd")),
                "tasks": gauges.get("durable_chat_asyncio_tasks", -1),
                "sockets": gauges.get("durable_chat_sockets_open", -1),
                "followed": gauges.get("durable_chat_threads_followed", -1),
            })  # fmt: skip
        db = self.redis.client()
        info = db.info("memory")
        return {
            "label": label, "t_s": round(time.monotonic() - self.started, 1), "pods": pods,
            "redis_used_kb": int(info["used_memory"]) // 1024, "redis_keys": db.dbsize(),
        }  # fmt: skip

    def leftovers(self) -> dict[str, Any]:
        db = self.redis.client()
        found: dict[str, Any] = {}
        for pattern in LEFTOVER_PATTERNS:
            found[pattern] = len(list(db.scan_iter(match=pattern, count=1000)))
        found["chat:turns members"] = db.zcard("chat:turns")
        found["socket slots"] = sum(
            db.zcard(key) for key in db.scan_iter(match="chat:user:{*}:sockets", count=1000)
        )
        found["live channels subscribed"] = len(db.pubsub_channels("chat:{*}:live"))
        return found

    def keys_per_thread(self) -> float:
        """Keys of the form chat:{T}:..., per thread that has any."""
        tags = [key.split("}", 1)[0] for key in self.redis.client().scan_iter("chat:{*}:*", 1000)]
        return len(tags) / max(len(set(tags)), 1)

    async def run(self) -> dict[str, Any]:
        self.started = time.monotonic()
        samples = [self.sample("before")]
        c = self.config
        workers = [asyncio.create_task(self.conversation(i)) for i in range(c.conversations)]
        workers += [asyncio.create_task(self.joiner()) for _ in range(c.joiners)]
        workers += [asyncio.create_task(self.slow_client()) for _ in range(c.slow_clients)]
        workers.append(asyncio.create_task(self.busy()))
        end = self.started + c.minutes * 60
        minute = 0
        while time.monotonic() < end:
            await asyncio.sleep(min(c.sample_s, max(0.0, end - time.monotonic())))
            minute += 1
            samples.append(self.sample(f"load {minute}"))
            print(_line(samples[-1]), flush=True)
        self.stop.set()
        await asyncio.wait(workers, timeout=60)
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        await self._settle()
        samples.append(self.sample("after"))
        print(_line(samples[-1]), flush=True)
        return {
            "samples": samples, "leftovers": self.leftovers(), "tally": asdict(self.tally),
            "keys_per_thread": self.keys_per_thread(),
        }  # fmt: skip

    async def _settle(self) -> None:
        """Until no socket is open and no turn runs on any pod (at most 30 s)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(
                _gauges(p).get("durable_chat_sockets_open", 1) == 0
                and _gauges(p).get("durable_chat_turns_running", 1) == 0
                and _gauges(p).get("durable_chat_threads_followed", 1) == 0
                for p in self.pods
            ):
                return
            await asyncio.sleep(0.5)


def _gauges(pod: Server) -> dict[str, float]:
    text = httpx.get(f"{pod.http}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith("durable_chat_") and "{" not in line:
            name, _, value = line.partition(" ")
            values[name] = float(value)
    return values


def _line(sample: dict[str, Any]) -> str:
    pods = "  ".join(
        f"pod{i}: {p['rss_kb'] / 1024:.1f} MiB, {p['fds']} fds, {p['tasks']:.0f} tasks, "
        f"{p['sockets']:.0f} sockets"
        for i, p in enumerate(sample["pods"])
    )
    return (
        f"[{sample['label']:>8} {sample['t_s']:>6.0f} s] {pods}  redis: "
        f"{sample['redis_used_kb'] / 1024:.1f} MiB, {sample['redis_keys']} keys"
    )


def verdict(result: dict[str, Any]) -> list[str]:
    """What failed, in words (empty: the soak passed)."""
    failures = []
    samples = result["samples"]
    loaded = [s for s in samples if s["label"].startswith("load")]
    before, after = samples[0], samples[-1]
    if len(loaded) >= 3:
        warm = loaded[max(1, len(loaded) // 5)]
        for i, (w, last) in enumerate(zip(warm["pods"], loaded[-1]["pods"], strict=True)):
            growth = last["rss_kb"] - w["rss_kb"]
            # Flat: within 10 % or 8 MiB of the warm figure, whichever is larger.
            if growth > max(0.10 * w["rss_kb"], 8 * 1024):
                failures.append(f"pod{i} RSS grew {growth / 1024:.1f} MiB after warm-up")
    for i, (b, a) in enumerate(zip(before["pods"], after["pods"], strict=True)):
        if a["tasks"] > b["tasks"] + 2:
            failures.append(f"pod{i} kept {a['tasks'] - b['tasks']:.0f} tasks after the load")
        # Descriptors: the Redis pool keeps the connections the load needed
        # (bounded), so "after" is compared with the load, not with "before".
        most = max(s["pods"][i]["fds"] for s in loaded) if loaded else b["fds"]
        if a["fds"] > most:
            failures.append(f"pod{i} holds {a['fds']} descriptors after the load ({most} under it)")
    for what, count in result["leftovers"].items():
        if count:
            failures.append(f"Redis holds {count} {what} after the load")
    threads = result["tally"]["threads"]
    if result["keys_per_thread"] > 8:
        failures.append(f"{result['keys_per_thread']:.1f} Redis keys per thread (at most 8)")
    if len(result["tally"]["errors"]) > max(2, threads // 100):
        failures.append(f"{len(result['tally']['errors'])} client errors")
    return failures


def markdown(result: dict[str, Any], failures: list[str]) -> str:
    lines = [
        f"# Soak: {result['config']['minutes']:g} minutes, two pods",
        "",
        f"{result['tally']['turns']} turns on {result['tally']['threads']} threads, "
        f"{result['tally']['resumes']} resumes mid-reply, {result['tally']['joins']} joins, "
        f"{result['tally']['slow_cut']} slow clients cut; "
        f"{len(result['tally']['errors'])} client errors.",
        "",
        "| sample | t (s) | pod0 RSS (MiB) | pod1 RSS (MiB) | fds | tasks | sockets "
        "| Redis (MiB) | Redis keys |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in result["samples"]:
        p0, p1 = s["pods"]
        lines.append(
            f"| {s['label']} | {s['t_s']:.0f} | {p0['rss_kb'] / 1024:.1f} | "
            f"{p1['rss_kb'] / 1024:.1f} | {p0['fds']} / {p1['fds']} | "
            f"{p0['tasks']:.0f} / {p1['tasks']:.0f} | {p0['sockets']:.0f} / {p1['sockets']:.0f} "
            f"| {s['redis_used_kb'] / 1024:.1f} | {s['redis_keys']} |"
        )
    lines += ["", f"Redis keys per thread after the load: {result['keys_per_thread']:.1f}."]
    lines += ["", "Left in Redis after the load (all must be 0):", ""]
    lines += [f"- {what}: {count}" for what, count in result["leftovers"].items()]
    lines += ["", "**PASSED**" if not failures else "**FAILED**: " + "; ".join(failures), ""]
    return "\n".join(lines)


def run(minutes: float, out: Path, scratch: Path, sample_s: float = 60.0) -> int:
    """The soak, start to finish; returns the exit code."""
    config = SoakConfig(minutes=minutes, sample_s=sample_s)
    scratch = scratch.resolve()  # redis-server runs in its own directory
    redis = RedisServer(scratch / "soak-redis").start()
    logs = scratch / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pods = [procs.pod(f"soak{i}", redis.url, logs / f"soak{i}.log", **SOAK_ENV) for i in range(2)]
    try:
        with running(pods):
            result = asyncio.run(Soak(config, pods, redis).run())
    finally:
        redis.stop()
    result["config"] = asdict(config)
    failures = verdict(result)
    result["failures"] = failures
    (out / "soak.json").write_text(json.dumps(result, indent=2))
    (out / "soak.md").write_text(markdown(result, failures))
    print("soak " + ("PASSED" if not failures else "FAILED: " + "; ".join(failures)))
    print(f"results: {out}/soak.md, soak.json")
    return 1 if failures else 0
