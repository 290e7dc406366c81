"""AnthropicModel against the real SDK, offline.

The SDK talks to an ``httpx2.MockTransport`` whose handler serves what the
Messages API serves: a ``text/event-stream`` body of real streaming events, or
an error response. Nothing leaves the process.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx2
import pytest

from app.chat.records import Role
from app.llm.anthropic import AnthropicModel, to_anthropic_messages
from app.llm.base import LLMError, ToolCall, ToolSpec, Usage
from app.settings import Settings
from tests.llm_support import (
    HELLO,
    Handler,
    assert_key_hidden,
    collect,
    dropped_after,
    event_stream,
    msg,
)

API_KEY = "sk-test-4f9c2a7e1b8d-do-not-leak"
MODEL = "claude-test-model"
SYSTEM = "You are a terse test assistant."
MAX_TOKENS = 321
TIMEOUT_S = 7.5

FALLBACK = "claude-test-fallback"
PIECES = ["Hello", ",", " durable", " world", "!"]
INPUT_TOKENS = 31  # not from the cache
CACHE_READ = 900
CACHE_WRITE = 120
OUTPUT_TOKENS = 17  # message_delta's count; message_start says 1


# --- a real Messages API stream -----------------------------------------------


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


MESSAGE_START = sse(
    "message_start",
    {
        "type": "message_start",
        "message": {
            "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": MODEL,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": INPUT_TOKENS,
                "cache_creation_input_tokens": CACHE_WRITE,
                "cache_read_input_tokens": CACHE_READ,
                "output_tokens": 1,
            },
        },
    },
)
BLOCK_START = sse(
    "content_block_start",
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
)
PING = sse("ping", {"type": "ping"})
BLOCK_STOP = sse("content_block_stop", {"type": "content_block_stop", "index": 0})
MESSAGE_DELTA = sse(
    "message_delta",
    {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": OUTPUT_TOKENS},
    },
)
MESSAGE_STOP = sse("message_stop", {"type": "message_stop"})


def text_delta(text: str) -> bytes:
    return sse(
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
    )


def error_event(error_type: str, message: str) -> bytes:
    return sse("error", {"type": "error", "error": {"type": error_type, "message": message}})


def opening() -> bytes:
    """Everything before the first text delta."""
    return MESSAGE_START + BLOCK_START + PING


def full_body(pieces: Sequence[str] = PIECES) -> bytes:
    deltas = b"".join(text_delta(p) for p in pieces)
    return opening() + deltas + BLOCK_STOP + MESSAGE_DELTA + MESSAGE_STOP


def api_error(status: int, error_type: str, message: str) -> httpx2.Response:
    body = {"type": "error", "error": {"type": error_type, "message": message}}
    return httpx2.Response(status, json=body, headers={"request-id": "req_test"})


# --- fixtures and helpers -----------------------------------------------------


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "REDIS_URL",
        "CHAT_LLM",
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_AUTH_TOKEN",
        "ANTHROPIC_BASE_URL",
        "ANTHROPIC_PROFILE",
        "ANTHROPIC_CONFIG_DIR",
    ):
        monkeypatch.delenv(name, raising=False)


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "anthropic_api_key": API_KEY,
        "chat_llm": "anthropic",
        "chat_model": MODEL,
        "chat_system_prompt": SYSTEM,
        "chat_max_tokens": MAX_TOKENS,
        "chat_llm_timeout_s": TIMEOUT_S,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings() -> Settings:
    return make_settings()


MakeModel = Callable[..., AnthropicModel]


@pytest.fixture
async def make_model() -> AsyncIterator[MakeModel]:
    """Builds models served by a handler; closes them after the test."""
    made: list[AnthropicModel] = []

    def make(handler: Handler, max_retries: int = 0, **overrides: Any) -> AnthropicModel:
        client = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
        model = AnthropicModel(
            make_settings(**overrides), http_client=client, max_retries=max_retries
        )
        made.append(model)
        return model

    yield make
    for model in made:
        await model.aclose()


# --- a successful reply ---------------------------------------------------------


async def test_streams_pieces_in_order_and_fills_usage(make_model: MakeModel) -> None:
    model = make_model(lambda request: event_stream(full_body()))

    pieces, usage, err = await collect(model)

    assert err is None
    assert pieces == PIECES
    assert "".join(str(p) for p in pieces) == "Hello, durable world!"
    # input_tokens counts every token read, from the cache or not.
    assert usage.wire() == {
        "input_tokens": INPUT_TOKENS + CACHE_READ + CACHE_WRITE,
        "output_tokens": OUTPUT_TOKENS,
        "cache_read_tokens": CACHE_READ,
        "cache_write_tokens": CACHE_WRITE,
    }
    assert usage.model == MODEL


async def test_name_is_the_configured_model(make_model: MakeModel) -> None:
    assert make_model(lambda request: event_stream(full_body())).name == MODEL


async def test_builds_its_own_client_without_one(settings: Settings) -> None:
    model = AnthropicModel(settings)  # how app.llm.make_model builds it; no request is sent
    assert model.name == MODEL
    await model.aclose()


async def test_request_carries_settings_and_converted_history(make_model: MakeModel) -> None:
    seen: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return event_stream(full_body())

    history = [
        msg("assistant", "Welcome! Ask me anything.", 0),  # leading assistant: dropped
        msg("user", "first", 1),
        msg("user", "second", 2),  # same role: merged
        msg("assistant", "", 3),  # empty: dropped
        msg("assistant", "reply one", 4),
        msg("assistant", "reply two", 5),  # merged
        msg("user", "   ", 6),  # blank: dropped
        msg("user", "third", 7),
    ]
    _, _, err = await collect(make_model(handler), history)

    assert err is None
    assert len(seen) == 1
    request = seen[0]
    assert request.method == "POST"
    assert request.url.path == "/v1/messages"
    body = json.loads(request.content)
    assert body["model"] == MODEL
    assert body["max_tokens"] == MAX_TOKENS
    # Prompt caching: breakpoints on the system prompt and the last block.
    assert body["system"] == [
        {"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}
    ]
    assert body["stream"] is True
    assert body["messages"] == [
        {"role": "user", "content": "first\n\nsecond"},
        {"role": "assistant", "content": "reply one\n\nreply two"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "third", "cache_control": {"type": "ephemeral"}}],
        },
    ]
    assert "tools" not in body
    # The SDK 2.x sends the key as a bearer token; older ones used x-api-key.
    assert request.headers.get("x-api-key") == API_KEY or (
        request.headers.get("authorization") == f"Bearer {API_KEY}"
    )
    # CHAT_LLM_TIMEOUT_S reaches the client (the SDK reports its read timeout).
    assert request.headers.get("x-stainless-read-timeout") == str(TIMEOUT_S)


@pytest.mark.parametrize(
    ("history", "expected"),
    [
        ([("user", "a")], [("user", "a")]),
        ([("assistant", "hello"), ("user", "a")], [("user", "a")]),
        ([("assistant", "x"), ("assistant", "y")], []),
        ([("user", "a"), ("assistant", ""), ("user", "b")], [("user", "a\n\nb")]),
        (
            [("user", "a"), ("assistant", "b"), ("assistant", "c"), ("user", "d")],
            [("user", "a"), ("assistant", "b\n\nc"), ("user", "d")],
        ),
        ([("user", ""), ("assistant", "b"), ("user", "c")], [("user", "c")]),
    ],
)
def test_history_conversion(
    history: list[tuple[Role, str]], expected: list[tuple[Role, str]]
) -> None:
    converted = to_anthropic_messages([msg(r, c, i) for i, (r, c) in enumerate(history)])
    assert converted == [{"role": r, "content": c} for r, c in expected]


async def test_no_user_message_fails_without_a_request(make_model: MakeModel) -> None:
    seen: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return event_stream(full_body())

    _, _, err = await collect(make_model(handler), [msg("assistant", "Welcome!")])

    assert err is not None and err.retryable is False
    assert seen == []


async def test_max_retries_reaches_the_client(make_model: MakeModel) -> None:
    calls = 0

    def handler(request: httpx2.Request) -> httpx2.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            response = api_error(529, "overloaded_error", "Overloaded")
            response.headers["retry-after-ms"] = "1"
            return response
        return event_stream(full_body())

    pieces, _, err = await collect(make_model(handler, max_retries=1))

    assert err is None and pieces == PIECES
    assert calls == 2


# --- errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type", "retryable"),
    [
        (429, "rate_limit_error", True),
        (529, "overloaded_error", True),
        (500, "api_error", True),
        (503, "api_error", True),
        (400, "invalid_request_error", False),
        (401, "authentication_error", False),
        (403, "permission_error", False),
        (404, "not_found_error", False),
    ],
)
async def test_http_errors_become_llm_errors(
    make_model: MakeModel, status: int, error_type: str, retryable: bool
) -> None:
    model = make_model(lambda request: api_error(status, error_type, f"{error_type} happened"))

    pieces, usage, err = await collect(model)

    assert isinstance(err, LLMError)
    assert err.retryable is retryable
    assert err.message and len(err.message) <= 300
    assert pieces == [] and usage.total == 0
    assert_key_hidden(err, API_KEY)


@pytest.mark.parametrize(
    ("error_type", "retryable"),
    [("overloaded_error", True), ("api_error", True), ("invalid_request_error", False)],
)
async def test_error_event_mid_stream(
    make_model: MakeModel, error_type: str, retryable: bool
) -> None:
    body = opening() + text_delta("Hel") + text_delta("lo") + error_event(error_type, "boom")
    model = make_model(lambda request: event_stream(body + BLOCK_STOP + MESSAGE_DELTA))

    pieces, _, err = await collect(model)

    assert pieces == ["Hel", "lo"]
    assert isinstance(err, LLMError)
    assert err.retryable is retryable
    assert_key_hidden(err, API_KEY)


@pytest.mark.parametrize(
    "exc",
    [
        httpx2.RemoteProtocolError("peer closed connection without sending complete message body"),
        httpx2.ReadTimeout("timed out"),
        httpx2.ReadError("connection reset by peer"),
    ],
    ids=["remote-protocol", "read-timeout", "read-error"],
)
async def test_connection_dropped_mid_stream(make_model: MakeModel, exc: Exception) -> None:
    model = make_model(dropped_after(opening() + text_delta("Hel") + text_delta("lo"), exc))

    pieces, usage, err = await collect(model)

    assert pieces == ["Hel", "lo"]
    assert isinstance(err, LLMError)
    assert err.retryable is True
    # What the model read is counted even though the reply was lost.
    assert usage.input_tokens == INPUT_TOKENS + CACHE_READ + CACHE_WRITE
    assert_key_hidden(err, API_KEY)


@pytest.mark.parametrize(
    "body",
    [
        opening() + text_delta("Hel") + text_delta("lo"),  # no message_stop
        opening()
        + text_delta("Hel")
        + text_delta("lo")
        + b'event: content_block_delta\ndata: {"ty',
        b"",  # a 200 with nothing in it
    ],
    ids=["ends-after-deltas", "ends-mid-event", "empty"],
)
async def test_body_that_ends_early(make_model: MakeModel, body: bytes) -> None:
    model = make_model(lambda request: event_stream(body))

    pieces, _, err = await collect(model)

    assert isinstance(err, LLMError)
    assert err.retryable is True
    assert pieces == (["Hel", "lo"] if body else [])


async def test_unreadable_event_becomes_llm_error(make_model: MakeModel) -> None:
    body = opening() + text_delta("Hel") + b"event: content_block_delta\ndata: {not json\n\n"
    model = make_model(lambda request: event_stream(body + MESSAGE_STOP))

    pieces, _, err = await collect(model)

    assert pieces == ["Hel"]
    assert isinstance(err, LLMError)


@pytest.mark.parametrize(
    "exc",
    [httpx2.ConnectError("connection refused"), httpx2.ConnectTimeout("connect timed out")],
    ids=["connect-error", "connect-timeout"],
)
async def test_service_unreachable(make_model: MakeModel, exc: Exception) -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        raise exc

    pieces, _, err = await collect(make_model(handler))

    assert pieces == []
    assert isinstance(err, LLMError)
    assert err.retryable is True
    assert_key_hidden(err, API_KEY)


async def test_api_key_echoed_by_the_service_is_redacted(make_model: MakeModel) -> None:
    model = make_model(
        lambda request: api_error(400, "invalid_request_error", f"bad header value {API_KEY}")
    )

    _, _, err = await collect(model)

    assert isinstance(err, LLMError)
    assert err.retryable is False
    assert "bad header value" in err.message  # the service's explanation is kept...
    assert_key_hidden(err, API_KEY)  # ...but never the key


async def test_cancellation_is_not_swallowed(make_model: MakeModel) -> None:
    first_piece = asyncio.Event()
    never = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield opening() + text_delta("Hel")
        await never.wait()
        yield full_body()

    model = make_model(lambda request: event_stream(body()))
    pieces: list[str | ToolCall] = []

    async def consume() -> None:
        async for piece in model.stream(HELLO, Usage()):
            pieces.append(piece)
            first_piece.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_piece.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pieces == ["Hel"]


async def test_aclose_closes_the_http_client(settings: Settings) -> None:
    client = httpx2.AsyncClient(transport=httpx2.MockTransport(lambda r: event_stream(b"")))
    model = AnthropicModel(settings, http_client=client, max_retries=0)

    await model.aclose()

    assert client.is_closed


# --- fallback and tools ---------------------------------------------------------


async def test_overloaded_primary_falls_back(make_model: MakeModel) -> None:
    asked: list[str] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        model = json.loads(request.content)["model"]
        asked.append(model)
        if model == MODEL:
            return api_error(529, "overloaded_error", "Overloaded")
        return event_stream(full_body())

    pieces, usage, err = await collect(make_model(handler, chat_fallback_model=FALLBACK))

    assert err is None and pieces == PIECES
    assert asked == [MODEL, FALLBACK]
    assert usage.model == FALLBACK


async def test_other_errors_do_not_fall_back(make_model: MakeModel) -> None:
    asked: list[str] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        asked.append(json.loads(request.content)["model"])
        return api_error(500, "api_error", "boom")

    _, _, err = await collect(make_model(handler, chat_fallback_model=FALLBACK))

    assert isinstance(err, LLMError) and err.retryable is True
    assert asked == [MODEL]


def tool_use(index: int, call_id: str, name: str, parts: Sequence[str]) -> bytes:
    start = sse(
        "content_block_start",
        {
            "type": "content_block_start",
            "index": index,
            "content_block": {"type": "tool_use", "id": call_id, "name": name, "input": {}},
        },
    )
    deltas = b"".join(
        sse(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "input_json_delta", "partial_json": part},
            },
        )
        for part in parts
    )
    return (
        start + deltas + sse("content_block_stop", {"type": "content_block_stop", "index": index})
    )


async def test_tool_use_blocks_become_tool_calls(make_model: MakeModel) -> None:
    seen: list[httpx2.Request] = []
    body = (
        opening()
        + text_delta("Checking.")
        + BLOCK_STOP
        + tool_use(1, "toolu_01A", "clock", ['{"tz":', ' "UTC"}'])
        + tool_use(2, "toolu_01B", "clock", [])
        + MESSAGE_DELTA
        + MESSAGE_STOP
    )

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return event_stream(body)

    clock = ToolSpec("clock", "The time.", {"type": "object"})
    pieces, _, err = await collect(make_model(handler), tools=[clock])

    assert err is None
    assert pieces == [
        "Checking.",
        ToolCall("toolu_01A", "clock", '{"tz": "UTC"}'),
        ToolCall("toolu_01B", "clock", "{}"),
    ]
    assert json.loads(seen[0].content)["tools"] == [
        {"name": "clock", "description": "The time.", "input_schema": {"type": "object"}}
    ]
