"""The Redis leg's limit: how fast redis-py receives pub/sub messages here.

``python -m bench.redis_limit SPEC.json RESULT.json``. One publisher (this
process, pipelined PUBLISH) sends the frames of a real turn, cycling over
``threads`` channels, to subscriber processes (``procs``, two like two pods),
which read them with redis.asyncio's ``PubSub.get_message``, the call
durable-chat's fan-out hub uses. Two shapes:

``hub``
    each subscriber process holds ONE connection subscribed to every
    channel, as a durable-chat pod does: the limit of messages a pod can
    take from Redis.
``per_listener``
    each listener of the fan-out workload is its own subscriber connection
    (``threads x listeners`` connections, split over the processes): Redis does
    the whole fan-out and Python only receives, the delivery rate of "every
    client subscribes to Redis itself" with the same number of endpoints.

The publisher keeps at most ``max_inflight`` deliveries not yet received, so
what is measured is the rate subscribers sustain, not a growing backlog in
Redis's output buffers.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import multiprocessing as mp
import multiprocessing.sharedctypes
import sys
import time
from typing import Any

import redis
import redis.asyncio as aioredis

from tests.procs import cpu_seconds

FLUSH_INTERVAL_S = 0.005


def _subscriber(
    url: str,
    groups: list[list[str]],
    received: multiprocessing.sharedctypes.Synchronized,  # type: ignore[type-arg]
    ready: Any,
    stop: Any,
) -> None:
    """One subscriber process: one connection per group of channels."""

    count = 0

    async def read(pubsub: Any) -> None:
        nonlocal count
        while not stop.is_set():
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if message is not None:
                count += 1

    async def flush_forever() -> None:
        """Publish this process's count to the publisher every few ms."""
        nonlocal count
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            if count:
                taken, count = count, 0
                with received.get_lock():
                    received.value += taken

    async def run() -> None:
        # One connection per group (up to a thousand): lift the pool's cap.
        client = aioredis.Redis.from_url(url, max_connections=len(groups) + 1)
        pubsubs = []
        for channels in groups:
            pubsub = client.pubsub()
            await pubsub.subscribe(*channels)
            pubsubs.append(pubsub)
        ready.release()
        flusher = asyncio.create_task(flush_forever())
        await asyncio.gather(*(read(p) for p in pubsubs))
        flusher.cancel()
        for pubsub in pubsubs:
            await pubsub.aclose()
        await client.aclose()

    try:
        import uvloop

        uvloop.run(run())
    except ImportError:
        asyncio.run(run())


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    url, shape = spec["redis_url"], spec["shape"]
    threads, listeners, procs = spec["threads"], spec["listeners"], spec.get("procs", 2)
    frames: list[bytes] = [f.encode() for f in spec["frames"]]
    channels = [f"bench:{shape}:{i}" for i in range(threads)]
    if shape == "hub":
        per_proc: list[list[list[str]]] = [[channels] for _ in range(procs)]
    else:  # one connection per listener, listeners of a thread round-robin over processes
        per_proc = [[] for _ in range(procs)]
        for i, channel in enumerate(channels):
            for j in range(listeners):
                per_proc[(i + j) % procs].append([channel])
    ctx = mp.get_context("spawn")
    received = ctx.Value(ctypes.c_longlong, 0)
    ready, stop = ctx.Semaphore(0), ctx.Event()
    workers = [
        ctx.Process(target=_subscriber, args=(url, groups, received, ready, stop), daemon=True)
        for groups in per_proc
    ]
    for worker in workers:
        worker.start()
    try:
        for _ in workers:
            if not ready.acquire(timeout=60):
                raise TimeoutError("subscribers did not subscribe in time")
        client = redis.Redis.from_url(url)
        sent = 0  # deliveries published
        max_inflight = spec.get("max_inflight", 20000)
        batch = spec.get("batch", 100)
        k = 0

        def publish_for(seconds: float) -> None:
            nonlocal sent, k
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                if sent - received.value > max_inflight:
                    time.sleep(0.0005)
                    continue
                pipe = client.pipeline(transaction=False)
                for _ in range(batch):
                    pipe.publish(channels[k % threads], frames[k % len(frames)])
                    k += 1
                sent += sum(pipe.execute())

        publish_for(spec.get("warmup_s", 1.0))
        pids = [w.pid for w in workers if w.pid is not None]
        cpu0 = sum(cpu_seconds(p) for p in pids)
        got0, t0 = received.value, time.perf_counter()
        publish_for(spec.get("duration_s", 5.0))
        got1, elapsed = received.value, time.perf_counter() - t0
        cpu1 = sum(cpu_seconds(p) for p in pids)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
    deliveries = got1 - got0
    return {
        "shape": shape, "threads": threads, "listeners": listeners, "procs": procs,
        "connections": sum(len(g) for g in per_proc), "elapsed_s": elapsed,
        "deliveries": deliveries, "deliveries_per_s": deliveries / elapsed,
        "subscriber_cpu_s": cpu1 - cpu0,
        "cpu_s_per_1000": 1000 * (cpu1 - cpu0) / deliveries if deliveries else None,
        "mean_frame_bytes": sum(map(len, frames)) / len(frames),
    }  # fmt: skip


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    result = measure(spec)
    with open(sys.argv[2], "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
