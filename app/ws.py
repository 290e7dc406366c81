"""The WebSocket edge of protocol v1 (the seed demo's protocol is app.seed).

This is the one place where frames become domain calls and where errors
become ``error`` events or close codes. A socket holds no domain state: its
``Follower`` (app.chat.follower) says what it has been sent, and everything
else lives in Redis, so a client may reconnect to any pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, WebSocket
from redis.exceptions import RedisError
from starlette import status
from starlette.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect, WebSocketState

from app import metrics, uvicorn_adapter
from app.auth import Authenticator, AuthError, chosen_subprotocol
from app.chat import keys
from app.chat import tasks as background
from app.chat.errors import ChatError, Forbidden, NotFound, RateLimited, ThreadBusy
from app.chat.fanout import FanoutUnavailable
from app.chat.follower import ACCESS_REVOKED, THREAD_DELETED, TOO_SLOW, Follower
from app.chat.keys import ThreadId, UserId
from app.chat.service import ChatService, Opened
from app.chat.timeline import TimelineEvent
from app.protocol import (
    BadFrame,
    Cancel,
    ErrorCode,
    ErrorEvent,
    GetHistory,
    History,
    Ping,
    Pong,
    Prompt,
    Ready,
    Regenerate,
    Resume,
    Switch,
    encode,
    parse_client_frame,
)

log = logging.getLogger(__name__)
router = APIRouter()

# Close codes (PROTOCOL.md "Close codes") are starlette.status's WS_* names.
# How long a close frame may take to go out before the connection is cut.
CLOSE_TIMEOUT_S = 1.0


async def admit(ws: WebSocket, raw_thread: str) -> tuple[ChatService, ThreadId, UserId] | None:
    """Validate the thread id and the caller before any Redis key is built;
    on refusal the socket is closed and None returned."""
    service: ChatService = ws.app.state.chat
    authenticator: Authenticator = ws.app.state.auth
    if not ws.app.state.origins.allows(ws):
        # Cross-site WebSocket hijacking: a foreign page's socket is refused
        # before the upgrade (HTTP 403), whatever credentials it carries.
        await refuse(ws, "forbidden", "origin not allowed")
        return None
    try:
        thread = keys.thread_id(raw_thread)
    except keys.InvalidId as exc:
        await refuse(ws, "bad_request", str(exc))
        return None
    try:
        user = authenticator.user_for(ws)
    except AuthError as exc:
        await refuse(ws, "unauthorized", str(exc))
        return None
    if service.draining:
        await ws.close(status.WS_1012_SERVICE_RESTART, reason="server restarting")
        return None
    return service, thread, user


async def refuse(ws: WebSocket, code: str, reason: str) -> None:
    """Refuse a socket before the upgrade: HTTP 403 whose JSON body (REST's
    error shape) says why, for clients that are not browsers (a browser's
    WebSocket API never shows it), and the reason in the pod's log. Reasons
    come from our own checks, never a token or a secret; the logged path
    leaves out the query string (it may hold ``?token=``)."""
    reason = reason[:200]
    log.info("socket refused before the upgrade (%s): %s", ws.url.path, reason)
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        body = {"error": {"code": code, "message": reason}}
        await ws.send_denial_response(JSONResponse(body, status_code=403))
    else:  # a server without the denial extension: a bare 403 (reason in the close)
        await ws.close(status.WS_1008_POLICY_VIOLATION, reason=reason[:120])


async def open_thread(
    ws: WebSocket, service: ChatService, thread: ThreadId, user: UserId,
    after: str | None, epoch: str | None,
) -> Any:  # fmt: skip
    """Accept the socket and join the thread, or close it with the right code."""
    # Accepted before the limits are checked: only an accepted socket can be
    # told 1013 (try again later) and why, in an error event.
    await ws.accept(subprotocol=chosen_subprotocol(ws))
    try:
        return await service.open(thread, user, after, epoch)
    except (Forbidden, NotFound) as exc:
        await ws.close(status.WS_1008_POLICY_VIOLATION, reason=str(exc))
    except RateLimited as exc:
        event = ErrorEvent(
            thread_id=thread, code="rate_limited", message=str(exc), retryable=exc.retryable,
            retry_after_ms=exc.retry_after_ms,
        )  # fmt: skip
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await ws.send_text(encode(event))
        await ws.close(
            status.WS_1013_TRY_AGAIN_LATER if exc.retryable else status.WS_1008_POLICY_VIOLATION,
            reason=str(exc)[:120],
        )
    except (FanoutUnavailable, RedisError, OSError) as exc:
        log.warning(
            "cannot open thread %s: %s", thread, exc, extra={"thread_id": thread, "user_id": user}
        )
        await ws.close(status.WS_1013_TRY_AGAIN_LATER, reason="storage unavailable, retry")
    return None


async def thread_socket(ws: WebSocket) -> None:
    admitted = await admit(ws, ws.path_params["thread_id"])
    if admitted is None:
        return
    service, thread, user = admitted
    after = ws.query_params.get("after")
    epoch = ws.query_params.get("epoch")
    if after is not None:
        try:
            keys.event_id(after)
        except keys.InvalidId as exc:
            await refuse(ws, "bad_request", f"after: {exc}")
            return
    session = await _open_session(ws, service, thread, user, after, epoch)
    if session is None:
        return
    metrics.SOCKETS_OPEN.inc()
    try:
        await session.run()
    finally:
        metrics.SOCKETS_OPEN.dec()
        await service.close(session.follower)


# A plain Starlette route, not FastAPI's: the socket needs no dependency
# injection, and FastAPI's machinery cost a sixth of a connect's CPU and
# frames kept for the socket's whole life.
router.add_websocket_route("/v1/threads/{thread_id}/ws", thread_socket)


async def _open_session(
    ws: WebSocket, service: ChatService, thread: ThreadId, user: UserId,
    after: str | None, epoch: str | None,
) -> ThreadSession | None:  # fmt: skip
    """The session of an opened socket. Its ``Opened`` (the ``ready`` model and
    the replay) is not kept by the caller, who may then hold the socket for hours."""
    opened = await open_thread(ws, service, thread, user, after, epoch)
    return None if opened is None else ThreadSession(ws, service, thread, user, opened)


class ThreadSession:
    """One protocol-v1 socket on one thread: a reader loop and a writer task."""

    __slots__ = ("_greeting", "_sending", "follower", "service", "thread", "user", "ws")

    def __init__(
        self, ws: WebSocket, service: ChatService, thread: ThreadId, user: UserId,
        opened: Opened,
    ) -> None:  # fmt: skip
        self.ws = ws
        self.service = service
        self.thread = thread
        self.user = user
        self.follower: Follower = opened.follower
        # ``ready`` and the catch-up, until the writer has sent them: a replay
        # can be long, and is not worth keeping for the socket's idle life.
        self._greeting: tuple[str, list[TimelineEvent]] | None = (
            encode(Ready.of(opened.ready)),
            opened.replay,
        )
        # Serialises sends: the writer's live events, replies, and resume
        # replays must never interleave inside the follower's ordering rule.
        self._sending = asyncio.Lock()

    async def send_text(self, text: str) -> None:
        async with self._sending:
            await self.ws.send_text(text)

    async def send_events(
        self, events: list[TimelineEvent], restart_after: str | None = None
    ) -> None:
        """Send catch-up events in order; with ``restart_after``, first restart
        the stream after that id (a ``resume``). One hold of the send lock for
        both, so no live event can slip in between and mask the replay."""
        async with self._sending:
            if restart_after is not None:
                self.follower.restart_from(keys.event_id(restart_after))
            for event in events:
                if self.follower.claim(event):
                    await self.ws.send_text(event.frame)
                    metrics.EVENTS_DELIVERED.inc()

    async def run(self) -> None:
        """Serve the socket: ``ready``, the catch-up, then live events, until
        the client leaves or the follower must be closed."""
        await supervise(self.ws, self.follower, self._read_forever(), self._write_forever())

    async def _write_forever(self) -> None:
        try:
            await self._send_greeting()
            while True:
                event = await self.follower.next_event()
                async with self._sending:
                    if self.follower.claim(event):
                        await self.ws.send_text(event.frame)
                        metrics.EVENTS_DELIVERED.inc()
        except (WebSocketDisconnect, RuntimeError, OSError):
            return  # the client is gone

    async def _send_greeting(self) -> None:
        if self._greeting is None:
            return
        ready, replay = self._greeting
        self._greeting = None
        await self.send_text(ready)
        await self.send_events(replay)

    async def _read_forever(self) -> None:
        max_bytes = self.service.settings.chat_max_frame_bytes
        while True:
            try:
                message = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                await self._error("bad_request", "binary frames are not accepted; send JSON text")
                continue
            await self._handle(text, max_bytes)

    async def _handle(self, text: str, max_bytes: int) -> None:
        try:
            frame = parse_client_frame(text, max_bytes)
            handler = self._handlers[type(frame)]
            await handler(self, frame)
        except BadFrame as exc:
            await self._error(exc.code, exc.message)
        except ChatError as exc:
            if isinstance(exc, ThreadBusy):
                metrics.THREAD_BUSY.inc()
            await self._error(
                exc.code, str(exc), retryable=exc.retryable, retry_after_ms=exc.retry_after_ms
            )
        except (RedisError, OSError) as exc:
            metrics.REDIS_ERRORS.labels("socket").inc()
            log.warning(
                "storage error on thread %s: %s", self.thread, exc,
                extra={"thread_id": self.thread, "user_id": self.user},
            )  # fmt: skip
            await self._error("unavailable", "storage is unavailable; retry", retryable=True)
        except (WebSocketDisconnect, asyncio.CancelledError):
            raise
        except Exception:
            log.exception(
                "unexpected error on thread %s", self.thread,
                extra={"thread_id": self.thread, "user_id": self.user},
            )  # fmt: skip
            await self._error("internal", "internal error", retryable=True)

    async def _error(
        self, code: ErrorCode, message: str, retryable: bool = False,
        retry_after_ms: int | None = None,
    ) -> None:  # fmt: skip
        event = ErrorEvent(
            thread_id=self.thread, code=code, message=message, retryable=retryable,
            retry_after_ms=retry_after_ms,
        )  # fmt: skip
        if self.ws.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                await self.send_text(encode(event))

    # --- one handler per client frame type --------------------------------

    async def _prompt(self, frame: Prompt) -> None:
        limit = self.service.settings.chat_max_prompt_chars
        if len(frame.content) > limit:
            raise BadFrame("too_large", f"content longer than {limit} characters")
        original = await self.service.prompt(
            self.thread, self.user, frame.content, frame.client_msg_id,
            frame.parent_id, frame.branches,
        )  # fmt: skip
        if original is not None:
            await self.send_text(original)

    async def _regenerate(self, frame: Regenerate) -> None:
        original = await self.service.regenerate(
            self.thread, self.user, frame.message_id, frame.client_msg_id
        )
        if original is not None:
            await self.send_text(original)

    async def _switch(self, frame: Switch) -> None:
        await self.service.switch(self.thread, self.user, frame.message_id)

    async def _get_history(self, frame: GetHistory) -> None:
        messages, has_more = await self.service.history_page(
            self.thread, frame.before, frame.limit, self.user, frame.leaf
        )
        reply = History.of(self.thread, messages, has_more)
        await self.send_text(encode(reply))

    async def _cancel(self, frame: Cancel) -> None:
        if frame.queue_id is not None:
            await self.service.cancel_queued(self.thread, self.user, frame.queue_id)
        elif await self.service.cancel(self.thread, frame.generation_id) is None:
            await self._error("not_found", "no matching turn is running")

    async def _resume(self, frame: Resume) -> None:
        resumed = await self.service.resume(self.thread, frame.after, frame.epoch)
        if resumed.replay is None:
            await self._error("resume_gap", "events after that id are gone: reload the history")
            return
        await self.send_events(resumed.replay, restart_after=frame.after)

    async def _ping(self, frame: Ping) -> None:
        await self.send_text(encode(Pong(thread_id=self.thread)))

    _handlers: dict[type, Callable[[ThreadSession, Any], Awaitable[None]]] = {
        Prompt: _prompt,
        Regenerate: _regenerate,
        Switch: _switch,
        GetHistory: _get_history,
        Cancel: _cancel,
        Resume: _resume,
        Ping: _ping,
    }


async def supervise(
    ws: WebSocket, follower: Follower, reader: Awaitable[None], writer: Awaitable[None]
) -> None:
    """Run a socket's reader and writer until either ends, or until its
    follower must be closed (slow client, thread reset): then close it 1013.

    Every idle socket of the pod sits in here, so the wait is kept small:
    ``must_close`` is a future, not a third task waiting on it, and the first
    to end resolves one future (not asyncio.wait, whose own coroutines, sets
    and closures would be held for the socket's whole life)."""
    tasks = [asyncio.ensure_future(reader), asyncio.ensure_future(writer)]
    must_close = follower.must_close
    first: asyncio.Future[asyncio.Future[None]] = asyncio.get_running_loop().create_future()

    def ended(future: asyncio.Future[None]) -> None:
        if not first.done():
            first.set_result(future)

    for future in (*tasks, must_close):
        future.add_done_callback(ended)
    try:
        ended_first = await first
    finally:
        must_close.remove_done_callback(ended)
        # Cancelled until done (a cancel can be lost, see app.chat.tasks): a
        # reader left waiting for a frame would hold up the close for resume.
        await background.stop_all(tasks, background.RELEASE_S, quiet=True)
    if ended_first is must_close and follower.closing is not None:
        await _close_for_resume(ws, follower.closing)


async def _close_for_resume(ws: WebSocket, reason: str) -> None:
    """Close 1013 so the client resumes with ``after`` (1008 when the thread
    was deleted or its user removed: resuming would be refused). A client that
    stopped reading cannot even receive the close frame (uvicorn waits for the
    buffer to drain before any send), so after CLOSE_TIMEOUT_S its connection is cut."""
    log.info("closing a socket for resume: %s", reason)
    if reason == TOO_SLOW:
        metrics.SLOW_CLIENT_DROPS.inc()
    code = (
        status.WS_1008_POLICY_VIOLATION
        if reason in (THREAD_DELETED, ACCESS_REVOKED)
        else status.WS_1013_TRY_AGAIN_LATER
    )
    try:
        await asyncio.wait_for(ws.close(code, reason=reason), CLOSE_TIMEOUT_S)
    except (TimeoutError, WebSocketDisconnect, RuntimeError, OSError):
        uvicorn_adapter.abort(ws)
