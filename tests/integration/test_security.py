"""Who may do what, on real pods and a real Redis: bad tokens of every kind,
public-key tokens, a member and a stranger on one thread, rate limits held
across two pods, the per-pod socket ceiling, Origin checks, and
configurations a pod must refuse to start with."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.integration.helpers import close_code, expect, recv_event, send, until_done
from tests.integration.tokens import (
    AUDIENCE,
    AUTH_ENV,
    ISSUER,
    SECRET,
    bearer,
    forged_hs256,
    open_socket,
    token,
)
from tests.procs import wait_until

pytestmark = pytest.mark.integration

FAST = {"CHAT_FAKE_REPLY_TOKENS": 3, "CHAT_FAKE_TOKEN_DELAY_MS": 0}


def _pem(private_key: Any) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


async def test_bad_tokens_are_refused_before_the_upgrade(redis_server, pod_factory):
    pod = pod_factory(redis_server, **AUTH_ENV)
    now = int(time.time())
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad = {
        "missing": None,
        "garbage": "not-a-jwt",
        "expired": token("alice", exp=now - 120),
        "not-yet-valid": token("alice", nbf=now + 600),
        "no-exp": token("alice", exp=None),
        "wrong-audience": token("alice", aud="another-app"),
        "no-audience": token("alice", aud=None),
        "wrong-issuer": token("alice", iss="https://evil.example.test/"),
        "wrong-secret": token("alice", key="y" * 64),
        "wrong-algorithm-hs512": token("alice", algorithm="HS512"),
        "wrong-algorithm-rs256": token("alice", key=other_rsa, algorithm="RS256"),
        "alg-none": token("alice", key=None, algorithm="none"),
        "bad-subject": token("a{b}:x"),
    }
    async with httpx.AsyncClient(base_url=pod.http) as http:
        for name, raw in bad.items():
            headers = {"Authorization": f"Bearer {raw}"} if raw else {}
            with pytest.raises(InvalidStatus) as refused:
                await websockets.connect(
                    f"{pod.ws}/v1/threads/tok1/ws", additional_headers=headers, open_timeout=10
                )
            assert refused.value.response.status_code == 403, name
            response = await http.get("/v1/threads", headers=headers)
            assert response.status_code == 401, name
            assert response.json()["error"]["code"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"
    assert set(redis_server.client().keys("*")) <= {"chat:reaper:leader"}  # nothing written

    good = token("alice")
    by_header = await open_socket(pod.ws, "tok1", "alice")
    by_subprotocol = await websockets.connect(
        f"{pod.ws}/v1/threads/tok1/ws",
        subprotocols=["durable-chat.v1", f"bearer.{good}"],  # type: ignore[list-item]
        open_timeout=10,
    )
    by_query = await websockets.connect(f"{pod.ws}/v1/threads/tok1/ws?token={good}")
    try:
        for ws in (by_header, by_subprotocol, by_query):
            await expect(ws, "ready")
        # The server answers with the protocol's name, never with the token.
        assert by_subprotocol.subprotocol == "durable-chat.v1"
        assert good not in str(by_subprotocol.response.headers)
    finally:
        for ws in (by_header, by_subprotocol, by_query):
            await ws.close()
    logs = pod.logs()
    assert "?token=[redacted]" in logs
    assert good not in logs and SECRET not in logs


async def test_public_key_and_jwks_pods(redis_server, pod_factory, tmp_path: Path):
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "rsa.pem").write_bytes(_pem(rsa_key))
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key()))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1"}]}))
    claims = {"CHAT_AUTH": "jwt", "CHAT_AUTH_ISSUER": ISSUER, "CHAT_AUTH_AUDIENCE": AUDIENCE}
    rsa_pod = pod_factory(
        redis_server, CHAT_AUTH_PUBLIC_KEY_FILE=str(tmp_path / "rsa.pem"), **claims
    )
    jwks_pod = pod_factory(
        redis_server, CHAT_AUTH_JWKS_FILE=str(tmp_path / "jwks.json"),
        CHAT_AUTH_ALGORITHMS="ES256", **claims,
    )  # fmt: skip
    accepted = [
        (rsa_pod, token("rita", key=rsa_key, algorithm="RS256")),
        (jwks_pod, token("eve", key=ec_key, algorithm="ES256", kid="k1")),
    ]
    for i, (pod, good) in enumerate(accepted):
        ws = await websockets.connect(
            f"{pod.ws}/v1/threads/pk{i}/ws", additional_headers={"Authorization": f"Bearer {good}"}
        )
        await expect(ws, "ready")
        await ws.close()
    impostor_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    impostor_ec = ec.generate_private_key(ec.SECP256R1())
    refused = [
        # Key confusion: an HMAC "signed" with the public key everyone can read.
        (rsa_pod, forged_hs256(_pem(rsa_key))),
        (rsa_pod, token("rita", key=impostor_rsa, algorithm="RS256")),
        (rsa_pod, token("rita", key=ec_key, algorithm="ES256")),
        (rsa_pod, token("rita", key=None, algorithm="none")),
        (jwks_pod, token("eve", key=impostor_ec, algorithm="ES256", kid="k1")),
        (jwks_pod, token("eve", key=ec_key, algorithm="ES256", kid="unknown")),
        (jwks_pod, token("eve", key=rsa_key, algorithm="RS256", kid="k1")),
        (jwks_pod, forged_hs256(json.dumps(jwk).encode(), kid="k1")),
    ]
    for pod, bad in refused:
        with pytest.raises(InvalidStatus) as closed:
            await websockets.connect(
                f"{pod.ws}/v1/threads/pk1/ws", additional_headers={"Authorization": f"Bearer {bad}"}
            )
        assert closed.value.response.status_code == 403


async def test_a_member_and_a_stranger_on_the_same_thread(redis_server, pod_factory):
    pod = pod_factory(redis_server, **AUTH_ENV)
    alice = await open_socket(pod.ws, "shared1", "alice")
    await expect(alice, "ready")
    await send(alice, {"type": "prompt", "content": "our secret plans"})
    await until_done(alice)

    # Bob, a stranger, reads and writes nothing, by any door.
    bob = await open_socket(pod.ws, "shared1", "bob")
    seen, code = await close_code(bob)
    assert code == 1008 and not any(e["type"] in ("ready", "message") for e in seen)
    seed_headers = bearer("bob")
    seed = await websockets.connect(
        f"{pod.ws}/websocket?threadID=shared1", additional_headers=seed_headers
    )
    with pytest.raises(ConnectionClosed) as seed_closed:
        await asyncio.wait_for(seed.recv(), 10)
    assert seed_closed.value.rcvd is not None and seed_closed.value.rcvd.code == 1008
    async with httpx.AsyncClient(base_url=pod.http, headers=bearer("bob")) as http:
        attempts = [
            await http.get("/v1/threads/shared1"),
            await http.patch("/v1/threads/shared1", json={"title": "mine"}),
            await http.delete("/v1/threads/shared1"),
            await http.put("/v1/threads/shared1/members/bob"),
            await http.delete("/v1/threads/shared1/members/alice"),
        ]
        assert [r.status_code for r in attempts] == [403] * 5
        assert {r.json()["error"]["code"] for r in attempts} == {"forbidden"}
        assert (await http.get("/v1/threads")).json()["threads"] == []
        assert (await http.get("/list")).json() == []
        assert (await http.get("/v1/threads/nothing-here")).status_code == 404

    # Alice adds Bob: he reads the history and writes.
    async with httpx.AsyncClient(base_url=pod.http, headers=bearer("alice")) as http:
        assert (await http.put("/v1/threads/shared1/members/bob")).status_code == 204
    bob = await open_socket(pod.ws, "shared1", "bob")
    await expect(bob, "ready")
    await send(bob, {"type": "get_history"})
    history = await recv_event(bob)
    assert history["messages"][0]["content"] == "our secret plans"
    await send(bob, {"type": "prompt", "content": "count me in"})
    _, seen_by_alice = await asyncio.gather(until_done(bob), until_done(alice))
    assert seen_by_alice[0]["message"]["user_id"] == "bob"
    async with httpx.AsyncClient(base_url=pod.http, headers=bearer("bob")) as http:
        mine = (await http.get("/v1/threads")).json()["threads"]
        assert [(t["id"], t["role"]) for t in mine] == [("shared1", "member")]

    # Alice removes Bob: his open socket closes (1008) and he cannot come back.
    async with httpx.AsyncClient(base_url=pod.http, headers=bearer("alice")) as http:
        assert (await http.delete("/v1/threads/shared1/members/bob")).status_code == 204
    _, code = await close_code(bob)
    assert code == 1008
    again = await open_socket(pod.ws, "shared1", "bob")
    assert (await close_code(again))[1] == 1008
    await send(alice, {"type": "ping"})
    assert (await recv_event(alice))["type"] == "pong"  # Alice's socket is untouched
    await alice.close()


async def test_rate_limits_hold_across_two_pods(redis_server, pod_factory):
    env = {
        **AUTH_ENV, **FAST,
        "CHAT_RATE_PROMPTS_PER_MIN": 6, "CHAT_RATE_PROMPT_BURST": 2,
        "CHAT_MAX_SOCKETS_PER_USER": 3, "CHAT_MAX_THREADS_PER_USER": 3,
    }  # fmt: skip
    pod_a = pod_factory(redis_server, **env)
    pod_b = pod_factory(redis_server, **env)
    on_a = await open_socket(pod_a.ws, "rl1", "carol")
    on_b = await open_socket(pod_b.ws, "rl2", "carol")
    await expect(on_a, "ready")
    await expect(on_b, "ready")
    try:
        # Prompts: a burst of two, wherever they land; the third waits.
        for ws, text in ((on_a, "one"), (on_b, "two")):
            await send(ws, {"type": "prompt", "content": text})
            assert (await until_done(ws))[-1]["status"] == "complete"
        await send(on_a, {"type": "prompt", "content": "three"})
        refused = await recv_event(on_a)
        assert (refused["type"], refused["code"], refused["retryable"]) == (
            "error", "rate_limited", True,
        )  # fmt: skip
        assert 0 < refused["retry_after_ms"] <= 10000  # 6 a minute: one per 10 s
        # Threads: carol owns rl1 and rl2; a third is allowed, a fourth is not.
        async with httpx.AsyncClient(base_url=pod_b.http, headers=bearer("carol")) as http:
            assert (await http.post("/v1/threads", json={"id": "rl3"})).status_code == 201
            over = await http.post("/v1/threads", json={"id": "rl4"})
            assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limited"
        fourth = await open_socket(pod_a.ws, "rl4", "carol")
        seen, code = await close_code(fourth)
        assert code == 1008 and seen[0]["code"] == "rate_limited"
        # Sockets: two open, a third fits, a fourth (on either pod) does not.
        third = await open_socket(pod_b.ws, "rl1", "carol")
        await expect(third, "ready")
        extra = await open_socket(pod_a.ws, "rl2", "carol")
        seen, code = await close_code(extra)
        assert code == 1013
        assert seen[0]["code"] == "rate_limited" and seen[0]["retry_after_ms"] >= 1000
        # Other users are not affected; a closed socket frees its place.
        dave = await open_socket(pod_a.ws, "dave1", "dave")
        await expect(dave, "ready")
        await dave.close()
        await third.close()
        # The place is freed once pod B has handled the close, which the
        # client's close does not wait for: wait on carol's count itself.
        sockets, deadline = redis_server.client(), time.monotonic() + 10
        while sockets.zcard("chat:user:{carol}:sockets") > 2:
            assert time.monotonic() < deadline, "the closed socket's place was not freed"
            await asyncio.sleep(0.01)
        retry = await open_socket(pod_a.ws, "rl2", "carol")
        await expect(retry, "ready")
        await retry.close()
    finally:
        await on_a.close()
        await on_b.close()


async def test_a_full_pod_refuses_sockets_with_1013(redis_server, pod_factory):
    pod = pod_factory(redis_server, CHAT_MAX_SOCKETS_PER_POD=2)
    held = [await open_socket(pod.ws, f"full{i}", None) for i in range(2)]
    for ws in held:
        await expect(ws, "ready")
    overflow = await open_socket(pod.ws, "full2", None)
    seen, code = await close_code(overflow)
    assert code == 1013 and seen[0]["code"] == "rate_limited" and seen[0]["retry_after_ms"]
    await held[0].close()

    async def admitted() -> bool:
        ws = await open_socket(pod.ws, "full2", None)
        try:
            return (await recv_event(ws))["type"] == "ready"
        except ConnectionClosed:
            return False
        finally:
            await ws.close()

    deadline = time.monotonic() + 10
    while not await admitted():
        assert time.monotonic() < deadline, "the closed socket never freed its place"
        await asyncio.sleep(0.05)
    await held[1].close()


async def test_cross_site_sockets_are_refused(redis_server, pod_factory):
    pod = pod_factory(redis_server)  # the default, local config
    own_origin = f"http://127.0.0.1:{pod.port}"
    for origin in (own_origin, None):  # the demo page itself, and non-browser clients
        ws = await websockets.connect(f"{pod.ws}/v1/threads/orig1/ws", origin=origin)  # type: ignore[arg-type]
        await expect(ws, "ready")
        await ws.close()
    for evil in ("https://evil.example", "http://127.0.0.1:1", "null"):
        for path in ("/v1/threads/orig1/ws", "/websocket?threadID=orig1"):
            with pytest.raises(InvalidStatus) as refused:
                await websockets.connect(f"{pod.ws}{path}", origin=evil)  # type: ignore[arg-type]
            assert refused.value.response.status_code == 403, (evil, path)

    listed = pod_factory(redis_server, CHAT_ALLOWED_ORIGINS="https://app.example.test")
    ws = await websockets.connect(
        f"{listed.ws}/v1/threads/orig1/ws",
        origin="https://app.example.test",  # type: ignore[arg-type]
    )
    await expect(ws, "ready")
    await ws.close()
    with pytest.raises(InvalidStatus):
        await websockets.connect(f"{listed.ws}/v1/threads/orig1/ws", origin="https://evil.example")  # type: ignore[arg-type]
    async with httpx.AsyncClient(base_url=listed.http) as http:
        preflight = {"Access-Control-Request-Method": "POST"}
        allowed = await http.options(
            "/v1/threads", headers={"Origin": "https://app.example.test", **preflight}
        )
        assert allowed.headers["access-control-allow-origin"] == "https://app.example.test"
        denied = await http.options(
            "/v1/threads", headers={"Origin": "https://evil.example", **preflight}
        )
        assert "access-control-allow-origin" not in denied.headers


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CHAT_AUTH_ALGORITHMS": "none"}, "'none' is never accepted"),
        ({"CHAT_AUTH_ALGORITHMS": "HS256,RS256"}, "key confusion"),
        ({"CHAT_AUTH_SECRET": "too-short"}, "at least 32"),
        ({"CHAT_ALLOWED_ORIGINS": "evil.example"}, "CHAT_ALLOWED_ORIGINS"),
        ({"CHAT_AUTH_SECRET": "", "CHAT_AUTH_SECRET_FILE": "/no/such/file"}, "cannot read"),
    ],
    ids=["alg-none", "mixed-algorithms", "short-secret", "bad-origin", "missing-secret-file"],
)
def test_unsafe_configs_refuse_to_start_and_print_no_secret(redis_server, env, message):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_", "ANTHROPIC_"))}
    base.update(REDIS_URL=redis_server.url, CHAT_AUTH_SECRET=SECRET, CHAT_LLM="fake")
    base.update(env)
    if not base["CHAT_AUTH_SECRET"]:
        del base["CHAT_AUTH_SECRET"]
    result = subprocess.run(
        [sys.executable, "-m", "app", "serve", "--port", "0"],
        env=base, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert SECRET not in result.stderr + result.stdout


def test_secret_files_work(redis_server, pod_factory, tmp_path: Path):
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    env = {**AUTH_ENV, "CHAT_AUTH_SECRET_FILE": str(path)}
    del env["CHAT_AUTH_SECRET"]
    pod = pod_factory(redis_server, **env)
    response = httpx.get(f"{pod.http}/v1/threads", headers=bearer("alice"), timeout=5)
    assert response.status_code == 200
    wait_until(lambda: "auth=jwt HS256" in pod.logs(), 5, what="the start-up line")
    assert SECRET not in pod.logs()
