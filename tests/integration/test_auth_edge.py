"""JWT (HS256) at the socket edge of a real pod: no token, a forged token, a
valid one by query or header, and a valid user who is not a member."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import jwt

from app.llm.fake import expected_reply
from tests.integration.helpers import REFUSED, open_ready, refusal, send, unique, until_done
from tests.integration.tokens import AUDIENCE, AUTH_ENV, ISSUER, bearer, token


async def test_tokens_at_the_socket_edge(redis_server, pod_factory):
    pod = pod_factory(
        redis_server, **AUTH_ENV, CHAT_FAKE_REPLY_TOKENS=5, CHAT_FAKE_TOKEN_DELAY_MS=1
    )
    thread = unique("auth")
    url = f"{pod.ws}/v1/threads/{thread}/ws"
    alice, bob = token("alice"), token("bob")
    now = int(time.time())
    refused_tokens = {
        "none": None,
        "other secret": token("alice", key="another-secret-" + "y" * 40),
        "expired": token("alice", exp=now - 3600),
        "no exp": token("alice", exp=None),
        "no sub": token(None),
        "alg none": jwt.encode(
            {"sub": "alice", "exp": now + 300, "iss": ISSUER, "aud": AUDIENCE}, None, "none"
        ),
        "garbage": "not.a.token",
    }
    for what, refused in refused_tokens.items():
        query = f"?token={refused}" if refused else ""
        assert await refusal(url + query) in REFUSED, what
        if refused:
            header = {"Authorization": f"Bearer {refused}"}
            assert await refusal(url, additional_headers=header) in REFUSED, what
    assert await refusal(f"{pod.ws}/websocket?threadID={thread}") in REFUSED
    # None of it created the thread.
    assert not [k for k in redis_server.client().keys("*") if thread in k]

    # alice by query parameter creates the thread and runs a turn.
    ws, ready = await open_ready(pod.ws, thread, f"?token={alice}")
    try:
        assert ready["thread_id"] == thread
        await send(ws, {"type": "prompt", "content": "alice was here"})
        events = await until_done(ws)
    finally:
        await ws.close()
    assert events[0]["message"]["user_id"] == "alice"
    assert events[-2]["message"]["content"] == expected_reply("alice was here", 5)

    # alice by Authorization header, on the same thread.
    ws, ready = await open_ready(pod.ws, thread, additional_headers=bearer("alice"))
    await ws.close()
    assert ready["last_event_id"] == events[-1]["id"]

    # bob holds a valid token but is no member of alice's thread.
    assert await refusal(f"{url}?token={bob}") == 1008
    assert await refusal(url, additional_headers={"Authorization": f"Bearer {bob}"}) == 1008
    assert await refusal(f"{pod.ws}/websocket?threadID={thread}&token={bob}") == 1008
    db = redis_server.client()
    assert db.smembers(f"chat:{{{thread}}}:members") == {"alice"}
    assert db.xlen(f"chat:{{{thread}}}:history") == 2

    # bob's own thread is his; lists show each user only their threads.
    ws, _ = await open_ready(pod.ws, f"{thread}_bob", f"?token={bob}")
    await ws.close()
    async with httpx.AsyncClient(base_url=pod.http, timeout=10) as http:
        assert (await http.get("/list")).status_code == 401
        mine = await http.get("/list", headers={"Authorization": f"Bearer {alice}"})
        theirs = await http.get("/list", params={"token": bob})
    assert mine.json() == [thread]
    assert theirs.json() == [f"{thread}_bob"]


def _refused(url: str, **kwargs) -> tuple[int, dict]:
    """The status and JSON body of a refused upgrade (a non-browser client's view)."""
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    headers = {
        "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": key, **kwargs.pop("headers", {}),
    }  # fmt: skip
    response = httpx.get(url.replace("ws://", "http://", 1), headers=headers, timeout=10)
    return response.status_code, response.json()


def test_a_refused_upgrade_says_why_to_the_client_the_cli_and_the_log(redis_server, pod_factory):
    pod = pod_factory(redis_server, **AUTH_ENV)
    thread = unique("why")
    url = f"{pod.ws}/v1/threads/{thread}/ws"
    expired = token("alice", exp=int(time.time()) - 3600)
    cases = {
        "bad thread id": (f"{pod.ws}/v1/threads/no%7Bgood%7D/ws", {}, "bad_request", "thread_id"),
        "no token": (url, {}, "unauthorized", "token"),
        "expired token": (f"{url}?token={expired}", {}, "unauthorized", "expired"),
        "foreign origin": (
            url, {"Origin": "https://evil.example", "Authorization": f"Bearer {token('alice')}"},
            "forbidden", "origin",
        ),
    }  # fmt: skip
    for what, (target, headers, code, word) in cases.items():
        status, body = _refused(target, headers=headers)
        assert status == 403, what
        assert body["error"]["code"] == code, (what, body)
        assert word in body["error"]["message"].lower(), (what, body)
        assert expired not in body["error"]["message"]
    # The terminal client says it in one line, exit code 1.
    cli_env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    result = subprocess.run(
        [sys.executable, "-m", "app", "chat", thread, "--url", pod.ws],
        input="hello\n", capture_output=True, text=True, timeout=30,
        env=cli_env,
    )  # fmt: skip
    assert result.returncode == 1, result
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert "HTTP 403" in result.stderr and "(unauthorized)" in result.stderr, result.stderr
    assert "--token" in result.stderr
    # `durable-chat token` mints what the pod accepts.
    minted = subprocess.run(
        [sys.executable, "-m", "app", "token", "--user", "alice", "--ttl", "60"],
        capture_output=True, text=True, timeout=30, env={**cli_env, **AUTH_ENV},
    )  # fmt: skip
    assert minted.returncode == 0 and "development token" in minted.stderr, minted
    result = subprocess.run(
        [sys.executable, "-m", "app", "chat", thread, "--url", pod.ws, "--token", minted.stdout],
        input="hello\n", capture_output=True, text=True, timeout=30, env=cli_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "(fake model) You said: “hello”" in result.stdout
    # And the pod logged each reason, never the token.
    logs = pod.logs()
    refusals = [line for line in logs.splitlines() if "socket refused before the upgrade" in line]
    assert len(refusals) >= len(cases) + 1, logs[-3000:]
    assert any("origin not allowed" in line for line in refusals)
    assert expired not in logs
