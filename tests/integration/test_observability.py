"""Metrics and logs of a real pod during a real turn."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.integration.helpers import connect, recv_event, send, until_done

pytestmark = pytest.mark.integration


def _scrape(pod) -> dict[str, float]:
    body = httpx.get(f"{pod.http}/metrics", timeout=5).text
    values: dict[str, float] = {}
    for line in body.splitlines():
        match = re.fullmatch(r"(durable_chat_[a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


async def test_metrics_show_a_turn_while_it_runs(redis_server, pod_factory):
    pod = pod_factory(redis_server, CHAT_FAKE_TOKEN_DELAY_MS=30, CHAT_FAKE_REPLY_TOKENS=60)
    ws = await connect(pod.ws, "metrics1")
    try:
        await recv_event(ws)
        before = _scrape(pod)
        assert before["durable_chat_sockets_open"] == 1
        assert before["durable_chat_threads_followed"] == 1
        await send(ws, {"type": "prompt", "content": "count me"})
        deltas = 0
        while deltas < 3:
            deltas += (await recv_event(ws))["type"] == "delta"
        during = _scrape(pod)
        assert during["durable_chat_turns_running"] == 1
        assert during["durable_chat_turns_started_total"] == 1
        assert during["durable_chat_deltas_published_total"] >= 3
        assert during["durable_chat_events_delivered_total"] >= 5  # message, loading, 3 deltas
        assert during["durable_chat_fanout_lag_seconds_count"] >= 5
        await until_done(ws)
    finally:
        await ws.close()
    after = _scrape(pod)
    assert after["durable_chat_turns_running"] == 0
    assert after['durable_chat_turns_finished_total{status="complete"}'] == 1
    assert after['durable_chat_llm_tokens_total{kind="output",model="fake",provider="fake"}'] == 60
    assert after["durable_chat_time_to_first_token_seconds_count"] == 1


async def test_json_logs_carry_the_pod_and_never_the_token(redis_server, pod_factory):
    pod = pod_factory(redis_server, CHAT_LOG_FORMAT="json")
    ws = await connect(pod.ws, "logs1", "?token=sekret-value-123")
    await recv_event(ws)
    await send(ws, {"type": "prompt", "content": "log me"})
    generation = (await until_done(ws))[-1]["generation_id"]
    await ws.close()
    async with httpx.AsyncClient() as http:
        await http.get(f"{pod.http}/list?token=sekret-value-123", timeout=5)
    lines = [json.loads(line) for line in pod.logs().splitlines() if line.startswith("{")]
    assert lines and all(line["pod"] == "pod0" for line in lines)
    assert any("/list?token=[redacted]" in line["msg"] for line in lines)
    assert "sekret-value-123" not in pod.logs()
    turn_lines = [line for line in lines if line.get("generation_id") == generation]
    assert [line["msg"].split()[-1] for line in turn_lines[:1]] == ["started"]
    assert any("ended complete" in line["msg"] for line in turn_lines)
    assert all(line["thread_id"] == "logs1" for line in turn_lines)
