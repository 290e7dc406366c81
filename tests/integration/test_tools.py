"""Tools on real pods (the fake model's ``/tool NAME [JSON]``): the calls and
their results reach every pod in the same order, history and the next turn's
context carry them, and a pod killed mid-tool leaves an ``interrupted`` turn
whose tool is never run again, anywhere.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from app.llm.fake import expected_reply
from tests.integration.helpers import (
    assert_turns_well_formed,
    get_history,
    open_ready,
    read_until,
    send,
    stored_history,
    unique,
    until_done,
)
from tests.procs import wait_until

pytestmark = pytest.mark.integration

TOKENS = 6
QUICK = {"CHAT_FAKE_REPLY_TOKENS": TOKENS, "CHAT_FAKE_TOKEN_DELAY_MS": 1}
TTL_MS, REAPER_MS = 2000, 300
LEASES = {"CHAT_LOCK_TTL_MS": TTL_MS, "CHAT_REAPER_INTERVAL_MS": REAPER_MS}


def words(*texts: str) -> int:
    return sum(len(t.split()) for t in texts)


async def test_a_clock_call_reaches_both_pods_history_and_the_next_context(
    redis_server, pod_factory
):
    a = pod_factory(redis_server, **QUICK)
    b = pod_factory(redis_server, **QUICK)
    thread = unique("clock")
    on_a, _ = await open_ready(a.ws, thread)
    on_b, _ = await open_ready(b.ws, thread)
    try:
        await send(on_a, {"type": "prompt", "content": "/tool clock"})
        seen_a, seen_b = await until_done(on_a), await until_done(on_b)
        # The same timeline on both pods, byte for byte in order.
        assert seen_a == seen_b
        kinds = [e["type"] for e in seen_a]
        assert kinds[:4] == ["message", "loading", "tool_call", "tool_result"]
        assert kinds[-2:] == ["message", "done"] and set(kinds[4:-2]) == {"delta"}
        call, result = seen_a[2], seen_a[3]
        assert (call["name"], call["input"]) == ("clock", {})
        assert result["call_id"] == call["call_id"] and result["is_error"] is False
        clock_time = result["output"]
        final, done = seen_a[-2]["message"], seen_a[-1]
        assert final["content"] == expected_reply("/tool clock", TOKENS)
        assert final["tool_calls"] == [
            {"call_id": call["call_id"], "name": "clock", "input": {}, "output": clock_time,
             "is_error": False, "offset": 0},
        ]  # fmt: skip
        assert final["usage"] == done["usage"]

        # History keeps the call (on the other pod, from Redis).
        page = await get_history(on_b)
        assert page["messages"][-1]["tool_calls"] == final["tool_calls"]

        # The next turn, asked on the other pod, reads the call's result back:
        # the fake model counts the words of the messages and of tool outputs.
        await send(on_b, {"type": "prompt", "content": "and now?"})
        follow_up = (await until_done(on_b))[-1]
        await until_done(on_a)
        assert follow_up["usage"]["input_tokens"] == words(
            "/tool clock", final["content"], clock_time, "and now?"
        )
        # The thread's totals are the sum of its turns' (REST, either pod).
        async with httpx.AsyncClient(base_url=b.http, timeout=10) as http:
            detail = (await http.get(f"/v1/threads/{thread}")).json()
        assert detail["usage"] == {
            kind: done["usage"][kind] + follow_up["usage"][kind]
            for kind in ("input_tokens", "output_tokens")
        }
    finally:
        await on_a.close()
        await on_b.close()
    assert assert_turns_well_formed(redis_server, thread) == 2


async def test_bad_tool_calls_end_as_error_results_not_failed_turns(redis_server, pod_factory):
    pod = pod_factory(redis_server, **QUICK)
    thread = unique("badtool")
    ws, _ = await open_ready(pod.ws, thread)
    try:
        for prompt, says in [
            ("/tool nope", "there is no tool named 'nope'"),
            ('/tool clock {"timezone":', "not valid JSON"),
            ('/tool clock {"timezone": 7}', "schema"),
            ('/tool clock {"timezone": "Nowhere/Atlantis"}', "unknown time zone"),
        ]:
            await send(ws, {"type": "prompt", "content": prompt})
            seen = await until_done(ws)
            [result] = [e for e in seen if e["type"] == "tool_result"]
            assert result["is_error"] is True and says in result["output"], result
            assert seen[-1]["status"] == "complete"
            assert seen[-2]["message"]["content"] == expected_reply(prompt, TOKENS)
    finally:
        await ws.close()
    assert "Traceback" not in pod.logs()


def _runs(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("when", ["mid-tool", "after-the-tool"])
async def test_kill_9_interrupts_the_turn_and_the_tool_never_runs_again(
    redis_server, pod_factory, tmp_path, when
):
    runs = tmp_path / "tool-runs.txt"
    tools = {"CHAT_TOOLS": "tests.integration.pod_tools", "DURABLE_CHAT_TEST_TOOL_LOG": runs}
    # After the tool the fake model streams slowly: the kill lands mid-text.
    slow_text = {"CHAT_FAKE_REPLY_TOKENS": 400, "CHAT_FAKE_TOKEN_DELAY_MS": 20}
    doomed = pod_factory(redis_server, **tools, **LEASES, **slow_text)
    survivor = pod_factory(redis_server, **tools, **LEASES, **QUICK)
    thread = unique("killtool")
    sender, _ = await open_ready(doomed.ws, thread)
    watcher, _ = await open_ready(survivor.ws, thread)
    seconds = 30 if when == "mid-tool" else 0
    try:
        await send(sender, {"type": "prompt", "content": f'/tool slow {{"seconds": {seconds}}}'})
        if when == "mid-tool":
            seen = await read_until(watcher, "tool_call")
        else:
            seen = await read_until(watcher, "delta")  # the tool answered; text streams
        # The tool runs right after its call is announced: wait for its record.
        assert wait_until(lambda: _runs(runs), timeout=10, what="the tool to run") == [doomed.name]
        doomed.kill()
        seen += await until_done(watcher, timeout=TTL_MS / 1000 + REAPER_MS / 1000 + 10)
        final, done = seen[-2]["message"], seen[-1]
        assert done["status"] == final["status"] == "interrupted"
        call = next(e for e in seen if e["type"] == "tool_call")
        if when == "mid-tool":
            assert "tool_calls" not in final  # it never finished: nothing to keep
            assert not any(e["type"] == "tool_result" for e in seen)
        else:
            [kept] = final["tool_calls"]
            assert kept["call_id"] == call["call_id"] and kept["output"] == "waited 0 seconds"
            assert final["content"]  # the text streamed before the kill
        # The thread works again, on the survivor, and nothing ran the tool twice.
        await send(watcher, {"type": "prompt", "content": "still there?"})
        assert (await until_done(watcher))[-1]["status"] == "complete"
    finally:
        await sender.close()
        await watcher.close()
    assert _runs(runs) == [doomed.name]
    history = stored_history(redis_server, thread)
    assert [m["status"] for m in history if m["role"] == "assistant"] == [
        "interrupted", "complete",
    ]  # fmt: skip


async def test_a_cancel_from_another_pod_stops_a_running_tool(redis_server, pod_factory, tmp_path):
    runs = tmp_path / "tool-runs.txt"
    tools = {"CHAT_TOOLS": "tests.integration.pod_tools", "DURABLE_CHAT_TEST_TOOL_LOG": runs}
    runner = pod_factory(redis_server, **tools, **QUICK)
    other = pod_factory(redis_server, **tools, **QUICK)
    thread = unique("canceltool")
    sender, _ = await open_ready(runner.ws, thread)
    canceller, _ = await open_ready(other.ws, thread)
    try:
        await send(sender, {"type": "prompt", "content": '/tool slow {"seconds": 30}'})
        await read_until(canceller, "tool_call")
        wait_until(lambda: _runs(runs), timeout=10, what="the tool to run")
        await send(canceller, {"type": "cancel"})
        # Ended well before the tool's 30 s: the running tool was stopped.
        seen = await until_done(canceller, timeout=10)
        assert seen[-1]["status"] == seen[-2]["message"]["status"] == "cancelled"
        assert not any(e["type"] == "tool_result" for e in seen)
        await until_done(sender)
    finally:
        await sender.close()
        await canceller.close()
    assert _runs(runs) == [runner.name]
