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
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, WebSocket
from redis.exceptions import RedisError
from starlette import status
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect, WebSocketState

from app import metrics, uvicorn_adapter
from app.auth import Authenticator, AuthError, chosen_subprotocol
from app.chat import keys
from app.chat import tasks as background
from app.chat.errors import ChatError, ClientGone, Forbidden, NotFound, RateLimited, ThreadBusy
from app.chat.fanout import FanoutUnavailable
from app.chat.follower import ACCESS_REVOKED, THREAD_DELETED, TOO_SLOW, USER_ERASED, Follower
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
    Join,
    Leave,
    Ping,
    Pong,
    Prompt,
    Read,
    Regenerate,
    Resume,
    Switch,
    Typing,
    encode,
    parse_client_frame,
    ready_frame,
)

log = logging.getLogger(__name__)
router = APIRouter()

# Close codes (PROTOCOL.md "Close codes") are starlette.status's WS_* names.
# How long a close frame may take to go out before the connection is cut.
CLOSE_TIMEOUT_S = 1.0
BINARY_REFUSED = "binary frames are not accepted; send JSON text"


async def admit(ws: WebSocket, raw_thread: str) -> tuple[ChatService, ThreadId, UserId] | None:
    """Validate the thread id and the caller before any Redis key is built;
    on refusal the socket is closed and None returned."""
    admitted = await _admit(ws, raw_thread)
    if admitted is None or admitted[1] is None:
        return None
    return admitted[0], admitted[1], admitted[2]


async def admit_caller(ws: WebSocket) -> tuple[ChatService, UserId] | None:
    """As ``admit``, for a socket of no one thread (the user socket)."""
    admitted = await _admit(ws, None)
    return None if admitted is None else (admitted[0], admitted[2])


async def _admit(
    ws: WebSocket, raw_thread: str | None
) -> tuple[ChatService, ThreadId | None, UserId] | None:
    service: ChatService = ws.app.state.chat
    authenticator: Authenticator = ws.app.state.auth
    if not ws.app.state.origins.allows(ws):
        # Cross-site WebSocket hijacking: a foreign page's socket is refused
        # before the upgrade (HTTP 403), whatever credentials it carries.
        await refuse(ws, "forbidden", "origin not allowed")
        return None
    thread = None
    if raw_thread is not None:
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
        return await service.open(
            thread, user, after, epoch, client_gone=lambda: uvicorn_adapter.client_gone(ws)
        )
    except ClientGone:
        return None  # nobody to tell
    except (Forbidden, NotFound, RateLimited, FanoutUnavailable, RedisError, OSError) as exc:
        await close_unopened(ws, thread, user, exc)
    return None


async def close_unopened(
    ws: WebSocket, thread: ThreadId | None, user: UserId, exc: Exception
) -> None:
    """Close an accepted socket that could not open: 1008 for a refusal, 1013
    (retry) when over a limit or when storage is unavailable."""
    if isinstance(exc, Forbidden | NotFound):
        await ws.close(status.WS_1008_POLICY_VIOLATION, reason=str(exc))
    elif isinstance(exc, RateLimited):
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
    else:
        log.warning(
            "cannot open a socket of %s: %s",
            user,
            exc,
            extra={"thread_id": thread, "user_id": user},
        )
        await ws.close(status.WS_1013_TRY_AGAIN_LATER, reason="storage unavailable, retry")


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


# The route says where the socket is (app.schema documents the pod's sockets
# from its routes); ThreadSockets below serves it before any routing.
router.add_websocket_route("/v1/threads/{thread_id}/ws", thread_socket)
THREAD_SOCKET_PATH = re.compile(r"/v1/threads/([^/]+)/ws")


