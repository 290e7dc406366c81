"""Tool calls inside a turn (app.chat.runner with app.llm.tools), on fakeredis.

The fake model asks for a tool when a prompt starts with ``/tool NAME [JSON]``;
scripted models cover what the fake cannot (a model that never stops asking,
one that repeats a call id). Tools here are real callables run by a ToolBox.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
import pytest

from app.chat import keys
from app.chat.fanout import FanoutHub
from app.chat.keys import ThreadId
from app.chat.lock import TurnLock
from app.chat.records import Message
from app.chat.runner import TurnManager, TurnSetup
from app.chat.turns import TurnStore
from app.chat.usage import UsageStore, utc_day
from app.llm import ToolCall, ToolSpec, Usage
from app.llm.fake import FakeModel, expected_reply
from app.llm.tools import Tool, ToolBox, clock, tool
from tests.conftest import USER, wait_until
from tests.test_turn_runner import begin_turn, generation_events, outcome, run_to_end


@pytest.fixture
async def hub(hub_factory: Any) -> FanoutHub:
    made: FanoutHub = await hub_factory(60)
    return made


class Calls:
    """A tool that counts its runs and can be made slow."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.runs = 0
        self.running = 0
        self.most = 0
        self.cancelled = 0
        self.delay_s = delay_s

    def tool(self, name: str = "probe", timeout_s: float | None = None) -> Tool:
        async def probe(input: dict[str, Any]) -> dict[str, Any]:
            self.runs += 1
            self.running += 1
            self.most = max(self.most, self.running)
            try:
                await asyncio.sleep(self.delay_s)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            finally:
                self.running -= 1
            return {"echo": input}

        return Tool(name, "Echoes its input.", {"type": "object"}, probe, timeout_s)


def manager(
    model: Any, store: TurnStore, lock: TurnLock, hub: FanoutHub, tools: ToolBox, **kw: Any
) -> TurnManager:
    return TurnManager(TurnSetup(model, store, lock, 5, 2048, tools=tools, **kw), hub)


async def run(
    model: Any, store: TurnStore, lock: TurnLock, hub: FanoutHub, thread: ThreadId,
    prompt: str, tools: ToolBox, **kw: Any,
) -> tuple[list[dict], dict, dict]:  # fmt: skip
    m = manager(model, store, lock, hub, tools, **kw)
    m.start(await begin_turn(store, lock, thread, "g", prompt))
    await run_to_end(m)
    events = await generation_events(redis_of(store), thread, "g")
    _, message, done = await outcome(redis_of(store), thread, "g")
    return events, message, done


def redis_of(store: TurnStore) -> Any:
    return store._redis  # the test's fakeredis client


def tool_events(events: list[dict]) -> list[tuple[str, str]]:
    return [(e["type"], e.get("name") or str(e.get("is_error"))) for e in events if "call_id" in e]


# --- the fake model's /tool path -------------------------------------------------------


async def test_clock_call_is_announced_run_answered_and_kept(
    store: TurnStore, lock: TurnLock, hub: FanoutHub, thread: ThreadId
) -> None:
    prompt = "/tool clock"
    events, message, done = await run(
        FakeModel(tokens=12, delay_ms=0), store, lock, hub, thread, prompt, ToolBox([clock])
    )
    kinds = [e["type"] for e in events]
    # message, loading, tool_call, tool_result, deltas..., message, done
    assert kinds[:4] == ["message", "loading", "tool_call", "tool_result"]
    assert set(kinds[4:-2]) == {"delta"} and kinds[-2:] == ["message", "done"]
    call, result = events[2], events[3]
    assert call["name"] == "clock" and call["input"] == {}
    assert result["call_id"] == call["call_id"] and result["is_error"] is False
    assert result["output"][:4].isdigit() and "T" in result["output"]  # ISO 8601
    # The final message carries the call with its result, for history and the model.
    [stored] = orjson.loads(message["tool_calls"])
    assert stored == {
        "call_id": call["call_id"], "name": "clock", "input": {}, "output": result["output"],
        "is_error": False, "offset": 0,
    }  # fmt: skip
    assert message["content"] == expected_reply(prompt, 12)
    assert events[-2]["message"]["tool_calls"] == [stored]
    # Two model calls: the second read the prompt again plus the clock's answer.
    words = len(prompt.split())
    assert done["usage"] == {
        "input_tokens": words + words + len(result["output"].split()),
        "output_tokens": 12,
    }
    assert orjson.loads(message["usage"]) == done["usage"]


