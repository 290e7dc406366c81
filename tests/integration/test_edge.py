"""The WebSocket and HTTP edge of a real pod: ids checked before any Redis key
is built, bad frames answered with errors on a socket that lives on, health
and readiness, the demo page."""

from __future__ import annotations

from urllib.parse import quote

import httpx
import orjson

from app.llm.fake import expected_reply
from tests.integration.helpers import REFUSED, open_ready, recv_event, refusal, send, turn, unique
from tests.procs import wait_until

BAD_THREAD_IDS = ["x" * 65, "a{b}", "..", "a:b", "a b", "a/b", "é", "a*"]


async def test_bad_thread_ids_are_refused_before_any_key_is_built(redis_server, pod_factory):
    pod = pod_factory(redis_server)
    r = redis_server.client()
    for bad in BAD_THREAD_IDS:
        encoded = quote(bad, safe="")
        v1 = await refusal(f"{pod.ws}/v1/threads/{encoded}/ws")
        seed = await refusal(f"{pod.ws}/websocket?threadID={encoded}")
        assert v1 in REFUSED and seed in REFUSED, (bad, v1, seed)
    assert await refusal(f"{pod.ws}/websocket") in REFUSED  # no threadID at all

    keys = r.keys("*")
    for bad in BAD_THREAD_IDS:
        assert not [k for k in keys if bad in k], (bad, keys)
    assert not [k for k in keys if k.startswith("chat:{")], keys

    # The control: a good id (64 characters, every allowed kind) is served.
    good = ("Az09_-" * 11)[:64]
    ws, ready = await open_ready(pod.ws, good)
    await ws.close()
    assert ready["thread_id"] == good
    assert r.exists(f"chat:{{{good}}}:meta") == 1


BAD_AFTERS = [
    "garbage",
    "1-2-3",
    "-1-0",
    "12",
    "1-",
    "18446744073709551616-0",
    "1-0 ",
    "\u0661-\u0660",
]  # non-ASCII digits


async def test_bad_after_is_refused(redis_server, pod_factory):
    pod = pod_factory(redis_server)
    for after in BAD_AFTERS:
        thread = unique("after")
        # Refused before the upgrade: ASGI servers turn a close(1008) before
        # accept into HTTP 403, as for a bad thread id.
        code = await refusal(f"{pod.ws}/v1/threads/{thread}/ws?after={quote(after, safe='')}")
        assert code in REFUSED, (after, code)
        assert not [k for k in redis_server.client().keys("*") if thread in k], after
    # A well-formed after is accepted on the same pod.
    thread = unique("after")
    ws, ready = await open_ready(pod.ws, thread, "?after=0-1")
    await ws.close()
    assert ready["recovered"] is False  # nothing of a new thread can be resumed


async def test_bad_frames_get_errors_and_the_socket_lives_on(redis_server, pod_factory):
    limit = 50
    pod = pod_factory(
        redis_server,
        CHAT_MAX_PROMPT_CHARS=limit,
        CHAT_FAKE_REPLY_TOKENS=5,
        CHAT_FAKE_TOKEN_DELAY_MS=0,
    )
    thread = unique("frames")
    ws, _ = await open_ready(pod.ws, thread)
    bad_frames: list[tuple[str | bytes, str]] = [
        ("{not json", "bad_request"),
        ("", "bad_request"),
        ("[1, 2]", "bad_request"),
        ('"prompt"', "bad_request"),
        ('{"content": "no type"}', "bad_request"),
        ('{"type": "no_such_type"}', "bad_request"),
        ('{"type": 7}', "bad_request"),
        ('{"type": "prompt"}', "bad_request"),
        ('{"type": "prompt", "content": ""}', "bad_request"),
        ('{"type": "prompt", "content": 12}', "bad_request"),
        ('{"type": "get_history", "limit": 0}', "bad_request"),
        ('{"type": "get_history", "limit": 201}', "bad_request"),
        ('{"type": "get_history", "before": "not-an-id"}', "bad_request"),
        ('{"type": "resume", "after": "nope"}', "bad_request"),
        ('{"type": "ping", "x": [[[[[1]]]]]}', "bad_request"),
        (b"\x00\x01binary", "bad_request"),
        (b'{"type": "ping"}', "bad_request"),
        (orjson.dumps({"type": "prompt", "content": "x" * (limit + 1)}).decode(), "too_large"),
        (orjson.dumps({"type": "prompt", "content": "é" * (limit + 1)}).decode(), "too_large"),
    ]
    try:
        for frame, code in bad_frames:
            await ws.send(frame)
            event = await recv_event(ws)
            assert event["type"] == "error", (frame, event)
            assert event["code"] == code, (frame, event)
            assert event["retryable"] is False and event["message"], (frame, event)
        # Nothing was written, and the socket still works.
        assert redis_server.client().xlen(f"chat:{{{thread}}}:history") == 0
        await send(ws, {"type": "ping"})
        assert (await recv_event(ws))["type"] == "pong"
        prompt = "y" * limit  # exactly at the limit: accepted
        events = await turn(ws, prompt)
        assert events[0]["message"]["content"] == prompt
        assert events[-2]["message"]["content"] == expected_reply(prompt, 5)
        assert events[-1]["status"] == "complete"
    finally:
        await ws.close()


async def test_health_readiness_and_demo_page(redis_server, pod_factory):
    pod = pod_factory(redis_server)
    async with httpx.AsyncClient(base_url=pod.http, timeout=10) as http:
        health = await http.get("/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {"status": "ready"}
        page = await http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "<html" in page.text.lower() and "websocket" in page.text.lower()

        redis_server.stop()

        # Not ready without Redis, yet alive (no restart loop for a Redis outage).
        def not_ready() -> bool:
            return httpx.get(f"{pod.http}/readyz", timeout=10).status_code == 503

        wait_until(not_ready, 15, what="/readyz to answer 503 without Redis")
        assert (await http.get("/healthz")).status_code == 200
        # Either check may see the outage first: the subscriber's (no I/O,
        # asked first) or the ping.
        reason = (await http.get("/readyz")).json()["status"]
        assert reason in ("subscriber not hearing", "redis unreachable"), reason
