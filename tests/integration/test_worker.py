"""``durable-chat worker``: the reaper on its own, for pods that do not run it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

from tests.integration.helpers import connect, recv_event, send, until_done

pytestmark = pytest.mark.integration


async def test_standalone_worker_closes_a_dead_pods_turn(redis_server, pod_factory):
    """The worker closes the dead pod's turn; the prompt queued behind it is
    then started by a surviving pod's queue starter (the worker has no model)."""
    no_reaper = {
        "CHAT_REAPER_IN_POD": "false", "CHAT_LOCK_TTL_MS": 1500,
        "CHAT_REAPER_INTERVAL_MS": 300, "CHAT_PROMPT_POLICY": "queue",
        "CHAT_FAKE_TOKEN_DELAY_MS": 20, "CHAT_FAKE_REPLY_TOKENS": 200,
    }  # fmt: skip
    doomed = pod_factory(redis_server, **no_reaper)
    survivor = pod_factory(redis_server, **no_reaper)
    sender = await connect(doomed.ws, "worker1")
    watcher = await connect(survivor.ws, "worker1")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_", "REDIS_"))}
    env.update(REDIS_URL=redis_server.url, CHAT_AUTH="off", CHAT_REAPER_INTERVAL_MS="300")
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "worker",
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        await recv_event(sender)
        await recv_event(watcher)
        await send(sender, {"type": "prompt", "content": "orphan me"})
        while (await recv_event(watcher))["type"] != "delta":
            pass
        await send(sender, {"type": "prompt", "content": "queued behind it"})
        while (await recv_event(watcher))["type"] != "queued":
            pass
        doomed.kill()
        killed_at = time.monotonic()
        seen = await until_done(watcher, timeout=15)
        assert seen[-1]["status"] == "interrupted"
        assert time.monotonic() - killed_at < 1.5 + 0.3 + 2.0
        holder = redis_server.client().get("chat:reaper:leader")
        assert holder is not None and holder.startswith("worker:")
        seen = await until_done(watcher, timeout=20)
        [message] = [e["message"] for e in seen if e["type"] == "message"][:1]
        assert message["content"] == "queued behind it"
        assert seen[-1]["status"] == "complete"
        assert redis_server.client().get("chat:queues:leader") == f"pod:{survivor.name}"
    finally:
        await watcher.close()
        worker.terminate()
        output, _ = await asyncio.wait_for(worker.communicate(), 10)
    assert "closing turn" in output.decode()


def test_worker_refuses_the_embedded_redis():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_", "REDIS_"))}
    result = subprocess.run(
        [sys.executable, "-m", "app", "worker"], env=env, capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    assert result.returncode == 2 and "REDIS_URL" in result.stderr
