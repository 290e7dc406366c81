"""The workload every peer serves: the same turns as a durable-chat pod.

A turn publishes, to everyone in the thread's room, the frames a durable-chat
turn publishes, with the same shapes and sizes: the user's ``message``,
``loading``, the reply's ``delta`` frames, the assistant's ``message`` and
``done``. The reply is the fake model's (same words, same count, same pace,
the same ``[t=<emission time>]`` stamp after each token, taken when the token
is emitted), coalesced by the same rule as durable-chat's turn runner: a
delta goes out when the buffered text reaches CHAT_DELTA_MAX_BYTES or its
oldest token is CHAT_DELTA_WINDOW_MS old. Each publish is awaited before the
next, as durable-chat awaits each commit.

What a peer does not do is everything durable-chat does besides fan-out: no
lock, no fencing, no history or timeline Stream, no event numbers, no resume.

The configuration is read from the same variables as a pod's, so one
dictionary configures both. BENCH_PING_INTERVAL_S, when set, replaces every
peer's keep-alive ping interval (the quick run's idle phase uses it to wait
less); unset, each keeps its own default.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import uvicorn

from app.llm.fake import reply_tokens

Frame = dict[str, Any]
PING_ENV = "BENCH_PING_INTERVAL_S"


def ping_interval_s(default: float) -> float:
    """The keep-alive ping interval: BENCH_PING_INTERVAL_S, or ``default``."""
    return float(os.environ.get(PING_ENV) or default)


Publish = Callable[[str, Frame], Awaitable[None]]


@dataclass(frozen=True)
class TurnConfig:
    tokens: int
    delay_s: float
    window_s: float
    max_bytes: int

    @classmethod
    def from_env(cls) -> TurnConfig:
        env = os.environ
        return cls(
            tokens=int(env.get("CHAT_FAKE_REPLY_TOKENS", "40")),
            delay_s=float(env.get("CHAT_FAKE_TOKEN_DELAY_MS", "20")) / 1000,
            window_s=float(env.get("CHAT_DELTA_WINDOW_MS", "25")) / 1000,
            max_bytes=int(env.get("CHAT_DELTA_MAX_BYTES", "2048")),
        )


async def _produce(prompt: str, config: TurnConfig, out: asyncio.Queue[str | None]) -> None:
    for piece in reply_tokens(prompt, config.tokens):
        if config.delay_s:
            await asyncio.sleep(config.delay_s)
        out.put_nowait(f"{piece}[t={time.time():.6f}]")
    out.put_nowait(None)


async def run_turn(thread: str, prompt: str, publish: Publish, config: TurnConfig) -> None:
    """Stream one fake reply to the room ``thread`` through ``publish``."""
    generation_id = secrets.token_hex(8)
    now_ms = int(time.time() * 1000)
    user = {"role": "user", "content": prompt, "user_id": "anonymous"}
    await publish(thread, _message(thread, user, now_ms))
    await publish(
        thread,
        {"type": "loading", "thread_id": thread, "generation_id": generation_id, "model": "fake"},
    )
    inbox: asyncio.Queue[str | None] = asyncio.Queue()
    producer = asyncio.create_task(_produce(prompt, config, inbox))
    pending: list[str] = []
    pending_bytes = 0
    published: list[str] = []
    seq = 0

    async def flush() -> None:
        nonlocal pending, pending_bytes, seq
        if not pending:
            return
        text = "".join(pending)
        pending, pending_bytes = [], 0
        await publish(
            thread,
            {"type": "delta", "thread_id": thread, "generation_id": generation_id, "seq": seq,
             "text": text},
        )  # fmt: skip
        published.append(text)
        seq += 1

    # The same coalescing loop as durable-chat's turn runner (app/chat/runner.py).
    loop = asyncio.get_running_loop()
    deadline: float | None = None
    try:
        while True:
            if deadline is not None and loop.time() >= deadline:
                deadline = None
                await flush()
                continue
            if not inbox.empty():
                item = inbox.get_nowait()
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        item = await inbox.get()
                except TimeoutError:
                    continue
            if item is None:
                break
            pending.append(item)
            pending_bytes += len(item)
            if deadline is None:
                deadline = loop.time() + config.window_s
            if pending_bytes >= config.max_bytes or config.window_s == 0:
                deadline = None
                await flush()
        await flush()
    finally:
        producer.cancel()
    assistant = {"role": "assistant", "content": "".join(published), "user_id": "assistant"}
    await publish(thread, _message(thread, assistant, int(time.time() * 1000)))
    await publish(
        thread,
        {"type": "done", "thread_id": thread, "generation_id": generation_id,
         "status": "complete", "usage": {"input_tokens": 1, "output_tokens": config.tokens},
         "message_id": f"{now_ms}-1"},
    )  # fmt: skip


def _message(thread: str, body: dict[str, Any], created_at: int) -> Frame:
    message = {"id": f"{created_at}-0", **body, "created_at": created_at, "status": "complete"}
    return {"type": "message", "thread_id": thread, "message": message}


def serve(make_app: Callable[[str], Any], description: str | None) -> None:
    """A peer's command line: ``--port N [--redis URL]``, then uvicorn."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", default="", help="the Redis URL (not for the bare peer)")
    args = parser.parse_args()
    uvicorn.run(
        make_app(args.redis), host="127.0.0.1", port=args.port, log_level="warning",
        ws_ping_interval=ping_interval_s(20.0),  # uvicorn's default
    )  # fmt: skip
