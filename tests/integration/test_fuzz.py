"""Property-based fuzzing (hypothesis) of one live pod: random and malformed
frames, connection URLs and REST bodies. Every frame must be answered with
protocol events only (an ``error`` with a client-side code at worst, never
``internal``), the socket must live on, the pod must then serve a normal
turn, and Redis must hold no key outside the documented layout."""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.integration.helpers import undocumented

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MAX_FRAME_BYTES = 16384
EVENT_TYPES = {
    "ready", "message", "loading", "delta", "done", "history", "error", "pong",
    "tool_call", "tool_result", "branch",
}  # fmt: skip
# What a client may be told about a frame it sent; never "internal" or "unavailable".
CLIENT_ERRORS = {
    "bad_request", "too_large", "thread_busy", "rate_limited", "forbidden",
    "not_found", "resume_gap", "llm_error", "budget_exceeded",
}  # fmt: skip
FIELDS = ["type", "content", "client_msg_id", "before", "limit", "generation_id", "after", "epoch"]
TYPES = ["prompt", "get_history", "cancel", "resume", "ping"]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=80),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
ids = st.one_of(
    st.from_regex(r"\d{1,20}-\d{1,20}", fullmatch=True),
    st.text(max_size=70),
    st.sampled_from(["0-0", "-", "+", "(1-0", "99999999999999999999-0", "{x}", "a:b", ""]),
)


@st.composite
def typed_frames(draw: st.DrawFn) -> str:
    """A frame that looks like the protocol: a known (or near) type, real field
    names, values of any type (ids and numbers often almost right). Always
    under the transport limit (over it, the socket closes 1009: tested apart)."""
    frame: dict[str, Any] = {"type": draw(st.sampled_from(TYPES) | st.text(max_size=12))}
    for name in draw(st.lists(st.sampled_from(FIELDS[1:]) | st.text(max_size=6), max_size=4)):
        frame[name] = draw(
            ids | json_values | st.integers(min_value=-5, max_value=500) | st.text(max_size=200)
        )
    return json.dumps(frame)


# Frames the protocol accepts, with hostile values where values are free.
valid_frames = st.one_of(
    st.builds(
        lambda content, msg_id: json.dumps(
            {"type": "prompt", "content": content, **({"client_msg_id": msg_id} if msg_id else {})}
        ),
        st.text(min_size=1, max_size=300),
        st.none() | st.from_regex(r"[\x21-\x7e]{1,64}", fullmatch=True),
    ),
    st.builds(
        lambda before, limit: json.dumps({"type": "get_history", "before": before, "limit": limit}),
        st.from_regex(r"\d{1,20}-\d{1,20}", fullmatch=True),
        st.integers(min_value=1, max_value=200),
    ),
    st.builds(
        lambda after, epoch: json.dumps({"type": "resume", "after": after, "epoch": epoch}),
        st.from_regex(r"\d{1,20}-\d{1,20}", fullmatch=True),
        st.text(max_size=64),
    ),
    st.builds(
        lambda gen: json.dumps({"type": "cancel", "generation_id": gen}),
        st.from_regex(r"[\x21-\x7e]{1,64}", fullmatch=True),
    ),
    # Prompts that make the fake model call a tool: the clock, unknown
    # tools, arguments of any shape (malformed JSON, wrong types, nesting).
    st.builds(
        lambda name, arguments: json.dumps(
            {"type": "prompt", "content": f"/tool {name} {arguments}".strip()}
        ),
        st.sampled_from(["clock", "nope", "CLOCK"]) | st.text(max_size=12),
        st.builds(json.dumps, json_values) | st.text(max_size=60) | st.just('{"timezone":'),
    ),
)

frames = st.one_of(
    valid_frames,
    typed_frames(),
    st.builds(json.dumps, json_values),
    st.text(max_size=200),
    st.binary(max_size=200),
    st.integers(min_value=1, max_value=3000).map(lambda n: "[" * n + "]" * n),
    st.integers(min_value=1, max_value=200).map(
        lambda n: '{"type":"ping","x":' + "[" * n + "]" * n + "}"
    ),
    st.integers(min_value=MAX_FRAME_BYTES - 200, max_value=MAX_FRAME_BYTES - 40).map(
        lambda n: json.dumps({"type": "prompt", "content": "x" * n})
    ),
    st.sampled_from(
        [
            '{"type":"prompt","content":"\\ud800"}',
            '{"type":"prompt","content":"a\\u0000b"}',
            '{"type":"get_history","limit":1e400}',
            '{"type":"get_history","limit":NaN}',
            '{"type":"ping","type":"prompt"}',
            '{"type":"resume","after":"1-1","epoch":null}',
            "\x00",
            "",
        ]
    ),
)  # fmt: skip


