"""A full Redis: ``maxmemory`` reached under ``noeviction``, every write
refused with OOM. A prompt gets a clear retryable error, a running turn ends
whole (never half a commit), the pods stay up, and all of it recovers when
memory is freed. And a Redis set to evict keys is reported loudly at start."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from app.llm.fake import expected_reply
from tests.integration.helpers import (
    assert_consistent,
    close_all,
    of_type,
    open_ready,
    read_until,
    recorders,
    send,
    stored_history,
    unique,
)
from tests.procs import wait_until

pytestmark = pytest.mark.integration

TOKENS = 150


def _fill(db) -> None:
    """Store 8 MiB, then cap Redis 4 MiB above what it held before: full, and
    it stays full (noeviction) until the junk is deleted. (Measured before
    the SET: right after it Redis also counts the SET's own 8 MiB query
    buffer, which it frees a moment later.)"""
    before = int(db.info("memory")["used_memory"])
    db.set("junk", "x" * 2**23)
    db.config_set("maxmemory", before + 2**22)


def _refused_writes(db) -> int:
    """Commands Redis answered with an error, since it started: while it is
    full, the turn's retried writes (refused for want of memory, or a script
    it cannot load)."""
    return sum(int(stat["count"]) for stat in db.info("errorstats").values())


async def test_a_full_redis_refuses_retryably_and_recovers(redis_server, pod_factory):
    db = redis_server.client()
    assert db.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    env = {"CHAT_FAKE_TOKEN_DELAY_MS": 10, "CHAT_FAKE_REPLY_TOKENS": TOKENS}
    pod_a, pod_b = pod_factory(redis_server, **env), pod_factory(redis_server, **env)
    streaming, refused = unique("full"), unique("refused")
    [writer] = await recorders([pod_a.ws, pod_b.ws], [streaming])
    [watcher] = await recorders([pod_b.ws, pod_a.ws], [streaming])
    raw, _ = await open_ready(pod_b.ws, refused)
    try:
        await writer.client.prompt("before it fills")
        await writer.until(lambda ev: len(of_type(ev, "delta")) >= 5, 15, "the turn to stream")
        _fill(db)
        await send(raw, {"type": "prompt", "content": "while full", "client_msg_id": "m1"})
        [*_, error] = await read_until(raw, lambda e: e["type"] == "error", 10)
        assert (error["code"], error["retryable"]) == ("unavailable", True)
        async with httpx.AsyncClient() as http:
            for pod in (pod_a, pod_b):
                assert (await http.get(f"{pod.http}/healthz")).status_code == 200
        # The turn's writes keep being refused meanwhile, and it waits for room.
        so_far = _refused_writes(db)
        await asyncio.to_thread(
            wait_until, lambda: _refused_writes(db) > so_far, 10, what="a refused write of the turn"
        )
        assert of_type(writer.events, "done") == []
        db.delete("junk")
        await writer.until(lambda ev: len(of_type(ev, "done")) == 1, 20, "the turn to end")
        await send(raw, {"type": "prompt", "content": "while full", "client_msg_id": "m1"})
        await read_until(raw, lambda e: e["type"] == "done", 20)
    finally:
        await raw.close()
        await close_all([writer, watcher])
        db.config_set("maxmemory", 0)
    # Whole, and complete: the text buffered during the outage was committed.
    assert [
        d["status"] for d in of_type(writer.events, "done") + of_type(watcher.events, "done")
    ] == ["complete"] * 2
    assert [m["content"] for m in stored_history(redis_server, streaming)] == [
        "before it fills", expected_reply("before it fills", TOKENS)
    ]  # fmt: skip
    assert [m["content"] for m in stored_history(redis_server, refused)] == [
        "while full", expected_reply("while full", TOKENS)
    ]  # fmt: skip
    assert all(pod.proc is not None and pod.proc.poll() is None for pod in (pod_a, pod_b))
    assert_consistent([writer, watcher], redis_server, turns=1)


async def test_an_evicting_policy_is_reported_at_start(redis_server, pod_factory):
    redis_server.client().config_set("maxmemory-policy", "allkeys-lru")
    pod = pod_factory(redis_server)
    await asyncio.to_thread(
        wait_until, lambda: "REDIS MAY EVICT KEYS" in pod.logs(), 10, what="the warning"
    )
    assert "allkeys-lru" in pod.logs()