@pytest.mark.parametrize(
    ("prompt", "says"),
    [
        ("/tool nope {}", "there is no tool named 'nope'"),
        ('/tool clock {"timezone": "UT', "not valid JSON"),
        ('/tool clock {"timezone": 5}', "does not match the tool's schema at timezone"),
        ('/tool clock {"timezone": "Mars/Olympus"}', "ValueError: unknown time zone"),
    ],
    ids=["unknown-tool", "malformed-json", "schema", "exception"],
)
async def test_a_bad_call_is_an_error_result_and_the_turn_goes_on(
    store: TurnStore, lock: TurnLock, hub: FanoutHub, thread: ThreadId, prompt: str, says: str
) -> None:
    events, message, done = await run(
        FakeModel(tokens=5, delay_ms=0), store, lock, hub, thread, prompt, ToolBox([clock])
    )
    [result] = [e for e in events if e["type"] == "tool_result"]
    assert result["is_error"] is True and says in result["output"]
    assert done["status"] == "complete" and message["content"] == expected_reply(prompt, 5)
    [stored] = orjson.loads(message["tool_calls"])
    assert stored["is_error"] is True and stored["output"] == result["output"]


async def test_a_tool_past_its_timeout_is_an_error_result(
    store: TurnStore, lock: TurnLock, hub: FanoutHub, thread: ThreadId
) -> None:
    slow = Calls(delay_s=30)
    events, _, done = await run(
        FakeModel(tokens=3, delay_ms=0), store, lock, hub, thread, "/tool probe",
        ToolBox([slow.tool(timeout_s=0.05)]),
    )  # fmt: skip
    [result] = [e for e in events if e["type"] == "tool_result"]
    assert result["is_error"] is True and "timed out after 0.05s" in result["output"]
    assert done["status"] == "complete" and slow.cancelled == 1


# --- stopping a running tool --------------------------------------------------------------


@pytest.mark.parametrize("how", ["cancel", "drain"])
async def test_cancel_or_drain_stops_a_running_tool(
    store: TurnStore, lock: TurnLock, hub: FanoutHub, thread: ThreadId, how: str
) -> None:
    slow = Calls(delay_s=30)
    m = manager(FakeModel(tokens=3, delay_ms=0), store, lock, hub, ToolBox([slow.tool()]))
    m.start(await begin_turn(store, lock, thread, "g", "/tool probe"))
    await wait_until(lambda: slow.running == 1, what="the tool to run")
    if how == "cancel":
        assert await store.request_cancel(thread, "g") == "g"
    else:
        await m.drain(0)
    await run_to_end(m)
    assert slow.cancelled == 1 and slow.runs == 1
    events = await generation_events(redis_of(store), thread, "g")
    _, message, done = await outcome(redis_of(store), thread, "g")
    assert [e["type"] for e in events if "call_id" in e] == ["tool_call"]  # never answered
    assert done["status"] == ("cancelled" if how == "cancel" else "interrupted")
    assert "tool_calls" not in message  # only finished calls are kept
    assert await lock.acquire(thread) is not None  # the thread is free


# --- models that misbehave ---------------------------------------------------------------


class Repeating:
    """Asks for the same tool call (same id) every time it is called."""

    def __init__(self, rounds: int | None = None, call_id: str = "same") -> None:
        self.calls = 0
        self.rounds = rounds
        self.call_id = call_id
        self.seen: list[Sequence[Message]] = []

    @property
    def name(self) -> str:
        return "repeating"

    @property
    def provider(self) -> str:
        return "scripted"

    async def stream(
        self, messages: Sequence[Message], usage: Usage, tools: Sequence[ToolSpec] = ()
    ) -> AsyncIterator[str | ToolCall]:
        self.calls += 1
        self.seen.append(list(messages))
        usage.input_tokens, usage.output_tokens = 10, 1
        yield f"round {self.calls}. "
        if self.rounds is None or self.calls <= self.rounds:
            call_id = self.call_id if self.call_id else f"c{self.calls}"
            yield ToolCall(call_id, "probe", f'{{"n": {self.calls}}}')

    async def aclose(self) -> None:
        return None


