"""What one full-speed turn costs Redis, counted in instructions.

Through the real stores and scripts against a private redis-server run under
valgrind's callgrind, ``--threads`` threads take ``--turns`` turns each, as
the fan-out phase's turns are: a short prompt, a 400-token stamped reply
(about 12 KB) in 2 KB deltas that go with the turn's end. Instructions are
what the machine cannot make noisy: a change to a script is measured here
exactly, where a CPU figure on 2 shared cores moves by 20%. With
``--read-context`` each turn reads its model's context from Redis (as a pod
does when it does not keep the thread's: app.chat.contexts).

    python3 -m bench.turn_cost                     # 10 threads x 10 turns
    python3 -m bench.turn_cost --read-context      # the context read too
    callgrind_annotate bench/results/tmp/turn_cost.callgrind | head -40

Needs valgrind (``apt-get install valgrind``); Redis runs about 50x slower
under it, so a run takes about 15 seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from app.chat import keys
from app.chat.history import HistoryReader
from app.chat.lock import TurnLock
from app.chat.records import Delta, Done, Loading, Message
from app.chat.scripts import Scripts
from app.chat.threads import Threads
from app.chat.turns import Begun, TurnStore
from app.llm.context import message_tokens
from tests.procs import free_port

OUT = Path(__file__).parent / "results" / "tmp" / "turn_cost.callgrind"  # not kept in git
USAGE = {"input_tokens": 5, "output_tokens": 400}


def reply() -> str:
    """A reply as CHAT_FAKE_STAMP's: 400 words, each with its stamp."""
    return "".join(f" {i}[t={time.time():.6f}]" for i in range(400))


async def instrument(state: str, pid: int) -> None:
    """Turn callgrind's counting on or off in the redis-server ``pid``."""
    control = await asyncio.create_subprocess_exec(
        "callgrind_control", "-i", state, str(pid),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    await control.wait()


async def turns(port: int, pid: int, threads: int, count: int, read_context: bool) -> int:
    redis = Redis(port=port, decode_responses=True)
    for _ in range(100):  # redis-server starts slowly under valgrind
        try:
            await redis.ping()
            break
        except RedisConnectionError:
            await asyncio.sleep(0.2)
    scripts = Scripts(redis)
    store = TurnStore(redis, scripts, "PUBLISH", 1000, 60)
    history = HistoryReader(redis, scripts)
    lock = TurnLock(scripts, 5000)
    user = keys.user_id("bench")
    made = [keys.thread_id(f"t{i}") for i in range(threads)]
    for thread in made:
        await Threads(redis, scripts).create(thread, user, "")
    # Counted from here: the turns (the scripts load on first use, with them).
    await instrument("on", pid)
    for n in range(count):
        for thread in made:
            lease = await lock.acquire(thread)
            assert lease is not None
            generation = f"g{n}"
            ask = Message("", "user", f"prompt {n}", user, 1, "complete")
            begun = await store.begin(thread, lease, ask, Loading(thread, generation, "fake"), "b")
            assert isinstance(begun, Begun), begun
            if read_context:
                await history.context(
                    thread, begun.message_id, 30_000, message_tokens, begun.context_start
                )
            text = reply()
            deltas = [
                Delta(thread, generation, i, text[at : at + 2048])
                for i, at in enumerate(range(0, len(text), 2048))
            ]
            answer = Message("", "assistant", text, "assistant", 1, "complete", usage=USAGE)
            done = Done(thread, generation, "complete", usage=USAGE)
            assert await store.end(thread, lease, answer, done, deltas) is not None
    await instrument("off", pid)
    await redis.aclose()
    return threads * count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=10)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--read-context", action="store_true")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("redis-server") is None:
        sys.exit("needs valgrind and redis-server (apt-get install valgrind redis-server)")
    port = free_port()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [
                "valgrind", "--tool=callgrind", "--instr-atstart=no",
                f"--callgrind-out-file={OUT}", "redis-server", "--port", str(port),
                "--save", "", "--appendonly", "no", "--dir", tmp,
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            done = asyncio.run(turns(port, server.pid, args.threads, args.turns, args.read_context))
        finally:
            server.terminate()
            server.wait()
    total = next(
        int(line.split()[1]) for line in OUT.read_text().splitlines()
        if line.startswith("totals:")
    )  # fmt: skip
    print(f"{done} turns: {total / done / 1e6:.2f} M Redis instructions a turn ({OUT})")


if __name__ == "__main__":
    main()
