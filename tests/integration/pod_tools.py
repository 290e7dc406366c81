"""Tools the integration tests register in real pods (CHAT_TOOLS=tests.integration.pod_tools).

``slow`` writes one line per run into the file DURABLE_CHAT_TEST_TOOL_LOG names
(pod and call id), then waits: a test can kill a pod while it runs and count
afterwards how often it ran, across every pod.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from app.llm.tools import tool


def _record(line: str) -> None:
    with open(os.environ["DURABLE_CHAT_TEST_TOOL_LOG"], "a", encoding="utf-8") as log:
        log.write(line + "\n")


@tool(
    description="Waits `seconds`, recording each run.",
    input_schema={
        "type": "object",
        "properties": {"seconds": {"type": "number", "minimum": 0, "maximum": 60}},
        "required": ["seconds"],
        "additionalProperties": False,
    },
    timeout_s=60,
)
async def slow(input: dict[str, Any]) -> str:
    await asyncio.to_thread(_record, os.environ.get("CHAT_POD_ID", "?"))
    await asyncio.sleep(input["seconds"])
    return f"waited {input['seconds']} seconds"
