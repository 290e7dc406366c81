"""CHAT_LLM=openai on a real pod against a real OpenAI-compatible server
(tests/integration/openai_stub.py, over HTTP): replies, the system prompt and
history, a tool call round, usage, and a server that cuts or stalls."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import procs
from tests.integration.helpers import open_ready, send, unique, until_done

pytestmark = pytest.mark.integration

SYSTEM = "You are the stub test's assistant."


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[procs.Server, Path]]:
    root = tmp_path_factory.mktemp("openai-stub")
    requests = root / "requests.jsonl"
    port = procs.free_port()
    env = procs.base_env()
    env["STUB_REQUESTS"] = str(requests)
    argv = [
        sys.executable, "-m", "uvicorn", "tests.integration.openai_stub:app",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip
    server = procs.Server("openai-stub", argv, env, port, root / "stub.log", "/healthz")
    try:
        yield server.start(), requests
    finally:
        server.stop()


def sent(requests: Path) -> list[dict]:
    return [json.loads(line) for line in requests.read_text().splitlines()]


async def test_a_pod_talks_to_an_openai_compatible_server(redis_server, pod_factory, stub):
    server, requests = stub
    pod = pod_factory(
        redis_server, CHAT_LLM="openai", OPENAI_BASE_URL=f"{server.http}/v1",
        OPENAI_API_KEY="stub-key", CHAT_MODEL="stub-model", CHAT_SYSTEM_PROMPT=SYSTEM,
        CHAT_TOOLS="clock", CHAT_LLM_TIMEOUT_S=2, CHAT_LLM_MAX_RETRIES=0,
    )  # fmt: skip
    thread = unique("openai")
    ws, _ = await open_ready(pod.ws, thread)
    try:
        await send(ws, {"type": "prompt", "content": "hi"})
        first = await until_done(ws)
        assert first[1]["model"] == "stub-model"
        assert first[-2]["message"]["content"] == "Hello from the stub (2 messages)"
        assert first[-1]["usage"] == {"input_tokens": 20, "output_tokens": 5}

        # A tool round: the stub asks for the clock, the pod runs it and
        # sends the result back, the stub answers with it.
        await send(ws, {"type": "prompt", "content": "time?"})
        second = await until_done(ws)
        kinds = [e["type"] for e in second]
        assert "tool_call" in kinds and "tool_result" in kinds
        result = next(e for e in second if e["type"] == "tool_result")
        final = second[-2]["message"]
        assert final["content"] == f"Checking. It is {result['output']}."
        assert final["tool_calls"][0]["input"] == {"timezone": "UTC"}
        assert final["tool_calls"][0]["offset"] == len("Checking. ")
        # Two model calls: their usage is summed.
        assert second[-1]["usage"] == {"input_tokens": 20 + 60, "output_tokens": 7 + 4}

        # The next request carries the system prompt, the history and the
        # finished tool round, as OpenAI's API wants them.
        await send(ws, {"type": "prompt", "content": "thanks"})
        await until_done(ws)
        last = sent(requests)[-1]
        assert last["model"] == "stub-model" and last["stream"] is True
        assert last["stream_options"] == {"include_usage": True}
        assert [t["function"]["name"] for t in last["tools"]] == ["clock"]
        roles = [m["role"] for m in last["messages"]]
        assert roles == ["system", "user", "assistant", "user", "assistant", "tool", "assistant",
                         "user"]  # fmt: skip
        assert last["messages"][0]["content"] == SYSTEM
        assert last["messages"][5]["content"] == result["output"]
    finally:
        await ws.close()


@pytest.mark.parametrize("scenario", ["cut", "stall"])
async def test_a_server_that_cuts_or_stalls_ends_the_turn_in_llm_error(
    redis_server, pod_factory, stub, scenario
):
    server, _ = stub
    pod = pod_factory(
        redis_server, CHAT_LLM="openai", OPENAI_BASE_URL=f"{server.http}/v1",
        OPENAI_API_KEY="stub-key", CHAT_MODEL="stub-model", CHAT_LLM_TIMEOUT_S=1,
        CHAT_LLM_MAX_RETRIES=0,
    )  # fmt: skip
    ws, _ = await open_ready(pod.ws, unique(scenario))
    try:
        await send(ws, {"type": "prompt", "content": scenario})
        seen = await until_done(ws, timeout=15)
        final, done = seen[-2]["message"], seen[-1]
        assert done["status"] == final["status"] == "error"
        assert final["content"] == "Partial words"  # the text so far is kept
        assert done["error"]["code"] == "llm_error" and done["error"]["retryable"] is True
        # The thread is free again at once.
        await send(ws, {"type": "prompt", "content": "hi"})
        assert (await until_done(ws))[-1]["status"] == "complete"
    finally:
        await ws.close()
