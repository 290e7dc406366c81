"""History pages of a branched thread against a linear one of the same size.

Builds two threads in a private redis-server through the real commit scripts
(BEGIN_TURN / END_TURN, which write the tree index): a linear thread of
``--messages`` messages, and a tree of as many messages in ``--branches``
branches (each branch forks under one of the 10 latest replies, as an edit
of a recent message does, and adds ``messages / branches`` messages; pages
are read from leaves at least 300 messages deep, so both threads return
full pages). Then times, in the same run and
alternating between the two, the operations whose cost must not grow with
branches: a ``get_history`` page (50 messages, from a leaf), the next page
(``before``), and the newest leaf under a message (what ``switch`` does).
Reports medians and the branched/linear ratio.

    python3 -m bench.trees                # 10,000 messages, 1,000 branches
    python3 -m bench.trees --messages 2000 --branches 200 --samples 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from app.chat import keys
from app.chat.history import HistoryReader
from app.chat.keys import ThreadId
from app.chat.lock import TurnLock
from app.chat.records import Done, Loading, Message
from app.chat.scripts import Scripts
from app.chat.threads import Threads
from app.chat.turns import Begun, TurnStore
from tests.procs import RedisServer

RESULTS = Path(__file__).parent / "results" / "trees.json"


class Builder:
    """Whole turns (a user message and its reply) through the commit scripts."""

    def __init__(self, redis: Redis, thread: ThreadId) -> None:
        scripts = Scripts(redis)
        self.redis, self.thread = redis, thread
        self.lock = TurnLock(scripts, 5000)
        self.store = TurnStore(redis, scripts, "PUBLISH", 100, 60)
        self.threads = Threads(redis, scripts)
        self.turns = 0

    async def turn(self, anchor: str = "") -> tuple[str, str]:
        self.turns += 1
        gen = f"g{self.turns}"
        lease = await self.lock.acquire(self.thread)
        assert lease is not None
        words = " ".join(f"word{i}" for i in range(20))
        ask = Message("", "user", f"question {self.turns} {words}", "u", 1, "complete")
        begun = await self.store.begin(
            self.thread, lease, ask, Loading(self.thread, gen, "fake"), "bench", anchor
        )
        assert isinstance(begun, Begun), begun
        answer = Message(
            "", "assistant", f"answer {self.turns} {words}", "assistant", 1, "complete"
        )
        reply = await self.store.end(self.thread, lease, answer, Done(self.thread, gen, "complete"))
        assert reply is not None
        return begun.message_id, reply.message_id


async def build_linear(redis: Redis, thread: ThreadId, messages: int) -> list[str]:
    builder = Builder(redis, thread)
    await builder.threads.open(thread, keys.user_id("u"))
    ids: list[str] = []
    for _ in range(messages // 2):
        ids += await builder.turn()
    return ids


async def build_tree(
    redis: Redis, thread: ThreadId, messages: int, branches: int, rng: random.Random
) -> tuple[list[str], list[str], dict[str, int]]:
    """The tree's message ids, its branches' leaves, and each message's depth."""
    builder = Builder(redis, thread)
    await builder.threads.open(thread, keys.user_id("u"))
    per_branch = messages // branches // 2  # turns per branch
    ids: list[str] = []
    leaves: list[str] = []
    depth: dict[str, int] = {"": 0}
    for branch in range(branches):
        # The first branch starts the thread; every other forks under one of
        # the 10 latest replies (an edit of a recent message, as users do).
        anchor = rng.choice(ids[1::2][-10:]) if branch else ""
        for turn in range(per_branch):
            parent = anchor if turn == 0 else ids[-1]
            question, reply = await builder.turn(anchor if turn == 0 else "")
            depth[question] = depth[parent] + 1
            depth[reply] = depth[parent] + 2
            ids += [question, reply]
        leaves.append(ids[-1])
    return ids, leaves, depth


