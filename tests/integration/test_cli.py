"""The operator's commands against a real pod and a real Redis."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import pytest

from app.llm.fake import expected_reply
from tests.integration.helpers import (
    TIMEOUT_S,
    connect,
    open_ready,
    recv_event,
    send,
    turn,
    until_done,
)

pytestmark = pytest.mark.integration


def _cli(server, *args: str, stdin: str | None = None, timeout: float = 30):
    env = {**os.environ, "REDIS_URL": server.url, "CHAT_AUTH": "off"}
    return subprocess.run(
        [sys.executable, "-m", "app", *args], env=env, input=stdin,
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


async def _turn(pod, thread: str, prompt: str) -> list[dict]:
    ws, _ = await open_ready(pod.ws, thread)
    try:
        return await turn(ws, prompt)
    finally:
        await ws.close()


async def test_history_threads_and_tail(redis_server, pod_factory):
    pod = pod_factory(redis_server)
    seen = await _turn(pod, "ops1", "what is up")
    history = _cli(redis_server, "history", "ops1")
    assert history.returncode == 0, history.stderr
    lines = history.stdout.strip().splitlines()
    assert len(lines) == 2
    assert "user (anonymous): what is up" in lines[0]
    assert lines[1].endswith(expected_reply("what is up", 30))
    assert lines[1].startswith(seen[-2]["message"]["id"])

    threads = _cli(redis_server, "threads", "--user", "anonymous")
    assert threads.stdout.split()[0] == "ops1"

    # tail: the last events first, then new ones as they are committed. It
    # follows the event log from the last event it printed, so the new turn
    # may start as soon as the past two are on screen.
    env = {**os.environ, "REDIS_URL": redis_server.url, "PYTHONUNBUFFERED": "1"}
    tail = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "tail", "ops1", "--last", "2",
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert tail.stdout is not None

    async def row() -> str:
        line = await asyncio.wait_for(tail.stdout.readline(), TIMEOUT_S)
        assert line, "tail exited"
        return line.decode().rstrip("\n")

    try:
        rows = [await row(), await row()]
        await _turn(pod, "ops1", "again")
        rows.append(await row())
        while rows[-1].split()[2] != "done":
            rows.append(await row())
    finally:
        tail.terminate()
        _, raw_err = await asyncio.wait_for(tail.communicate(), 10)
    out = "\n".join(rows) + raw_err.decode()
    kinds = [row.split()[2] for row in rows]
    assert kinds[:2] == ["message", "done"], out  # the last two of the first turn
    assert kinds[2:4] == ["message", "loading"] and kinds[-2:] == ["message", "done"]
    numbers = [int(row.split()[1].lstrip("#")) for row in rows]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # no holes


async def test_turns_shows_running_turn_and_its_lock(redis_server, pod_factory):
    pod = pod_factory(redis_server, CHAT_FAKE_TOKEN_DELAY_MS=50, CHAT_FAKE_REPLY_TOKENS=100)
    assert "no turn is running" in _cli(redis_server, "turns").stdout
    ws = await connect(pod.ws, "ops2")
    try:
        await recv_event(ws)
        await send(ws, {"type": "prompt", "content": "slow"})
        events = []
        while not any(e["type"] == "loading" for e in events):
            events.append(await recv_event(ws))
        generation = events[-1]["generation_id"]
        out = (await asyncio.to_thread(_cli, redis_server, "turns")).stdout
        assert f"ops2  gen={generation} pod=pod0" in out
        assert "lock ttl" in out and "ORPHANED" not in out
        await send(ws, {"type": "cancel"})
        await until_done(ws)
    finally:
        await ws.close()
    assert "no turn is running" in _cli(redis_server, "turns").stdout


def test_chat_streams_a_reply(redis_server, pod_factory):
    pod = pod_factory(redis_server)
    result = _cli(redis_server, "chat", "ops3", "--url", pod.ws, stdin="hello terminal\n")
    assert result.returncode == 0, result.stderr
    assert expected_reply("hello terminal", 30) in result.stdout


def test_bad_thread_id_is_refused_before_redis(redis_server):
    result = _cli(redis_server, "history", "no{good}")
    assert result.returncode != 0
    assert "thread_id" in result.stderr


def test_failures_are_one_line_with_what_to_do(redis_server):
    # A thread that was never used: said, exit 1 (it printed nothing, exit 0).
    result = _cli(redis_server, "history", "never-used")
    assert result.returncode == 1
    assert result.stderr == (
        "durable-chat: no thread never-used in this Redis (check the id, and REDIS_URL)\n"
    )
    # No pod where the terminal client looks: one line, not a traceback.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nowhere = f"ws://127.0.0.1:{closed.getsockname()[1]}"
    result = _cli(redis_server, "chat", "t1", "--url", nowhere, stdin="hello\n")
    assert result.returncode == 1
    assert result.stderr.startswith(f"durable-chat: cannot connect to {nowhere} (refused)")
    assert result.stderr.count("\n") == 1 and "--url" in result.stderr
    # Tracebacks on demand.
    result = _cli(redis_server, "--debug", "chat", "t1", "--url", nowhere, stdin="hello\n")
    assert result.returncode == 1 and "Traceback" in result.stderr
    # Redis down.
    redis_server.stop()
    result = _cli(redis_server, "turns")
    assert result.returncode == 1
    assert result.stderr.startswith("durable-chat: cannot reach Redis")
    assert result.stderr.count("\n") == 1


def test_help_reads_as_a_terminal_user_expects(redis_server):
    text = _cli(redis_server, "history", "--help").stdout
    assert "history [OPTIONS] THREAD" in text
    assert "{thread}" not in text and "<bool>" not in text
    assert "<bool>" not in _cli(redis_server, "--help").stdout
