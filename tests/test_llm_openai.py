"""OpenAIModel against the real ``openai`` SDK, offline.

The SDK talks to an ``httpx2.MockTransport`` whose handler serves what an
OpenAI-compatible server serves for ``stream: true``: ``data:`` lines of
``chat.completion.chunk`` objects ending in ``data: [DONE]``, or an error
response. Nothing leaves the process.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx2
import pytest

from app.llm.base import LLMError, ToolCall, ToolSpec, Usage
from app.llm.openai import OpenAIModel
from app.settings import ConfigError, Settings
from tests.llm_support import (
    HELLO,
    Handler,
    assert_key_hidden,
    collect,
    dropped_after,
    event_stream,
    msg,
)

API_KEY = "sk-test-openai-7d1e9b2c-do-not-leak"
MODEL = "gpt-test-mini"
FALLBACK = "gpt-test-fallback"
SYSTEM = "You are a terse test assistant."
MAX_TOKENS = 321
TIMEOUT_S = 7.5
BASE_URL = "http://127.0.0.1:9/v1"

PIECES = ["Hello", ",", " durable", " world", "!"]
PROMPT_TOKENS = 31
COMPLETION_TOKENS = 17
CACHED_TOKENS = 12


# --- a real chat.completion.chunk stream ---------------------------------------


def chunk(
    delta: dict[str, Any] | None = None,
    finish_reason: str | None = None,
    usage: dict[str, Any] | None = None,
) -> bytes:
    """One SSE ``data:`` line as OpenAI (and vLLM, Ollama) send it."""
    body: dict[str, Any] = {
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
        "object": "chat.completion.chunk",
        "created": 1741570283,
        "model": MODEL,
        "system_fingerprint": "fp_06737a9306",
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage,
    }
    return f"data: {json.dumps(body)}\n\n".encode()


DONE = b"data: [DONE]\n\n"
USAGE = chunk(
    usage={
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": COMPLETION_TOKENS,
        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
        "prompt_tokens_details": {"cached_tokens": CACHED_TOKENS, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
)


def opening() -> bytes:
    return chunk({"role": "assistant", "content": "", "refusal": None})


def text(piece: str) -> bytes:
    return chunk({"content": piece})


def full_body(pieces: Sequence[str] = PIECES, finish: str = "stop") -> bytes:
    deltas = b"".join(text(p) for p in pieces)
    return opening() + deltas + chunk({}, finish_reason=finish) + USAGE + DONE


def tool_call_fragments(index: int, call_id: str, name: str, arguments: Sequence[str]) -> bytes:
    """A tool call as streamed: id and name first, the arguments in pieces."""
    first = {
        "index": index,
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": ""},
    }
    out = chunk({"tool_calls": [first]})
    for part in arguments:
        out += chunk({"tool_calls": [{"index": index, "function": {"arguments": part}}]})
    return out


def api_error(
    status: int, message: str, error_type: str = "invalid_request_error"
) -> httpx2.Response:
    body = {"error": {"message": message, "type": error_type, "param": None, "code": None}}
    return httpx2.Response(status, json=body, headers={"x-request-id": "req_test"})


CLOCK = ToolSpec(
    name="clock",
    description="The current UTC time.",
    input_schema={"type": "object", "properties": {"tz": {"type": "string"}}},
)


# --- fixtures and helpers -----------------------------------------------------


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"):
        monkeypatch.delenv(name, raising=False)


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "openai_api_key": API_KEY,
        "openai_base_url": BASE_URL,
        "chat_llm": "openai",
        "chat_model": MODEL,
        "chat_system_prompt": SYSTEM,
        "chat_max_tokens": MAX_TOKENS,
        "chat_llm_timeout_s": TIMEOUT_S,
    }
    values.update(overrides)
    return Settings(**values)


MakeModel = Callable[..., OpenAIModel]


@pytest.fixture
async def make_model() -> AsyncIterator[MakeModel]:
    """Builds models served by a handler; closes them after the test."""
    made: list[OpenAIModel] = []

    def make(handler: Handler, max_retries: int = 0, **overrides: Any) -> OpenAIModel:
        client = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
        model = OpenAIModel(make_settings(**overrides), http_client=client, max_retries=max_retries)
        made.append(model)
        return model

    yield make
    for model in made:
        await model.aclose()


# --- a successful reply ---------------------------------------------------------


async def test_streams_pieces_in_order_and_fills_usage(make_model: MakeModel) -> None:
    model = make_model(lambda request: event_stream(full_body()))

    items, usage, err = await collect(model)

    assert err is None
    assert items == PIECES
    assert usage.input_tokens == PROMPT_TOKENS
    assert usage.output_tokens == COMPLETION_TOKENS
    assert usage.cache_read_tokens == CACHED_TOKENS
    assert usage.model == MODEL
    assert usage.wire() == {
        "input_tokens": PROMPT_TOKENS,
        "output_tokens": COMPLETION_TOKENS,
        "cache_read_tokens": CACHED_TOKENS,
    }


async def test_name_and_provider(make_model: MakeModel) -> None:
    model = make_model(lambda request: event_stream(full_body()))
    assert (model.name, model.provider) == (MODEL, "openai")


async def test_builds_its_own_client_without_one() -> None:
    model = OpenAIModel(make_settings())  # how app.llm.make_model builds it; no request is sent
    assert model.name == MODEL
    await model.aclose()


async def test_request_carries_settings_system_prompt_and_history(make_model: MakeModel) -> None:
    seen: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return event_stream(full_body())

    history = [
        msg("assistant", "Welcome!", 0),  # leading assistant: dropped, as for anthropic
        msg("user", "first", 1),
        msg("user", "second", 2),  # same role: merged
        msg("assistant", "reply", 3),
        msg("user", "third", 4),
    ]
    _, _, err = await collect(make_model(handler), history)

    assert err is None and len(seen) == 1
    request = seen[0]
    assert str(request.url) == f"{BASE_URL}/chat/completions"
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.headers.get("x-stainless-read-timeout") == str(TIMEOUT_S)
    body = json.loads(request.content)
    assert body["model"] == MODEL
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_completion_tokens"] == MAX_TOKENS
    assert "tools" not in body
    assert body["messages"] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "first\n\nsecond"},
        {"role": "assistant", "content": "reply"},
        {"role": "user", "content": "third"},
    ]


async def test_a_self_hosted_server_needs_no_key(make_model: MakeModel) -> None:
    seen: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return event_stream(full_body())

    _, _, err = await collect(make_model(handler, openai_api_key=None))

    assert err is None
    assert seen[0].url.host == "127.0.0.1"


def test_settings_name_what_openai_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CHAT_MODEL", "CHAT_LLM", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="CHAT_MODEL"):
        Settings(chat_llm="openai", openai_base_url=BASE_URL).check_startable()
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        Settings(chat_llm="openai", chat_model=MODEL).check_startable()
    Settings(chat_llm="openai", chat_model=MODEL, openai_base_url=BASE_URL).check_startable()


async def test_tool_calls_are_assembled_from_fragments(make_model: MakeModel) -> None:
    seen: list[httpx2.Request] = []
    body = (
        opening()
        + text("Let me look.")
        + tool_call_fragments(0, "call_abc", "clock", ['{"tz"', ': "UTC"}'])
        + tool_call_fragments(1, "call_def", "clock", ["{}"])
        + chunk({}, finish_reason="tool_calls")
        + USAGE
        + DONE
    )

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return event_stream(body)

    items, _, err = await collect(make_model(handler), tools=[CLOCK])

    assert err is None
    assert items == [
        "Let me look.",
        ToolCall("call_abc", "clock", '{"tz": "UTC"}'),
        ToolCall("call_def", "clock", "{}"),
    ]
    assert json.loads(seen[0].content)["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "clock",
                "description": "The current UTC time.",
                "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
            },
        }
    ]


async def test_malformed_tool_arguments_are_passed_on_as_sent(make_model: MakeModel) -> None:
    body = (
        opening()
        + tool_call_fragments(0, "call_bad", "clock", ['{"tz": "UT'])
        + chunk({}, finish_reason="tool_calls")
        + DONE
    )
    items, _, err = await collect(make_model(lambda r: event_stream(body)), tools=[CLOCK])

    assert err is None
    assert items == [ToolCall("call_bad", "clock", '{"tz": "UT')]


# --- errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(429, True), (500, True), (503, True), (400, False), (401, False), (403, False), (404, False)],
)
async def test_http_errors_become_llm_errors(
    make_model: MakeModel, status: int, retryable: bool
) -> None:
    model = make_model(lambda request: api_error(status, f"status {status} happened"))

    items, usage, err = await collect(model)

    assert isinstance(err, LLMError)
    assert err.retryable is retryable
    assert err.message and len(err.message) <= 300
    assert items == [] and usage.total == 0
    assert_key_hidden(err, API_KEY)


async def test_api_key_echoed_by_the_service_is_redacted(make_model: MakeModel) -> None:
    model = make_model(lambda request: api_error(400, f"bad header value {API_KEY}"))

    _, _, err = await collect(model)

    assert isinstance(err, LLMError) and err.retryable is False
    assert "bad header value" in err.message
    assert_key_hidden(err, API_KEY)


async def test_overloaded_primary_falls_back(make_model: MakeModel) -> None:
    asked: list[str] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        model = json.loads(request.content)["model"]
        asked.append(model)
        if model == MODEL:
            return api_error(503, "overloaded", "server_error")
        return event_stream(full_body())

    items, usage, err = await collect(make_model(handler, chat_fallback_model=FALLBACK))

    assert err is None and items == PIECES
    assert asked == [MODEL, FALLBACK]
    assert usage.model == FALLBACK


async def test_without_a_fallback_overloaded_is_a_retryable_error(make_model: MakeModel) -> None:
    _, _, err = await collect(make_model(lambda r: api_error(503, "overloaded", "server_error")))
    assert isinstance(err, LLMError) and err.retryable is True


async def test_error_object_mid_stream(make_model: MakeModel) -> None:
    failure = {"error": {"message": "engine crashed", "type": "server_error", "code": 500}}
    body = opening() + text("Hel") + text("lo") + f"data: {json.dumps(failure)}\n\n".encode()
    items, _, err = await collect(make_model(lambda r: event_stream(body)))

    assert items == ["Hel", "lo"]
    assert isinstance(err, LLMError) and err.retryable is True
    assert "engine crashed" in err.message


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
    model = make_model(dropped_after(opening() + text("Hel") + text("lo"), exc))

    items, _, err = await collect(model)

    assert items == ["Hel", "lo"]
    assert isinstance(err, LLMError) and err.retryable is True
    assert_key_hidden(err, API_KEY)


@pytest.mark.parametrize(
    "body",
    [
        opening() + text("Hel") + text("lo"),  # no finish_reason, no [DONE]
        opening() + text("Hel") + text("lo") + b'data: {"id": "chatcmpl-1", "obj',
        b"",  # a 200 with nothing in it
    ],
    ids=["ends-after-deltas", "ends-mid-chunk", "empty"],
)
async def test_body_that_ends_early(make_model: MakeModel, body: bytes) -> None:
    items, _, err = await collect(make_model(lambda r: event_stream(body)))

    assert isinstance(err, LLMError) and err.retryable is True
    assert items == (["Hel", "lo"] if body else [])


async def test_a_stalled_stream_times_out(make_model: MakeModel) -> None:
    # The mock transport does not enforce read timeouts, so the stall ends
    # the way httpx2 ends it after CHAT_LLM_TIMEOUT_S: the read fails.
    async def stalled() -> AsyncIterator[bytes]:
        yield opening() + text("Hel")
        raise httpx2.ReadTimeout("the server sent nothing for CHAT_LLM_TIMEOUT_S")

    items, _, err = await collect(make_model(lambda r: event_stream(stalled())))

    assert items == ["Hel"]
    assert isinstance(err, LLMError) and err.retryable is True
    assert "timed out" in err.message


@pytest.mark.parametrize(
    "exc",
    [httpx2.ConnectError("connection refused"), httpx2.ConnectTimeout("connect timed out")],
    ids=["connect-error", "connect-timeout"],
)
async def test_service_unreachable(make_model: MakeModel, exc: Exception) -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        raise exc

    items, _, err = await collect(make_model(handler))

    assert items == []
    assert isinstance(err, LLMError) and err.retryable is True
    assert_key_hidden(err, API_KEY)


async def test_max_retries_reaches_the_client(make_model: MakeModel) -> None:
    calls = 0

    def handler(request: httpx2.Request) -> httpx2.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            response = api_error(500, "hiccup", "server_error")
            response.headers["retry-after-ms"] = "1"
            return response
        return event_stream(full_body())

    items, _, err = await collect(make_model(handler, max_retries=1))

    assert err is None and items == PIECES
    assert calls == 2


async def test_cancellation_is_not_swallowed(make_model: MakeModel) -> None:
    first_piece = asyncio.Event()
    never = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield opening() + text("Hel")
        await never.wait()
        yield full_body()

    model = make_model(lambda request: event_stream(body()))
    items: list[str | ToolCall] = []

    async def consume() -> None:
        async for item in model.stream(HELLO, Usage()):
            items.append(item)
            first_piece.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_piece.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert items == ["Hel"]


async def test_no_user_message_fails_without_a_request(make_model: MakeModel) -> None:
    seen: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return event_stream(full_body())

    _, _, err = await collect(make_model(handler), [msg("assistant", "Welcome!")])

    assert err is not None and err.retryable is False
    assert seen == []