async def timed(op: Callable[[], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    await op()
    return (time.perf_counter() - start) * 1000


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-trees-") as tmp:
        server = RedisServer(Path(tmp)).start()
        redis = Redis(port=server.port, decode_responses=True)
        try:
            linear_t, tree_t = keys.thread_id("linear"), keys.thread_id("tree")
            started = time.perf_counter()
            linear = await build_linear(redis, linear_t, args.messages)
            tree, leaves, depth = await build_tree(redis, tree_t, args.messages, args.branches, rng)
            built_s = time.perf_counter() - started
            reader = HistoryReader(redis, Scripts(redis))
            switcher = {t: Builder(redis, t) for t in (linear_t, tree_t)}
            samples: dict[str, list[float]] = {}

            async def switch(thread: ThreadId, message_id: str) -> None:
                """A whole ``switch``: the lock, SWITCH_BRANCH, the release."""
                builder = switcher[thread]
                lease = await builder.lock.acquire(thread)
                assert lease is not None
                await builder.store.switch(thread, lease, message_id)
                await builder.lock.release(thread, lease)

            deep = [leaf for leaf in leaves if depth[leaf] >= 300]
            befores = [m for m in tree if depth[m] >= 100]
            for _ in range(args.samples):
                # Alternate the two threads so that drift hits both alike.
                lin_leaf, tree_leaf = linear[-1], rng.choice(deep)
                ops = {
                    "page at a leaf": (
                        lambda leaf=lin_leaf: reader.page(linear_t, None, 50, leaf),
                        lambda leaf=tree_leaf: reader.page(tree_t, None, 50, leaf),
                    ),
                    "next page (before)": (
                        lambda: reader.page(linear_t, rng.choice(linear[100:]), 50),
                        lambda: reader.page(tree_t, rng.choice(befores), 50),
                    ),
                    "model context (4,000 tokens)": (
                        lambda leaf=lin_leaf: reader.context(linear_t, leaf, 4000, _tokens),
                        lambda leaf=tree_leaf: reader.context(tree_t, leaf, 4000, _tokens),
                    ),
                    "switch (newest leaf under a message)": (
                        lambda: switch(linear_t, rng.choice(linear)),
                        lambda: switch(tree_t, rng.choice(tree)),
                    ),
                }
                for name, (on_linear, on_tree) in ops.items():
                    samples.setdefault(f"{name}|linear", []).append(await timed(on_linear))
                    samples.setdefault(f"{name}|tree", []).append(await timed(on_tree))
            tree_hash = await redis.hlen(keys.tree(tree_t))
            memory = {t: await redis.memory_usage(keys.tree(t)) or 0 for t in (linear_t, tree_t)}
        finally:
            await redis.aclose()
            server.stop()
    rows = []
    for name in dict.fromkeys(key.split("|")[0] for key in samples):
        lin = statistics.median(samples[f"{name}|linear"])
        tre = statistics.median(samples[f"{name}|tree"])
        rows.append({"operation": name, "linear_ms": lin, "tree_ms": tre, "ratio": tre / lin})
    return {
        "messages": args.messages, "branches": args.branches, "samples": args.samples,
        "build_s": built_s, "tree_index_fields": tree_hash, "deep_leaves": len(deep),
        "deepest": max(depth.values()),
        "tree_index_bytes": memory, "rows": rows,
    }  # fmt: skip


def _tokens(message: Message) -> int:
    return len(message.content) // 3 + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--branches", type=int, default=1_000)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args()
    result = asyncio.run(measure(args))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.messages} messages; tree in {args.branches} branches; built in "
          f"{result['build_s']:.1f} s; medians of {args.samples}")  # fmt: skip
    print("| operation | linear (ms) | branched (ms) | branched / linear |")
    print("| --- | ---: | ---: | ---: |")
    for row in result["rows"]:
        print(f"| {row['operation']} | {row['linear_ms']:.3f} | {row['tree_ms']:.3f} | "
              f"{row['ratio']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
