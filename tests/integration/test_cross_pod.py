"""Two real pods on one real Redis: the same timeline everywhere, one writer."""

from __future__ import annotations

import asyncio

from app.llm.fake import expected_reply
from tests.integration.helpers import connect, recv_event, send, timeline, until_done


async def test_same_timeline_on_both_pods(redis_server, pod_factory):
    pod_a, pod_b = pod_factory(redis_server), pod_factory(redis_server)
    a = await connect(pod_a.ws, "cross1")
    b = await connect(pod_b.ws, "cross1")
    try:
        assert (await recv_event(a))["type"] == "ready"
        assert (await recv_event(b))["type"] == "ready"
        await send(a, {"type": "prompt", "content": "hi there"})
        seen_a, seen_b = await asyncio.gather(until_done(a), until_done(b))
    finally:
        await a.close()
        await b.close()
    assert timeline(seen_a) == timeline(seen_b)
    types = [e["type"] for e in seen_a]
    assert types[:2] == ["message", "loading"] and types[-2:] == ["message", "done"]
    assert set(types[2:-2]) == {"delta"}
    deltas = [e for e in seen_b if e["type"] == "delta"]
    assert [d["seq"] for d in deltas] == list(range(len(deltas)))
    text = "".join(d["text"] for d in deltas)
    assert text == seen_b[-2]["message"]["content"] == expected_reply("hi there", 30)
    numbers = [e["n"] for e in seen_a]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
