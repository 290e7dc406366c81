"""One turn's tool calls: each announced once, then run on the turn's pod,
then answered, all through the turn's fenced writes.

The order is what makes them safe to retry and to reap: a call is published
(``tool_call``, once per call id: the turn record remembers it) before its
tool runs, so a turn never runs a tool nobody can see, and a call id seen
before is never run again; each ``tool_result`` is published as its tool
finishes, and only answered calls are kept for the reply (the reaper, which
rebuilds a dead pod's turn from the timeline, keeps the same ones). A stop
of the turn (a cancel, a drain) cancels the tools still running.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from app.chat.records import MessageStatus, ToolCallEvent, ToolResultEvent, ToolUse
from app.llm import ToolCall
from app.llm.tools import Outcome, ToolBox

# Publishes one event of the turn; True when a cancel of the turn was asked for.
Publish = Callable[[ToolCallEvent | ToolResultEvent], Awaitable[bool]]


class TurnTools:
    """The tool calls of one turn, round after round."""

    def __init__(
        self, tools: ToolBox, thread_id: str, generation_id: str, publish: Publish
    ) -> None:
        self._tools = tools
        self._thread_id = thread_id
        self._generation_id = generation_id
        self._publish = publish
        self._announced: set[str] = set()
        self.answered: list[ToolUse] = []  # in the order they finished

    async def round(
        self,
        calls: Sequence[ToolCall],
        offset: int,
        stopped: Callable[[], Coroutine[Any, Any, MessageStatus]],
    ) -> MessageStatus | None:
        """Announce and run ``calls`` (asked after ``offset`` characters of the
        reply), publishing each result as it comes. ``stopped`` returns when
        the turn is told to stop, with the status it must end with; then, or
        on a cancel seen by a write, the running tools are cancelled and that
        status returned. None once every call is answered."""
        running: dict[asyncio.Task[Outcome], ToolCall] = {}
        stop_task: asyncio.Task[MessageStatus] | None = None
        stop: MessageStatus | None = None
        try:
            for call in calls:
                if call.call_id in self._announced:
                    continue  # never run twice for one call id
                if await self._announce(call):
                    stop = "cancelled"
                    break
                running[asyncio.create_task(self._tools.run(call))] = call
            if running and stop is None:
                stop_task = asyncio.create_task(stopped())
            while running and stop_task is not None and stop is None:
                finished, _ = await asyncio.wait(
                    {*running, stop_task}, return_when=asyncio.FIRST_COMPLETED
                )
                if stop_task in finished:
                    stop = stop_task.result()
                for task in [t for t in running if t in finished]:
                    if await self._answer(running.pop(task), task.result(), offset):
                        stop = "cancelled"
        finally:
            if stop_task is not None:
                stop_task.cancel()
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(running)
        return stop

    async def _announce(self, call: ToolCall) -> bool:
        value, _ = self._tools.parse(call)
        cancel = await self._publish(
            ToolCallEvent(
                thread_id=self._thread_id, generation_id=self._generation_id,
                call_id=call.call_id, name=call.name, input=value,
            )
        )  # fmt: skip
        self._announced.add(call.call_id)
        return cancel

    async def _answer(self, call: ToolCall, outcome: Outcome, offset: int) -> bool:
        cancel = await self._publish(
            ToolResultEvent(
                thread_id=self._thread_id, generation_id=self._generation_id,
                call_id=call.call_id, output=outcome.output, is_error=outcome.is_error,
            )
        )  # fmt: skip
        self.answered.append(
            ToolUse(
                call.call_id, call.name, outcome.input, outcome.output, outcome.is_error, offset
            )
        )
        return cancel
