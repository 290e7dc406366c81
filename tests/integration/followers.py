"""Clients that keep everything they are handed, for tests that hold them
through restarts and check afterwards what each one saw: app.client's
ChatClient (``PyFollower``) and the TypeScript client of clients/js
(``JsFollower``: tests/integration/js_follower.mjs under node).

Both offer the same: ``thread``, ``events`` (in the order the client handed
them on), ``sent`` (the client_msg_ids of the prompts it sent),
``reconnects``, ``until(predicate, timeout)``, and ``stop()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from app.client import ChatClient

Event = dict[str, Any]
# Not timeline events, and sent whenever who is on a thread changes: the
# tests that look for them read them with ``helpers.recv_any``; the others
# skip them, as a client that shows no presence does.
EPHEMERAL = frozenset({"presence", "typing"})
SCRIPT = Path(__file__).with_name("js_follower.mjs")


class Follower:
    def __init__(self, thread: str) -> None:
        self.thread = thread
        self.events: list[Event] = []
        self.sent: list[str] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def reconnects(self) -> int:
        """Every ``ready`` after the first is a reconnect."""
        return max(0, sum(e["type"] == "ready" for e in self.events) - 1)

    def _record(self, event: Event) -> None:
        if event["type"] in EPHEMERAL:
            return
        self.events.append(event)
        self._changed.set()

    def _why_stopped(self) -> str:
        assert self._task is not None
        return repr(self._task.exception()) if not self._task.cancelled() else "cancelled"

    async def until(
        self, predicate: Callable[[list[Event]], bool], timeout: float, what: str = "a condition"
    ) -> None:
        """Wait for ``predicate(events)``; fail after ``timeout`` seconds, or
        at once if the client stopped."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self.events):
                    assert self._task is not None, "not started"
                    assert not self._task.done(), f"{self} stopped: {self._why_stopped()}"
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"{self}: timed out after {timeout}s waiting for {what}; prompts sent "
                f"{self.sent[-3:]}, its last events {self._last_events()}"
            ) from None

    def _last_events(self, count: int = 8) -> str:
        """The last events, in short (a timeout's message: what was seen)."""
        shown = []
        for event in self.events[-count:]:
            detail = event.get("code") or event.get("status") or (
                event.get("message", {}).get("client_msg_id")
                if isinstance(event.get("message"), dict) else None
            )  # fmt: skip
            shown.append(f"{event['type']}({detail})" if detail else event["type"])
        return ", ".join(shown) or "none"

    async def _wake_when_done(self, reading: Any) -> None:
        try:
            await reading
        finally:
            self._changed.set()


class PyFollower(Follower):
    """A ``ChatClient`` on ``url`` (a pod or a load balancer), or failing
    over along several ``url``s."""

    def __init__(self, url: str | Sequence[str], thread: str) -> None:
        super().__init__(thread)
        self.client = ChatClient(url, thread)

    def __repr__(self) -> str:
        return f"PyFollower({self.thread})"

    async def start(self) -> PyFollower:
        await self.client.connect()
        self._task = asyncio.create_task(self._wake_when_done(self._read()))
        return self

    async def _read(self) -> None:
        async for event in self.client.events():
            self._record(event)

    async def prompt(self, content: str) -> str:
        client_msg_id = await self.client.prompt(content)
        self.sent.append(client_msg_id)
        return client_msg_id

    async def stop(self) -> None:
        await self.client.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class JsFollower(Follower):
    """The TypeScript client on ``url`` in a node process; ``write`` makes it
    send prompt after prompt on its own until ``finish()``."""

    def __init__(self, node: str, url: str, thread: str, log_path: Path, write: bool) -> None:
        super().__init__(thread)
        self._argv = [node, "--experimental-websocket", str(SCRIPT)]
        self._env = {**os.environ, "DC_URL": url, "DC_THREAD": thread, "DC_WRITE": str(int(write))}
        self._log_path = log_path
        self._log = open(log_path, "ab")  # node's stderr; closed in stop()
        self._proc: asyncio.subprocess.Process | None = None
        self.summary: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"JsFollower({self.thread})"

    def logs(self) -> str:
        return self._log_path.read_text(errors="replace") if self._log_path.exists() else ""

    def _why_stopped(self) -> str:
        return f"{super()._why_stopped()}; node said:\n{self.logs()[-2000:]}"

    async def start(self, timeout: float = 20) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            *self._argv, env=self._env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=self._log,
        )  # fmt: skip
        self._task = asyncio.create_task(self._wake_when_done(self._read()))
        await self.until(lambda events: any(e["type"] == "ready" for e in events), timeout)

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for line in self._proc.stdout:
            said = orjson.loads(line)
            if "event" in said:
                self._record(said["event"])
            elif "sent" in said:
                self.sent.append(said["sent"])
            else:
                self.summary = said
        assert await self._proc.wait() == 0, f"node exited {self._proc.returncode}"

    async def finish(self, timeout: float = 30) -> None:
        """Stop it as it was written to stop: a writer sends one more prompt
        and waits for its turn, a reader closes. Fails if node fails."""
        assert self._proc is not None and self._proc.stdin is not None and self._task is not None
        self._proc.stdin.close()
        await asyncio.wait_for(asyncio.shield(self._task), timeout)

    async def stop(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._task
        self._log.close()
