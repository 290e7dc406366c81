"""A small OpenAI-compatible server for the pods' tests (``CHAT_LLM=openai``).

Serves ``POST /v1/chat/completions`` with ``stream: true`` the way vLLM,
Ollama or OpenAI do: ``data:`` chunks of ``chat.completion.chunk`` ending in
``data: [DONE]``, usage in the last chunk. What it answers depends on the
last user message (the scenario) and on whether a tool result came back:

- ``time?``: asks for the ``clock`` tool, then, given its result, says it;
- ``cut``: a few words, then the connection ends mid-reply;
- ``stall``: a few words, then nothing (past the client's timeout);
- anything else: ``Hello from the stub`` and how many messages it was sent.

Every request body is appended to the file STUB_REQUESTS names, so tests see
what the pod sent (system prompt, history, tools, tool results).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def _chunk(
    model: str, delta: dict[str, Any] | None, finish: str | None = None, **extra: Any
) -> bytes:
    body = {
        "id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 1, "model": model,
        "choices": [] if delta is None else [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        ],
        **extra,
    }  # fmt: skip
    return f"data: {json.dumps(body)}\n\n".encode()


def _usage(model: str, prompt: int, completion: int) -> bytes:
    usage = {
        "prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": 0},
    }  # fmt: skip
    return _chunk(model, None, usage=usage)


async def _reply(body: dict[str, Any]) -> AsyncIterator[bytes]:
    model = body["model"]
    messages = body["messages"]
    last_user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    yield _chunk(model, {"role": "assistant", "content": ""})
    if messages[-1]["role"] == "tool":
        words = ["It", " is", " " + messages[-1]["content"], "."]
    elif last_user == "time?" and body.get("tools"):
        yield _chunk(model, {"content": "Checking. "})
        call = {"index": 0, "id": "call_stub_1", "type": "function",
                "function": {"name": "clock", "arguments": ""}}  # fmt: skip
        yield _chunk(model, {"tool_calls": [call]})
        for part in ('{"timezone"', ': "UTC"}'):
            yield _chunk(model, {"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
        yield _chunk(model, {}, "tool_calls")
        yield _usage(model, 20, 7)
        yield b"data: [DONE]\n\n"
        return
    elif last_user in ("cut", "stall"):
        for word in ("Partial", " words"):
            yield _chunk(model, {"content": word})
        if last_user == "stall":
            await asyncio.sleep(3600)
        return  # the body ends: no finish_reason, no [DONE]
    else:
        words = ["Hello", " from", " the", " stub", f" ({len(messages)} messages)"]
    for word in words:
        yield _chunk(model, {"content": word})
    yield _chunk(model, {}, "stop")
    yield _usage(model, 10 * len(messages), len(words))
    yield b"data: [DONE]\n\n"


def _record(body: dict[str, Any]) -> None:
    with open(os.environ["STUB_REQUESTS"], "a", encoding="utf-8") as log:
        log.write(json.dumps(body) + "\n")


async def completions(request: Request) -> Response:
    body = await request.json()
    await asyncio.to_thread(_record, body)
    if request.headers.get("authorization") != "Bearer stub-key":
        return JSONResponse({"error": {"message": "bad key", "type": "auth"}}, 401)
    return StreamingResponse(_reply(body), media_type="text/event-stream")


async def health(request: Request) -> Response:
    return Response("ok")


app = Starlette(
    routes=[
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route("/healthz", health),
    ]
)