class ThreadSockets:
    """The ASGI app a pod serves (app.cli): ``/v1/threads/{thread_id}/ws``
    served by ``thread_socket`` itself, ahead of the FastAPI ``app`` that
    serves everything else. No route of the socket needs the app's routers,
    middleware or telemetry (it answers its own errors): they cost a tenth
    of a connect's CPU, and their coroutines stayed alive for the socket's
    whole life (five more objects per idle socket for every collection of
    the garbage collector to walk)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        thread = _thread_socket_path(scope) if scope["type"] == "websocket" else None
        if thread is None:
            await self.app(scope, receive, send)
            return
        scope["app"] = self.app  # what Starlette's own routing would have set
        scope["path_params"] = {"thread_id": thread}
        await thread_socket(WebSocket(scope, receive, send))


def _thread_socket_path(scope: Scope) -> str | None:
    """The raw thread id of a thread socket's path, else None."""
    path, root = scope["path"], scope.get("root_path", "")
    match = THREAD_SOCKET_PATH.fullmatch(path.removeprefix(root) if root else path)
    return None if match is None else match.group(1)


async def _open_session(
    ws: WebSocket, service: ChatService, thread: ThreadId, user: UserId,
    after: str | None, epoch: str | None,
) -> ThreadSession | None:  # fmt: skip
    """The session of an opened socket. Its ``Opened`` (the ``ready`` model and
    the replay) is not kept by the caller, who may then hold the socket for hours."""
    opened = await open_thread(ws, service, thread, user, after, epoch)
    return None if opened is None else ThreadSession(ws, service, thread, user, opened)


class SharedFrames:
    """Live events written once per pod: each event's frame is encoded once
    and the same bytes handed to every ready socket's transport
    (app.uvicorn_adapter.FrameWriter), instead of one ASGI send per socket.

    A follower whose queue gets an event is put on the ready list; a
    callback (not a task per socket) drains the list, writing each
    follower's queued events in order. A socket whose state is not plain (a
    send of its own in progress, its write buffer above the high-water mark,
    a close started) is left to its writer task, which sends the ASGI way;
    its queue, and so the slow-client rule, is the same either way.

    A big room (ten thousand sockets of one thread on a pod) must neither
    stall the event loop for one frame nor hold back other threads' frames
    behind its own: ready sockets wait per thread, each round writes at most
    ROUND of every thread's, and the drain stops after SLICE_S; the next
    slice runs after the loop has polled its sockets and run what else was
    ready (``call_soon``)."""

    __slots__ = ("_rooms", "_scheduled")

    def __init__(self) -> None:
        # Ready sockets by thread, threads in the order they became ready.
        self._rooms: dict[ThreadId, deque[ThreadStream]] = {}
        self._scheduled = False

    def ready(self, stream: ThreadStream) -> None:
        room = self._rooms.get(stream.thread)
        if room is None:
            room = self._rooms[stream.thread] = deque()
        room.append(stream)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._drain)

    def _drain(self) -> None:
        rooms = self._rooms
        deadline = time.perf_counter() + SLICE_S
        # Each event's frame, encoded once per slice (kept by id: the event
        # itself is held beside its bytes, so the id is not reused).
        frames: dict[int, tuple[TimelineEvent, bytes]] = {}
        written = 0
        while rooms and time.perf_counter() < deadline:
            for thread in list(rooms):
                room = rooms[thread]
                for _ in range(min(ROUND, len(room))):
                    written += room.popleft().write_shared(frames)
                if not room:
                    del rooms[thread]
        if written:
            metrics.EVENTS_DELIVERED.inc(written)
        if rooms:
            asyncio.get_running_loop().call_soon(self._drain)
        else:
            self._scheduled = False


# The most a socket's greeting (``ready``, the catch-up, the first presence)
# may hold (characters) to be written at once (ThreadStream._greet_at_once).
GREETING_CHARS = 16384
# A slice of SharedFrames' writing (the loop's longest stall for one frame is
# about this), and how many sockets of one thread a round writes.
SLICE_S = 0.002
ROUND = 64