async def test_a_call_id_is_never_run_twice(
    store: TurnStore, lock: TurnLock, hub: FanoutHub, thread: ThreadId
) -> None:
    probe = Calls()
    model = Repeating(rounds=2, call_id="same")
    events, message, done = await run(
        model, store, lock, hub, thread, "go", ToolBox([probe.tool()])
    )
    assert probe.runs == 1
    assert [e["type"] for e in events if "call_id" in e] == ["tool_call", "tool_result"]
    assert done["status"] == "complete"
    assert done["usage"] == {"input_tokens": 30, "output_tokens": 3}  # three model calls
    # The second call read the reply so far, with the call and its result.
    so_far = model.seen[1][-1]
    assert so_far.role == "assistant" and so_far.content == "round 1. "
    assert [u.call_id for u in so_far.tool_calls] == ["same"]
    assert so_far.tool_calls[0].offset == len("round 1. ")
    [stored] = orjson.loads(message["tool_calls"])
    assert stored["offset"] == len("round 1. ") and stored["output"] == '{"echo":{"n":1}}'


async def test_a_model_that_never_stops_calling_tools_is_stopped(
    store: TurnStore, lock: TurnLock, hub: FanoutHub, thread: ThreadId
) -> None:
    probe = Calls()
    _, message, done = await run(
        Repeating(call_id=""), store, lock, hub, thread, "go", ToolBox([probe.tool()]),
        max_tool_rounds=3,
    )  # fmt: skip
    assert probe.runs == 3
    assert done["status"] == "error"
    assert message["content"] == "round 1. round 2. round 3. round 4. "
    assert len(orjson.loads(message["tool_calls"])) == 3


class Fanning:
    """Asks for ``n`` tools at once, then answers."""

    def __init__(self, n: int) -> None:
        self.n = n

    @property
    def name(self) -> str:
        return "fanning"

    @property
    def provider(self) -> str:
        return "scripted"

    async def stream(
        self, messages: Sequence[Message], usage: Usage, tools: Sequence[ToolSpec] = ()
    ) -> AsyncIterator[str | ToolCall]:
        if messages[-1].role == "assistant":
            yield "done"
            return
        for i in range(self.n):
            yield ToolCall(f"c{i}", "probe", "{}")

    async def aclose(self) -> None:
        return None


async def test_tools_run_with_bounded_concurrency(
    store: TurnStore, lock: TurnLock, hub: FanoutHub, thread: ThreadId
) -> None:
    probe = Calls(delay_s=0.02)
    events, message, _ = await run(
        Fanning(4), store, lock, hub, thread, "go", ToolBox([probe.tool()], concurrency=2)
    )
    assert probe.runs == 4 and probe.most == 2
    assert [e["type"] for e in events if "call_id" in e][:4] == ["tool_call"] * 4
    assert len(orjson.loads(message["tool_calls"])) == 4


async def test_usage_is_settled_into_the_users_day(
    store: TurnStore, lock: TurnLock, hub: FanoutHub, thread: ThreadId, scripts: Any
) -> None:
    usage = UsageStore(redis_of(store), scripts, 0)
    _, _, done = await run(
        FakeModel(tokens=4, delay_ms=0), store, lock, hub, thread, "count these words",
        ToolBox(), usage=usage,
    )  # fmt: skip
    today = await usage.today(USER)
    assert (today.input_tokens, today.output_tokens) == (3, 4) == tuple(done["usage"].values())
    assert await redis_of(store).exists(keys.usage_outbox(thread)) == 0
    assert await store.index_threads() == []
    assert utc_day() == today.day


def test_the_decorator_makes_a_tool() -> None:
    @tool(input_schema={"type": "object"}, timeout_s=2)
    def lookup(input: dict[str, Any]) -> str:
        """Find a thing."""
        return "found"

    assert (lookup.name, lookup.description, lookup.timeout_s) == ("lookup", "Find a thing.", 2)
    assert dataclasses.asdict(ToolBox([lookup]).specs[0]) == {
        "name": "lookup", "description": "Find a thing.", "input_schema": {"type": "object"},
    }  # fmt: skip
