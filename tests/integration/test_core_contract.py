"""The core contract on real pods and a real Redis: single writer, durable
history, paging, the seed protocol, input checks, the documented key layout."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

import httpx
import orjson
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from app.llm.fake import expected_reply
from tests.integration.helpers import collect_until, connect, recv_event, send, timeline

pytestmark = pytest.mark.integration


async def _ready(base: str, thread: str, query: str = ""):
    ws = await connect(base, thread, query)
    ready = await recv_event(ws)
    assert ready["type"] == "ready"
    return ws, ready


async def test_simultaneous_prompts_on_two_pods_give_one_turn(redis_server, pod_factory):
    pod_a = pod_factory(redis_server, CHAT_FAKE_TOKEN_DELAY_MS=20)
    pod_b = pod_factory(redis_server, CHAT_FAKE_TOKEN_DELAY_MS=20)
    db = redis_server.client()
    for round_no in range(4):
        thread = f"race{round_no}"
        (a, _), (b, _) = await asyncio.gather(_ready(pod_a.ws, thread), _ready(pod_b.ws, thread))
        try:
            await asyncio.gather(
                send(a, {"type": "prompt", "content": "from a"}),
                send(b, {"type": "prompt", "content": "from b"}),
            )
            seen_a, seen_b = await asyncio.gather(collect_until(a), collect_until(b))
            errors = [e for e in seen_a + seen_b if e["type"] == "error"]
            assert [(e["code"], e["retryable"]) for e in errors] == [("thread_busy", True)]
            assert timeline(seen_a) == timeline(seen_b)
            assert sum(e["type"] == "loading" for e in seen_a) == 1
            roles = [f["role"] for _, f in db.xrange(f"chat:{{{thread}}}:history")]
            assert roles == ["user", "assistant"]
            # The loser may prompt once the thread is free.
            loser = b if any(e["type"] == "error" for e in seen_b) else a
            await send(loser, {"type": "prompt", "content": "my turn"})
            again = await collect_until(loser)
            assert again[-1]["status"] == "complete"
        finally:
            await a.close()
            await b.close()


async def test_history_survives_pod_restarts(redis_server, pod_factory):
    pod_a = pod_factory(redis_server)
    ws, _ = await _ready(pod_a.ws, "durable1")
    await send(ws, {"type": "prompt", "content": "remember me"})
    seen = await collect_until(ws)
    await ws.close()
    pod_a.kill()
    pod_b = pod_factory(redis_server)
    ws, ready = await _ready(pod_b.ws, "durable1")
    try:
        assert ready["last_event_id"] == seen[-1]["id"]
        await send(ws, {"type": "get_history"})
        history = await recv_event(ws)
    finally:
        await ws.close()
    committed = [e["message"] for e in seen if e["type"] == "message"]
    assert history["messages"] == committed
    assert [m["status"] for m in history["messages"]] == ["complete", "complete"]
    assert history["has_more"] is False
    entries = redis_server.client().xrange("chat:{durable1}:history")
    assert [entry_id for entry_id, _ in entries] == [m["id"] for m in committed]
    assert entries[0][1] == {
        "role": "user", "content": "remember me", "user_id": "anonymous",
        "status": "complete", "created_at": str(committed[0]["created_at"]),
    }  # fmt: skip


async def test_history_pages_oldest_first(redis_server, pod_factory):
    pod = pod_factory(redis_server, CHAT_FAKE_REPLY_TOKENS=3, CHAT_FAKE_TOKEN_DELAY_MS=0)
    ws, _ = await _ready(pod.ws, "pages1")
    try:
        for i in range(3):
            await send(ws, {"type": "prompt", "content": f"q{i}"})
            await collect_until(ws)
        pages, before = [], None
        while True:
            frame = {"type": "get_history", "limit": 2}
            if before:
                frame["before"] = before
            await send(ws, frame)
            page = await recv_event(ws)
            pages.append(page)
            if not page["has_more"]:
                break
            before = page["messages"][0]["id"]
    finally:
        await ws.close()
    assert [len(p["messages"]) for p in pages] == [2, 2, 2]
    flat = [m for p in reversed(pages) for m in p["messages"]]
    assert [m["content"] for m in flat[::2]] == ["q0", "q1", "q2"]
    assert [m["id"] for m in flat] == sorted(m["id"] for m in flat)


async def test_seed_protocol_on_the_same_threads(redis_server, pod_factory):
    pod = pod_factory(redis_server)
    async with websockets.connect(f"{pod.ws}/websocket?threadID=seed1") as seed:
        await seed.send("(GET_HISTORY)")
        assert orjson.loads(await asyncio.wait_for(seed.recv(), 10)) == []
        await seed.send("hello old client")
        frames = []
        while not frames or frames[-1] != "[DONE]":
            frames.append(await asyncio.wait_for(seed.recv(), 10))
        assert frames[0] == "[LOADING]"
        assert "".join(frames[1:-1]) == expected_reply("hello old client", 30)
        await seed.send("(GET_HISTORY)")
        history = orjson.loads(await asyncio.wait_for(seed.recv(), 10))
    assert history == [
        {"role": "user", "content": "hello old client"},
        {"role": "assistant", "content": expected_reply("hello old client", 30)},
    ]
    ws, _ = await _ready(pod.ws, "seed1")
    try:
        await send(ws, {"type": "get_history"})
        v1 = await recv_event(ws)
    finally:
        await ws.close()
    assert [(m["role"], m["content"]) for m in v1["messages"]] == [
        (h["role"], h["content"]) for h in history
    ]
    async with httpx.AsyncClient() as http:
        listed = (await http.get(f"{pod.http}/list")).json()
    assert "seed1" in listed


async def test_bad_thread_ids_are_refused_before_redis(redis_server, pod_factory):
    pod = pod_factory(redis_server)
    for bad in ["x" * 65, "a{b}", "a:b", "a%20b", "a.b", "%7Bx%7D", "a%0Ab"]:
        with pytest.raises(InvalidStatus) as refused:  # refused before the upgrade
            await connect(pod.ws, bad)
        assert refused.value.response.status_code in (403, 404), bad
    # Nothing was built from them: only the reaper's own key exists.
    assert set(redis_server.client().keys("*")) <= {"chat:reaper:leader"}


async def test_bad_frames_get_errors_and_the_socket_lives_on(redis_server, pod_factory):
    pod = pod_factory(redis_server, CHAT_MAX_PROMPT_CHARS=10)
    ws, _ = await _ready(pod.ws, "frames1")
    try:
        cases = [
            ("not json", "bad_request"),
            ('{"type": "nope"}', "bad_request"),
            ('{"type": "prompt", "content": 5}', "bad_request"),
            ('{"type": "prompt", "content": "x", "extra": 1}', "bad_request"),
            ('{"type": "get_history", "limit": 500}', "bad_request"),
            ('{"type": "get_history", "before": "drop table"}', "bad_request"),
            ('{"type": "prompt", "content": "far too long for it"}', "too_large"),
            ("[" * 5000 + "]" * 5000, "bad_request"),
        ]
        for frame, code in cases:
            await ws.send(frame)
            error = await recv_event(ws)
            assert (error["type"], error["code"]) == ("error", code), frame[:40]
        await ws.send(b"\x00binary")
        assert (await recv_event(ws))["code"] == "bad_request"
        await send(ws, {"type": "ping"})
        assert (await recv_event(ws))["type"] == "pong"
        await send(ws, {"type": "prompt", "content": "still ok"})
        assert (await collect_until(ws))[-1]["status"] == "complete"
    finally:
        await ws.close()


async def test_bad_after_is_refused(redis_server, pod_factory):
    pod = pod_factory(redis_server)
    with pytest.raises(InvalidStatus) as refused:  # refused before the upgrade
        await connect(pod.ws, "after1", "?after=yesterday")
    assert refused.value.response.status_code == 403


# Every key the documented schema allows (README "Redis keys").
_SCHEMA = re.compile(
    r"chat:\{[A-Za-z0-9_-]{1,64}\}:(history|events|lock|fence|turn|meta|members|dedup)"
    r"|chat:user:\{[^{}]+\}:threads|chat:turns|chat:reaper:leader"
)


async def test_redis_holds_only_documented_keys(redis_server, pod_factory):
    pod = pod_factory(redis_server)
    ws, _ = await _ready(pod.ws, "layout1")
    try:
        await send(ws, {"type": "prompt", "content": "hi", "client_msg_id": "m1"})
        await collect_until(ws)
    finally:
        await ws.close()
    db = redis_server.client()
    found = set(db.keys("*"))
    assert all(_SCHEMA.fullmatch(k) for k in found), found
    assert {"chat:{layout1}:history", "chat:{layout1}:events", "chat:{layout1}:meta",
            "chat:{layout1}:fence", "chat:{layout1}:dedup"} <= found  # fmt: skip
    assert "chat:{layout1}:lock" not in found and "chat:{layout1}:turn" not in found
    meta = db.hgetall("chat:{layout1}:meta")
    assert meta["message_count"] == "2" and meta["event_n"] == str(db.xlen("chat:{layout1}:events"))
    assert db.hget("chat:{layout1}:dedup", "m1") == db.xrange("chat:{layout1}:history")[0][0]


async def test_embedded_default_serves_a_turn(pod_factory):
    pod = pod_factory(None)
    ws, _ = await _ready(pod.ws, "embedded1")
    try:
        await send(ws, {"type": "prompt", "content": "no redis needed"})
        seen = await collect_until(ws)
    finally:
        await ws.close()
    assert seen[-2]["message"]["content"] == expected_reply("no redis needed", 30)
    assert "EMBEDDED" in pod.logs()


def test_real_redis_without_auth_secret_refuses_to_start(redis_server):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_", "ANTHROPIC_"))}
    env["REDIS_URL"] = redis_server.url
    result = subprocess.run(
        [sys.executable, "-m", "app", "serve", "--port", "0"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode != 0
    assert "CHAT_AUTH_SECRET" in result.stderr


async def test_demo_page_and_health(redis_server, pod_factory):
    pod = pod_factory(redis_server)
    async with httpx.AsyncClient() as http:
        page = await http.get(f"{pod.http}/")
        assert page.status_code == 200 and "<title>durable-chat</title>" in page.text
        assert (await http.get(f"{pod.http}/healthz")).status_code == 200
        assert (await http.get(f"{pod.http}/readyz")).status_code == 200
        redis_server.stop()
        assert (await http.get(f"{pod.http}/readyz")).status_code == 503
        assert (await http.get(f"{pod.http}/healthz")).status_code == 200