class SocketOut:
    """A socket's sending side: one lock serialises every send, so live events,
    replies and resume replays never interleave inside a follower's ordering
    rule, whichever thread of the socket they belong to. Live events may
    also be written as shared frames (``SharedFrames``), but only while the
    lock is free, so never between another send's parts."""

    __slots__ = ("_sending", "ws")

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self._sending = asyncio.Lock()

    async def send_text(self, text: str) -> None:
        async with self._sending:
            await self.ws.send_text(text)

    async def send_events(
        self, follower: Follower, events: list[TimelineEvent], restart_after: str | None = None
    ) -> None:
        """Send catch-up events in order; with ``restart_after``, first restart
        the stream after that id (a ``resume``). One hold of the send lock for
        both, so no live event can slip in between and mask the replay."""
        async with self._sending:
            if restart_after is not None:
                follower.restart_from(keys.event_id(restart_after))
            for event in events:
                if follower.claim(event):
                    await self.ws.send_text(event.frame)
                    metrics.EVENTS_DELIVERED.inc()

    async def error(
        self, thread: str | None, code: ErrorCode, message: str, retryable: bool = False,
        retry_after_ms: int | None = None,
    ) -> None:  # fmt: skip
        event = ErrorEvent(
            thread_id=thread, code=code, message=message, retryable=retryable,
            retry_after_ms=retry_after_ms,
        )  # fmt: skip
        if self.ws.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                await self.send_text(encode(event))

    async def answer(self, thread: str | None, user: UserId, call: Awaitable[None]) -> None:
        """Run one frame's handling; its errors become ``error`` events (about
        ``thread``), never a closed socket."""
        try:
            await call
        except BadFrame as exc:
            await self.error(thread, exc.code, exc.message)
        except ChatError as exc:
            if isinstance(exc, ThreadBusy):
                metrics.THREAD_BUSY.inc()
            await self.error(
                thread, exc.code, str(exc), retryable=exc.retryable,
                retry_after_ms=exc.retry_after_ms,
            )  # fmt: skip
        except (RedisError, OSError) as exc:
            metrics.REDIS_ERRORS.labels("socket").inc()
            log.warning(
                "storage error on thread %s: %s", thread, exc,
                extra={"thread_id": thread, "user_id": user},
            )  # fmt: skip
            await self.error(thread, "unavailable", "storage is unavailable; retry", retryable=True)
        except (WebSocketDisconnect, asyncio.CancelledError):
            raise
        except Exception:
            log.exception(
                "unexpected error on thread %s", thread,
                extra={"thread_id": thread, "user_id": user},
            )  # fmt: skip
            await self.error(thread, "internal", "internal error", retryable=True)

    async def read_frames(
        self, max_bytes: int, handle: Callable[[Any], Awaitable[None]], thread: str | None
    ) -> None:
        """Read client frames until the client leaves; each parsed frame goes
        to ``handle`` (bad ones are answered here, with an error about
        ``thread``: the thread socket's own)."""
        while True:
            try:
                message = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                await self.error(thread, "bad_request", BINARY_REFUSED)
                continue
            try:
                frame = parse_client_frame(text, max_bytes)
            except BadFrame as exc:
                await self.error(thread, exc.code, exc.message)
                continue
            await handle(frame)