def quick(examples: int) -> settings:
    """Bounded runs against a live process: no deadline per example (the
    network decides), no example database written into the tree."""
    return settings(
        max_examples=examples, deadline=None, database=None,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip


def _events_until_pong(ws: Any) -> list[dict[str, Any]]:
    """Send a ping and read everything up to its pong: the socket is alive and
    answered whatever was sent before it (the server answers in order)."""
    ws.send('{"type":"ping"}')
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    while True:
        event = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        if event.get("type") in ("presence", "typing"):
            continue
        seen.append(event)
        if event.get("type") == "pong":
            return seen


def test_fuzzed_traffic_never_breaks_a_pod(redis_server, pod_factory):
    pod = pod_factory(
        redis_server, CHAT_FAKE_REPLY_TOKENS=3, CHAT_FAKE_TOKEN_DELAY_MS=0,
        CHAT_MAX_PROMPT_CHARS=500, CHAT_MAX_FRAME_BYTES=MAX_FRAME_BYTES,
    )  # fmt: skip

    with connect(f"{pod.ws}/v1/threads/fuzz1/ws", max_size=None, open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "ready"

        @quick(200)
        @given(frame=frames)
        def frames_are_answered_within_the_protocol(frame: str | bytes) -> None:
            ws.send(frame)
            for event in _events_until_pong(ws):
                assert event.get("type") in EVENT_TYPES, event
                if event["type"] == "error":
                    assert event["code"] in CLIENT_ERRORS, (frame[:200], event)

        frames_are_answered_within_the_protocol()
        # A frame over the transport limit closes the socket (1009), nothing worse.
        ws.send("x" * (MAX_FRAME_BYTES + 1))
        with pytest.raises(ConnectionClosed) as too_big:
            while True:
                ws.recv(timeout=10)
        assert too_big.value.rcvd is not None and too_big.value.rcvd.code == 1009

    @quick(40)
    @given(thread=st.text(min_size=1, max_size=80), after=ids, epoch=st.text(max_size=80))
    def connection_urls_are_accepted_or_refused_cleanly(
        thread: str, after: str, epoch: str
    ) -> None:
        query = urlencode({"after": after, "epoch": epoch})
        url = f"{pod.ws}/v1/threads/{quote(thread, safe='')}/ws?{query}"
        try:
            with connect(url, open_timeout=10) as probe:
                first = json.loads(probe.recv(timeout=10))
                assert first["type"] == "ready", first
        except InvalidStatus as exc:
            assert exc.response.status_code in (403, 404), exc.response.status_code
        except ConnectionClosed as exc:  # refused after the upgrade: a policy close
            assert exc.rcvd is not None and exc.rcvd.code == 1008, exc

    connection_urls_are_accepted_or_refused_cleanly()

    with httpx.Client(base_url=pod.http, timeout=10) as http:

        @quick(40)
        @given(body=json_values | typed_frames(), thread=st.text(min_size=1, max_size=70))
        def rest_bodies_never_crash(body: Any, thread: str) -> None:
            content = body if isinstance(body, str) else json.dumps(body)
            headers = {"content-type": "application/json"}
            for method, path in (
                ("POST", "/v1/threads"),
                ("PATCH", f"/v1/threads/{quote(thread)}"),
            ):
                response = http.request(method, path, content=content, headers=headers)
                assert response.status_code < 500, (method, path, content[:200], response.text)

        rest_bodies_never_crash()

    # The pod still serves a normal turn from start to finish.
    with connect(f"{pod.ws}/v1/threads/after-fuzz/ws", open_timeout=10) as normal:
        assert json.loads(normal.recv(timeout=10))["type"] == "ready"
        normal.send(json.dumps({"type": "prompt", "content": "are you still there?"}))
        kinds: list[str] = []
        while not kinds or kinds[-1] != "done":
            kinds.append(json.loads(normal.recv(timeout=10))["type"])
            if kinds[-1] == "presence":
                kinds.pop()
    assert kinds[:2] == ["message", "loading"] and kinds[-2:] == ["message", "done"]
    assert "Traceback" not in pod.logs()
    found = set(redis_server.client().keys("*"))
    assert not undocumented(found), undocumented(found)
