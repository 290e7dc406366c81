"""What a user socket costs Redis: the inbox snapshot, and a turn's cards.

Against a private redis-server, through the real stores and scripts:

1. a user with ``--threads`` threads (1,000) opens the user socket: the
   snapshot's time (median of ``--samples``) and its Redis round trips,
   beside a user with 10 threads (the round trips must not grow);
2. one whole turn (BEGIN_TURN and END_TURN, the commits that publish the
   members' inbox cards) in threads of 1, 10 and 100 members: Redis
   commands per turn (INFO commandstats, commands run inside scripts
   included), publishes among them, and the turn's commit time.

    python3 -m bench.inbox                     # 1,000 threads, 20 samples
    python3 -m bench.inbox --threads 200 --samples 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import Connection

from app.chat import keys
from app.chat.inbox import Inbox
from app.chat.keys import ThreadId, UserId
from app.chat.lock import TurnLock
from app.chat.records import Done, Loading, Message
from app.chat.scripts import Scripts
from app.chat.threads import Threads
from app.chat.turns import Begun, TurnStore
from tests.procs import RedisServer

RESULTS = Path(__file__).parent / "results" / "inbox.json"


class RoundTrips:
    """Counts what the client sends: one send is one round trip (a pipeline
    is sent at once)."""

    def __init__(self) -> None:
        self.count = 0
        self._send = Connection.send_packed_command

    def __enter__(self) -> RoundTrips:
        original = self._send

        async def counted(conn: Connection, command: Any, check_health: bool = True) -> None:
            self.count += 1
            await original(conn, command, check_health)

        Connection.send_packed_command = counted  # type: ignore[method-assign]
        return self

    def __exit__(self, *_: object) -> None:
        Connection.send_packed_command = self._send  # type: ignore[method-assign]


async def one_turn(store: TurnStore, lock: TurnLock, thread: ThreadId, user: str, n: int) -> None:
    lease = await lock.acquire(thread)
    assert lease is not None
    ask = Message("", "user", f"question {n} about the inbox", user, 1, "complete")
    begun = await store.begin(thread, lease, ask, Loading(thread, f"g{n}", "fake"), "bench")
    assert isinstance(begun, Begun), begun
    answer = Message("", "assistant", f"answer {n} " + "word " * 40, "assistant", 1, "complete")
    assert await store.end(thread, lease, answer, Done(thread, f"g{n}", "complete")) is not None


async def snapshot(
    redis: Redis, threads: Threads, inbox: Inbox, user: UserId, samples: int
) -> dict[str, Any]:
    times = []
    trips = []
    for _ in range(samples):
        with RoundTrips() as counted:
            started = time.perf_counter()
            page, _ = await threads.page_of_user(user, 1000, None)
            cards = await inbox.cards(user, [(s.id, s.active_at) for s in page])
            times.append(time.perf_counter() - started)
        trips.append(counted.count)
    return {
        "threads": len(cards), "median_ms": round(statistics.median(times) * 1000, 2),
        "round_trips": max(trips),
    }  # fmt: skip


async def commands(redis: Redis) -> tuple[int, int]:
    stats = await redis.info("commandstats")
    total = sum(int(v["calls"]) for v in stats.values())
    publishes = int(stats.get("cmdstat_publish", {}).get("calls", 0))
    return total, publishes


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            redis = Redis.from_url(server.url, decode_responses=True)
            scripts = Scripts(redis)
            threads = Threads(redis, scripts, max_threads=0)
            inbox = Inbox(redis, scripts, "PUBLISH", "reject", open_access=False)
            store = TurnStore(redis, scripts, "PUBLISH", 1000, 60)
            lock = TurnLock(scripts, 5000)
            result: dict[str, Any] = {"snapshots": [], "turns": []}
            for count in (10, args.threads):
                user = keys.user_id(f"reader{count}")
                for i in range(count):
                    thread = keys.thread_id(f"t{count}_{i}")
                    await threads.create(thread, user, "")
                    if i % 10 == 0:
                        await one_turn(store, lock, thread, user, i)
                result["snapshots"].append(
                    await snapshot(redis, threads, inbox, user, args.samples)
                )
            for members in (1, 10, 100):
                owner = keys.user_id(f"owner{members}")
                thread = keys.thread_id(f"members{members}")
                await threads.create(thread, owner, "")
                for m in range(members - 1):
                    await threads.add_member(thread, owner, keys.user_id(f"m{members}_{m}"))
                await one_turn(store, lock, thread, owner, 0)  # warm the scripts
                before = await commands(redis)
                started = time.perf_counter()
                await one_turn(store, lock, thread, owner, 1)
                elapsed = time.perf_counter() - started
                after = await commands(redis)
                result["turns"].append({
                    "members": members, "commands": after[0] - before[0] - 1,
                    "publishes": after[1] - before[1], "turn_ms": round(elapsed * 1000, 2),
                })  # fmt: skip
            await redis.aclose()
            return result
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=20)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    small, big = result["snapshots"]
    print(
        f"snapshot: {small['threads']} threads {small['median_ms']} ms in "
        f"{small['round_trips']} round trips; {big['threads']} threads {big['median_ms']} ms in "
        f"{big['round_trips']} round trips"
    )
    for turn in result["turns"]:
        print(
            f"turn with {turn['members']:>3} members: {turn['commands']} Redis commands "
            f"({turn['publishes']} publishes), {turn['turn_ms']} ms"
        )


if __name__ == "__main__":
    main()