class ThreadStream:
    """One thread followed on a socket (a thread socket's only one, or one a
    user socket joined): its ``ready`` and catch-up, its live events, and the
    frames about it. The same code serves both socket kinds."""

    __slots__ = ("_frames", "_greeting", "follower", "out", "service", "thread", "user")

    def __init__(
        self, out: SocketOut, service: ChatService, thread: ThreadId, user: UserId,
        opened: Opened,
    ) -> None:  # fmt: skip
        self.out = out
        self.service = service
        self.thread = thread
        self.user = user
        self.follower: Follower = opened.follower
        # ``ready`` and the catch-up, until the writer has sent them: a replay
        # can be long, and is not worth keeping for the socket's idle life.
        self._greeting: tuple[str, list[TimelineEvent]] | None = (
            ready_frame(opened.ready),
            opened.replay,
        )
        self._frames: uvicorn_adapter.FrameWriter | None = None

    async def write_forever(self) -> None:
        """``ready``, the catch-up, then live events, until the client is gone.
        Once the catch-up is sent, live events are written as shared frames
        where the socket allows (``SharedFrames``); this task sends the rest."""
        try:
            self._frames = uvicorn_adapter.frame_writer(self.out.ws)
            if self._greeting is not None:
                ready, replay = self._greeting
                self._greeting = None
                if not self._greet_at_once(ready, replay):
                    await self.out.send_text(ready)
                    await self.out.send_events(self.follower, replay)
            if self._frames is not None:
                frames: SharedFrames = self.out.ws.app.state.frames
                self.follower.on_ready = lambda: frames.ready(self)
            while True:
                event = await self.follower.next_event()
                async with self.out._sending:
                    if self.follower.claim(event):
                        await self.out.ws.send_text(event.frame)
                        metrics.EVENTS_DELIVERED.inc()
        except (WebSocketDisconnect, RuntimeError, OSError):
            return  # the client is gone
        finally:
            self.follower.on_ready = None
            self._frames = None

    def _greet_at_once(self, ready: str, replay: list[TimelineEvent]) -> bool:
        """Write ``ready``, the catch-up and what the queue holds already (the
        join's ``presence``) as one write to the socket's transport, when the
        socket is plain and they are at most GREETING_CHARS long: a connect's
        frames then cost one send, not one each. False, with nothing sent,
        when they must take the ASGI sends instead (a long catch-up among
        them: those sends wait for a slow client, one write would not)."""
        writer, follower = self._frames, self.follower
        if writer is None or self.out._sending.locked() or not writer.plain():
            return False
        queued: list[TimelineEvent] = []
        while (event := follower.take()) is not None:
            queued.append(event)
        frames = [ready, *(event.frame for event in replay), *(event.frame for event in queued)]
        if sum(map(len, frames)) > GREETING_CHARS:
            for event in reversed(queued):
                follower.put_back(event)
            return False
        written = [uvicorn_adapter.text_frame(ready)]
        for event in (*replay, *queued):
            if follower.claim(event):
                written.append(uvicorn_adapter.text_frame(event.frame))
        writer.write(b"".join(written))
        metrics.EVENTS_DELIVERED.inc(len(written) - 1)
        return True

    def write_shared(self, frames: dict[int, tuple[TimelineEvent, bytes]]) -> int:
        """Write the follower's queued events as shared frames, in order;
        what cannot be written so is left to this stream's writer task.
        Returns how many frames were written."""
        writer, follower = self._frames, self.follower
        if writer is None or follower.closing is not None:
            return 0
        written = 0
        sending = self.out._sending
        while (event := follower.take()) is not None:
            if sending.locked() or not writer.plain():
                # A send of its own in progress, or the socket's state is not
                # plain: the event goes back first in line, for the writer task.
                follower.put_back(event)
                follower.wake()
                break
            if not follower.claim(event):
                continue
            shared = frames.get(id(event))
            if shared is None:
                shared = frames[id(event)] = (event, uvicorn_adapter.text_frame(event.frame))
            writer.write(shared[1])
            written += 1
        return written

    async def handle(self, frame: Any) -> None:
        """Answer one frame about this thread (errors become ``error`` events)."""
        await self.out.answer(self.thread, self.user, self._handlers[type(frame)](self, frame))

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
            await self.out.send_text(original)

    async def _regenerate(self, frame: Regenerate) -> None:
        original = await self.service.regenerate(
            self.thread, self.user, frame.message_id, frame.client_msg_id
        )
        if original is not None:
            await self.out.send_text(original)

    async def _switch(self, frame: Switch) -> None:
        await self.service.switch(self.thread, self.user, frame.message_id)

    async def _get_history(self, frame: GetHistory) -> None:
        messages, has_more = await self.service.history_page(
            self.thread, frame.before, frame.limit, self.user, frame.leaf
        )
        reply = History.of(self.thread, messages, has_more)
        await self.out.send_text(encode(reply))

    async def _cancel(self, frame: Cancel) -> None:
        if frame.queue_id is not None:
            await self.service.cancel_queued(self.thread, self.user, frame.queue_id)
        elif await self.service.cancel(self.thread, frame.generation_id, self.user) is None:
            await self.out.error(self.thread, "not_found", "no matching turn is running")

    async def _resume(self, frame: Resume) -> None:
        resumed = await self.service.resume(self.thread, frame.after, frame.epoch)
        if resumed.replay is None:
            await self.out.error(
                self.thread, "resume_gap", "events after that id are gone: reload the history"
            )
            return
        await self.out.send_events(self.follower, resumed.replay, restart_after=frame.after)

    async def _read(self, frame: Read) -> None:
        await self.service.read(self.thread, self.user, frame.message_id)

    async def _typing(self, frame: Typing) -> None:
        await self.service.typing(self.thread, self.user)

    _handlers: dict[type, Callable[[ThreadStream, Any], Awaitable[None]]] = {
        Prompt: _prompt,
        Regenerate: _regenerate,
        Switch: _switch,
        GetHistory: _get_history,
        Cancel: _cancel,
        Resume: _resume,
        Read: _read,
        Typing: _typing,
    }


