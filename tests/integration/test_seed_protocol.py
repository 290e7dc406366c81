"""The seed demo's text protocol (``/websocket?threadID=T``) on real pods: the
same threads and storage as protocol v1, and ``GET /list``."""

from __future__ import annotations

import asyncio

import httpx
import orjson
import websockets

from app.llm.fake import expected_reply, reply_tokens
from tests.integration.helpers import get_history, open_ready, unique, until_done

TOKENS = 8


async def _seed_until_done(ws, timeout: float = 15.0) -> list[str]:
    frames: list[str] = []
    async with asyncio.timeout(timeout):
        while not frames or frames[-1] != "[DONE]":
            frames.append(await ws.recv())
    return frames


async def test_seed_protocol_speaks_the_same_threads(redis_server, pod_factory):
    env = {"CHAT_FAKE_REPLY_TOKENS": TOKENS, "CHAT_FAKE_TOKEN_DELAY_MS": 5}
    pod_a, pod_b = pod_factory(redis_server, **env), pod_factory(redis_server, **env)
    thread = unique("seed")
    prompt = "hello from the seed client"
    seed = await websockets.connect(
        f"{pod_a.ws}/websocket?threadID={thread}", open_timeout=10, max_queue=None
    )
    # A protocol-v1 client of the same thread, on the other pod, watches.
    v1, _ = await open_ready(pod_b.ws, thread)
    try:
        await seed.send("(GET_HISTORY)")
        assert orjson.loads(await asyncio.wait_for(seed.recv(), 10)) == []

        await seed.send(prompt)
        frames, v1_events = await asyncio.gather(_seed_until_done(seed), until_done(v1))
        assert frames[0] == "[LOADING]" and frames[-1] == "[DONE]"
        pieces = frames[1:-1]
        assert "".join(pieces) == expected_reply(prompt, TOKENS)
        # Deltas may coalesce tokens, never split or reorder them.
        assert len(pieces) <= len(reply_tokens(prompt, TOKENS))
        v1_text = "".join(e["text"] for e in v1_events if e["type"] == "delta")
        assert v1_text == "".join(pieces)

        await seed.send("(GET_HISTORY)")
        seed_history = orjson.loads(await asyncio.wait_for(seed.recv(), 10))
        assert seed_history == [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": expected_reply(prompt, TOKENS)},
        ]
        page = await get_history(v1)
        assert [{"role": m["role"], "content": m["content"]} for m in page["messages"]] == (
            seed_history
        )
        assert [m["status"] for m in page["messages"]] == ["complete", "complete"]
        assert page["messages"][0]["user_id"] == "anonymous"
    finally:
        await seed.close()
        await v1.close()

    # A second seed socket, on the other pod, reads the same history.
    again = await websockets.connect(
        f"{pod_b.ws}/websocket?threadID={thread}", open_timeout=10, max_queue=None
    )
    try:
        await again.send("(GET_HISTORY)")
        assert orjson.loads(await asyncio.wait_for(again.recv(), 10)) == seed_history
    finally:
        await again.close()

    async with httpx.AsyncClient(timeout=10) as http:
        for pod in (pod_a, pod_b):
            listed = await http.get(f"{pod.http}/list")
            assert listed.status_code == 200
            assert thread in listed.json()
