"""The metrics the pod exposes, and the example dashboard that reads them."""

from __future__ import annotations

import json
import re
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