# The frames a ThreadStream answers (the thread frames of either socket kind).
THREAD_FRAMES = tuple(ThreadStream._handlers)


class ThreadSession:
    """One protocol-v1 socket on one thread: a reader loop and a writer task."""

    __slots__ = ("out", "stream")

    def __init__(
        self, ws: WebSocket, service: ChatService, thread: ThreadId, user: UserId,
        opened: Opened,
    ) -> None:  # fmt: skip
        self.out = SocketOut(ws)
        self.stream = ThreadStream(self.out, service, thread, user, opened)

    @property
    def follower(self) -> Follower:
        return self.stream.follower

    async def run(self) -> None:
        """Serve the socket: ``ready``, the catch-up, then live events, until
        the client leaves or the follower must be closed."""
        stream = self.stream
        max_bytes = stream.service.settings.chat_max_frame_bytes
        reader = self.out.read_frames(max_bytes, self._handle, stream.thread)
        await supervise(self.out.ws, self.follower, reader, stream.write_forever())

    async def _handle(self, frame: Any) -> None:
        stream = self.stream
        if isinstance(frame, Ping):
            await self.out.send_text(encode(Pong(thread_id=stream.thread)))
        elif isinstance(frame, Join | Leave):
            await self.out.error(stream.thread, "bad_request", f"{frame.type}: only on /v1/ws")
        elif frame.thread_id not in (None, stream.thread):
            await self.out.error(stream.thread, "bad_request", "thread_id: not this socket's")
        else:
            await stream.handle(frame)


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
    was deleted, its user removed or erased: resuming would be refused). A client that
    stopped reading cannot even receive the close frame (uvicorn waits for the
    buffer to drain before any send), so after CLOSE_TIMEOUT_S its connection is cut."""
    log.info("closing a socket for resume: %s", reason)
    if reason == TOO_SLOW:
        metrics.SLOW_CLIENT_DROPS.inc()
    code = (
        status.WS_1008_POLICY_VIOLATION
        if reason in (THREAD_DELETED, ACCESS_REVOKED, USER_ERASED)
        else status.WS_1013_TRY_AGAIN_LATER
    )
    try:
        await asyncio.wait_for(ws.close(code, reason=reason), CLOSE_TIMEOUT_S)
    except (TimeoutError, WebSocketDisconnect, RuntimeError, OSError):
        uvicorn_adapter.abort(ws)
