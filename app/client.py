"""A Python client for durable-chat's WebSocket protocol, that never loses an event.

    async with ChatClient(["ws://pod-a:8000", "ws://pod-b:8000"], "my-thread") as chat:
        await chat.prompt("Hello")
        async for event in chat.events():
            if event["type"] == "delta":
                print(event["text"], end="")
            elif event["type"] == "done":
                break

What it does for you, as PROTOCOL.md asks of a client:
- keeps the id of the last timeline event and the thread's epoch, and when
  the socket drops (a pod restarting closes with 1012, a slow client gets
  1013, a network blip closes with nothing) reconnects, to the next URL in
  the list, with ``after`` and ``epoch``: nothing is missed, nothing repeats;
  a 5xx answer to the handshake (a load balancer between pods) is retried
  too, a 4xx one is final;
- gives every prompt a ``client_msg_id`` and, if the connection drops before
  the prompt's own ``message`` event came back, sends it again with the same
  id after reconnecting (the server appends it once);
- hands you ``ready`` events too: ``recovered: false`` means the thread's
  history must be reloaded (``get_history``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import orjson
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

# Close codes after which reconnecting cannot help.
_FINAL = {1000, 1008}
# Errors that refuse a prompt outright.
_PROMPT_REFUSALS = {
    "thread_busy", "queue_full", "too_large", "bad_request", "rate_limited", "forbidden",
}  # fmt: skip


def _key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


class ChatClosed(Exception):
    """The connection ended; ``final`` when retrying cannot help (auth, bad thread id)."""

    def __init__(self, message: str, final: bool = False) -> None:
        super().__init__(message)
        self.final = final


class ChatClient:
    """One thread, one logical connection that survives pod restarts."""

    def __init__(
        self,
        base_urls: str | Sequence[str],
        thread_id: str,
        token: str | None = None,
        reconnect_delays: Sequence[float] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0),
        max_reconnects: int | None = 50,
    ) -> None:
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        self._urls = itertools.cycle(urls)
        self.thread_id = thread_id
        self._token = token
        self._delays = list(reconnect_delays)
        self._max_reconnects = max_reconnects
        self.last_event_id: str | None = None
        self.epoch: str | None = None
        self.reconnects = 0
        self._ws: Any = None
        self._connected = asyncio.Event()
        self._unconfirmed: dict[str, dict[str, Any]] = {}
        self._backlog: list[dict[str, Any]] = []
        self._joined = False  # a ``ready`` was seen
        self._closed = False

    async def __aenter__(self) -> ChatClient:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        await self.close()

    def _url(self) -> str:
        query: dict[str, str] = {}
        if self.last_event_id is not None:
            query["after"] = self.last_event_id
            if self.epoch is not None:
                query["epoch"] = self.epoch
        base = next(self._urls).rstrip("/")
        suffix = f"?{urlencode(query)}" if query else ""
        return f"{base}/v1/threads/{self.thread_id}/ws{suffix}"

    async def connect(self) -> None:
        """Join the thread (resuming after the last event seen, if any).

        Returns once the server's ``ready`` has arrived: from then on every
        event of the thread reaches this client. ``events()`` yields that
        ``ready`` first."""
        try:
            # The token goes in a header, never the URL: URLs end up in logs.
            headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
            ws = await websockets.connect(
                self._url(), open_timeout=10, max_size=2**24, additional_headers=headers
            )
        except InvalidStatus as exc:
            # 4xx: refused (auth, origin, bad thread id), retrying cannot help.
            # 5xx: a load balancer with no pod to send us to right now (502,
            # 503 while every pod restarts) or a pod going away: try again.
            final = exc.response.status_code < 500
            raise ChatClosed(
                f"server refused the socket: HTTP {exc.response.status_code}"
                f"{_refusal_reason(exc.response.body)}",
                final=final,
            ) from exc
        try:
            ready = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            raise ChatClosed(f"closed by the server with {code}", code in _FINAL) from exc
        self._ws = ws
        self._backlog.append(ready)
        self._connected.set()
        for frame in list(self._unconfirmed.values()):
            await self._ws.send(orjson.dumps(frame).decode())

    async def close(self) -> None:
        self._closed = True
        if self._ws is not None:
            await self._ws.close()

    async def _send(self, frame: dict[str, Any]) -> None:
        await self._connected.wait()
        with contextlib.suppress(ConnectionClosed):
            await self._ws.send(orjson.dumps(frame).decode())
            # Lost with the connection? Then events() reconnects and connect() re-sends
            # prompts; other frames are cheap for the caller to send again.

    async def prompt(
        self, content: str, client_msg_id: str | None = None, parent_id: str | None = None
    ) -> str:
        """Send a prompt (with ``parent_id``: an edit, a branch under that
        message); returns its client_msg_id. Re-sent after a reconnect until
        its ``message`` (or ``queued``) event is seen, appended once by the
        server."""
        client_msg_id = client_msg_id or secrets.token_hex(8)
        frame = {"type": "prompt", "content": content, "client_msg_id": client_msg_id}
        if parent_id is not None:
            frame["parent_id"] = parent_id
        self._unconfirmed[client_msg_id] = frame
        await self._send(frame)
        return client_msg_id

    async def regenerate(self, message_id: str) -> None:
        """Ask for another reply to the user message ``message_id`` answers."""
        await self._send({"type": "regenerate", "message_id": message_id})

    async def switch(self, message_id: str) -> None:
        """Show the newest branch under ``message_id`` (every socket gets ``branch``)."""
        await self._send({"type": "switch", "message_id": message_id})

    async def cancel(self, generation_id: str | None = None) -> None:
        frame: dict[str, Any] = {"type": "cancel"}
        if generation_id:
            frame["generation_id"] = generation_id
        await self._send(frame)

    async def get_history(self, before: str | None = None, limit: int = 50) -> None:
        """Ask for a page of history; it arrives as a ``history`` event."""
        frame: dict[str, Any] = {"type": "get_history", "limit": limit}
        if before:
            frame["before"] = before
        await self._send(frame)

    async def ping(self) -> None:
        await self._send({"type": "ping"})

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Every event, in order, across reconnects, until ``close()``."""
        failures = 0
        while not self._closed:
            if self._backlog:
                event = self._backlog.pop(0)
                if self._observe(event):
                    yield event
                continue
            try:
                raw = await self._ws.recv()
            except ConnectionClosed as exc:
                if self._closed:
                    return
                code = exc.rcvd.code if exc.rcvd else None
                if code in _FINAL:
                    raise ChatClosed(f"closed by the server with {code}", final=True) from exc
                failures = await self._reconnect(failures)
                continue
            failures = 0
            event = orjson.loads(raw)
            if self._observe(event):
                yield event

    def _observe(self, event: dict[str, Any]) -> bool:
        """Track position and prompts; False for an event already delivered."""
        if "id" in event:
            if self.last_event_id is not None and _key(event["id"]) <= _key(self.last_event_id):
                # The original ``message`` of a prompt sent again after a
                # reconnect: it confirms the prompt, but the caller has seen it.
                self._confirm(event)
                return False
            self.last_event_id = event["id"]
        if event["type"] == "ready":
            self.epoch = event["epoch"]
            if self._joined and self.last_event_id is None and event.get("last_event_id"):
                # Back after a drop without having seen any event (we joined
                # a thread that had none): there is no id to resume after, so
                # what happened meanwhile cannot be had. Say so, never skip it.
                event["recovered"] = False
            self._joined = True
            if event.get("recovered") is False or (
                self.last_event_id is None and not event.get("generating")
            ):
                # Resume impossible (data trimmed or lost): restart from now.
                # Or a first join of an idle thread: no replay follows, every
                # later event reaches us, so a reconnect resumes from here
                # (without ``after`` it would silently skip what it missed).
                self.last_event_id = event.get("last_event_id")
        elif event["type"] in ("message", "queued"):
            self._confirm(event)
        elif (
            event["type"] == "error" and event.get("code") in _PROMPT_REFUSALS and self._unconfirmed
        ):
            # The server answers a socket's frames in order: a refusal of this
            # kind answers the oldest prompt still waiting. It is the caller's
            # to send again (say, after thread_busy), not ours.
            self._unconfirmed.pop(next(iter(self._unconfirmed)))
        return True

    def _confirm(self, event: dict[str, Any]) -> None:
        """A prompt's ``message`` (or its ``queued``, while it waits its turn)
        confirms it: it is no longer sent again after a reconnect."""
        if event["type"] == "message":
            self._unconfirmed.pop(event["message"].get("client_msg_id") or "", None)
        elif event["type"] == "queued":
            self._unconfirmed.pop(event.get("client_msg_id") or "", None)

    async def _reconnect(self, failures: int) -> int:
        self._connected.clear()
        while True:
            if self._max_reconnects is not None and failures >= self._max_reconnects:
                raise ChatClosed("could not reconnect")
            await asyncio.sleep(self._delays[min(failures, len(self._delays) - 1)])
            failures += 1
            try:
                await self.connect()
                self.reconnects += 1
                return failures
            except ChatClosed as exc:
                if exc.final:
                    raise
            except (TimeoutError, OSError, websockets.InvalidHandshake):
                continue


def _refusal_reason(body: bytes | bytearray) -> str:
    """``: <why>`` from a refused upgrade's JSON body (``{"error": {...}}``),
    or nothing when there is none."""
    try:
        error = orjson.loads(body)["error"]
        return f": {error['message']} ({error['code']})"
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return ""
