"""The metrics the pod exposes, and the example dashboard that reads them."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

from app import metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json"


def _exposed_names() -> set[str]:
    body, _ = metrics.exposition()
    return {
        line.split("{")[0].split(" ")[0]
        for line in body.decode().splitlines()
        if line and not line.startswith("#")
    }


def test_exposition_is_prometheus_text() -> None:
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    assert "# TYPE durable_chat_fanout_lag_seconds histogram" in body.decode()


def test_every_dashboard_query_names_a_metric_the_pod_exposes() -> None:
    metrics.TURNS_FINISHED.labels("complete")  # labelled series appear once used
    metrics.LLM_TOKENS.labels("fake", "fake", "input")
    metrics.REDIS_ERRORS.labels("socket")
    exposed = _exposed_names()
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bdurable_chat_[a-z_]+", target["expr"])
    }
    assert queried, "the dashboard queries nothing"
    missing = queried - exposed
    assert not missing, f"the dashboard queries metrics the pod does not expose: {missing}"


def _lag_count(clock: str, at_least_s: float) -> float:
    """How many loop-lag samples of ``clock`` were at least ``at_least_s``."""
    total = above = 0.0
    for metric in metrics.LOOP_LAG.collect():
        for sample in metric.samples:
            if sample.labels.get("clock") != clock or not sample.name.endswith("_bucket"):
                continue
            bound = float(sample.labels["le"])
            if bound == float("inf"):
                total = sample.value
            elif bound < at_least_s:
                above = max(above, sample.value)
    return total - above


async def test_the_loop_lag_probe_sees_a_callback_that_runs_long() -> None:
    """A callback that keeps the loop busy 40 ms is a 40 ms lag by both clocks;
    a sleep of the whole process (the host's scheduling, here time.sleep in
    the loop's thread) counts by the wall clock only."""
    busy_before, wall_before = _lag_count("cpu", 0.03), _lag_count("wall", 0.03)
    probe = asyncio.create_task(metrics.probe_loop_lag(0.001))
    try:
        await asyncio.sleep(0.01)
        until = time.thread_time() + 0.04
        while time.thread_time() < until:  # the loop's own work, on its CPU
            pass
        await asyncio.sleep(0.01)
        busy, wall = _lag_count("cpu", 0.03), _lag_count("wall", 0.03)
        assert busy == busy_before + 1
        assert wall >= wall_before + 1  # (and any stall the host's load added)
        time.sleep(0.04)  # noqa: ASYNC251 (the process not running: not the loop's work)
        await asyncio.sleep(0.01)
        assert _lag_count("cpu", 0.03) == busy
        assert _lag_count("wall", 0.03) >= wall + 1
    finally:
        probe.cancel()
