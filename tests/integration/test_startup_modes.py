"""How a pod starts: the embedded default serves a whole turn on its own, and
a pod on a real Redis without an auth secret refuses to start."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx

from app.llm.fake import expected_reply
from tests import procs
from tests.integration.conftest import require_redis
from tests.integration.helpers import open_ready, turn, unique
from tests.procs import RedisServer, wait_until


async def test_embedded_default_serves_a_full_turn(pod_factory):
    pod = pod_factory(None, CHAT_FAKE_REPLY_TOKENS=6, CHAT_FAKE_TOKEN_DELAY_MS=1)
    assert "REDIS_URL" not in pod.env
    thread = unique("embedded")
    prompt = "no redis server needed"
    ws, ready = await open_ready(pod.ws, thread)
    try:
        events = await turn(ws, prompt)
        assert [e["type"] for e in events][:2] == ["message", "loading"]
        assert events[-2]["message"]["content"] == expected_reply(prompt, 6)
        assert events[-1]["status"] == "complete"
    finally:
        await ws.close()
    # A second socket sees the same thread: the embedded store lives in the pod.
    ws, again = await open_ready(pod.ws, thread)
    await ws.close()
    assert again["epoch"] == ready["epoch"] and again["last_event_id"] == events[-1]["id"]
    assert "EMBEDDED" in pod.logs()


def _serve(
    env_overrides: dict[str, str], port: int = 0
) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("CHAT_", "REDIS_", "ANTHROPIC_"))
    }
    env.update(env_overrides)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return result, time.monotonic() - started


def test_real_redis_without_an_auth_secret_refuses_to_start(redis_server):
    result, took = _serve({"REDIS_URL": redis_server.url, "CHAT_LLM": "fake"})
    assert result.returncode != 0, result
    assert "CHAT_AUTH_SECRET" in result.stderr, result.stderr
    assert took < 20
    # It never served: nothing was written to the Redis it was pointed at.
    assert redis_server.client().keys("*") == []


def test_a_too_short_auth_secret_refuses_to_start(redis_server):
    secret = "s3cret"
    result, _ = _serve(
        {"REDIS_URL": redis_server.url, "CHAT_AUTH": "jwt", "CHAT_AUTH_SECRET": secret}
    )
    assert result.returncode != 0, result
    assert "secret" in result.stderr and "32" in result.stderr, result.stderr
    assert secret not in result.stdout + result.stderr  # secrets are never printed


def test_a_pod_whose_port_is_taken_exits_non_zero_at_once():
    # It used to start, fail to bind, then hang in its drain for ever: no
    # signal but SIGKILL ended it.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result, took = _serve({"CHAT_LLM": "fake", "CHAT_AUTH": "off"}, port)
    assert result.returncode == 1, result
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert took < 10


def test_a_pod_says_it_waits_for_redis_until_redis_answers(tmp_path):
    # It used to log "ready" at once, with Redis nowhere.
    require_redis()
    redis_server = RedisServer(tmp_path / "redis")  # its port, nothing listening yet
    pod = procs.pod("patient", redis_server.url, tmp_path / "pod.log")
    with open(pod.log_path, "ab") as log:
        proc = subprocess.Popen(pod.argv, env=pod.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "waiting for Redis" in pod.logs(), 20, what="the pod to wait")
        assert " ready: " not in pod.logs()
        assert httpx.get(pod.http + "/readyz", timeout=5).status_code == 503
        redis_server.start()
        wait_until(lambda: " ready: redis=" in pod.logs(), 20, what="the pod to say ready")
        wait_until(lambda: httpx.get(pod.http + "/readyz", timeout=5).status_code == 200, 20)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        redis_server.stop()
