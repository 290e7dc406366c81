"""The thread protocol without a WebSocket: Server-Sent Events and HTTP posts.

For proxies that break WebSockets, serverless callers, and stopping a reply
after the browser closed (PROTOCOL.md "Without a WebSocket"):

- ``GET /v1/threads/{id}/events`` streams what a thread socket receives:
  ``ready``, the catch-up, then the live timeline, each event as one SSE
  message (``id:`` the event id, ``event:`` its type, ``data:`` its frame,
  byte for byte the socket's). It is a socket in all but transport: the same
  ``ChatService.open`` (limits, access, thread creation), the same follower
  on the pod's fan-out hub, the same ordering rule. ``Last-Event-ID`` (what
  ``EventSource`` sends when it reconnects) or ``?after=`` resumes, with
  ``?epoch=``; comments keep idle proxies from cutting the stream.
- ``POST .../messages``, ``GET .../messages``, ``POST .../regenerate`` and
  ``POST .../cancel`` are the ``prompt``, ``get_history``, ``regenerate`` and
  ``cancel`` frames as requests.

Authentication, origins, limits and error bodies are the REST API's
(app.rest): domain errors raised here become its JSON errors.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from app import metrics
from app.chat import keys
from app.chat.errors import NotFound
from app.chat.follower import Follower
from app.chat.keys import ThreadId
from app.chat.service import ChatService, Opened
from app.chat.timeline import TimelineEvent
from app.protocol import (
    ClientToken,
    EventId,
    History,
    LoadingEvent,
    MessageEvent,
    QueuedEvent,
    ready_frame,
)
from app.rest import Caller, Chat, HttpError, PathThread

router = APIRouter(prefix="/v1/threads", tags=["threads without a WebSocket"])

# EventSource waits this long before it reconnects (sent as ``retry:``).
RECONNECT_MS = 1000


def same_origin(request: Request) -> None:
    """A browser page of a foreign origin is refused, as on a socket."""
    if not request.app.state.origins.allows(request):
        raise HttpError(403, "forbidden", "origin not allowed")


Origin = Depends(same_origin)


class PostMessage(BaseModel):
    """A prompt, as the ``prompt`` frame."""

    model_config = ConfigDict(extra="forbid")
    content: StrictStr = Field(min_length=1)
    client_msg_id: ClientToken | None = Field(
        default=None,
        description="idempotency key: a repeat returns the original message and starts nothing",
    )
    parent_id: EventId | None = Field(
        default=None,
        description="start a branch under this message (null: a new root), as an edit does; "
        "absent: follow the active leaf",
    )


class PostRegenerate(BaseModel):
    """A new reply, as the ``regenerate`` frame."""

    model_config = ConfigDict(extra="forbid")
    message_id: EventId = Field(description="a user message, or the reply to regenerate")
    client_msg_id: ClientToken | None = Field(
        default=None, description="idempotency key: a repeat returns the original `loading`"
    )


class PostCancel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    generation_id: ClientToken | None = Field(
        default=None, description="stop only this generation; default: whatever runs"
    )
    queue_id: EventId | None = Field(
        default=None, description="instead, take this waiting prompt out of the queue"
    )


class CancelAccepted(BaseModel):
    generation_id: str | None = None
    queue_id: str | None = None


_STREAM = {
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "`ready`, then the timeline: `id:` event id, `event:` type, "
        "`data:` the frame (see /asyncapi.json)",
    }
}


@router.get(
    "/{thread_id}/events",
    summary="The thread's events as Server-Sent Events (a socket's stream)",
    response_class=StreamingResponse,
    responses=_STREAM,  # type: ignore[arg-type]
    dependencies=[Origin],
)
async def events(
    thread_id: PathThread,
    user: Caller,
    service: Chat,
    after: Annotated[EventId | None, Query(description="resume after this event id")] = None,
    epoch: Annotated[str | None, Query(max_length=64, description="the epoch of `ready`")] = None,
    last_event_id: Annotated[EventId | None, Header(description="as `after` (EventSource)")] = None,
) -> StreamingResponse:
    thread = keys.thread_id(thread_id)
    if service.draining:
        raise HttpError(503, "unavailable", "server restarting")
    opened = await service.open(thread, user, last_event_id or after, epoch)
    keepalive = service.settings.chat_sse_keepalive_s
    return StreamingResponse(
        _stream(service, opened, keepalive),
        media_type="text/event-stream",
        # No caching, and no buffering by nginx-like proxies: events go out at once.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _stream(service: ChatService, opened: Opened, keepalive_s: float) -> AsyncIterator[str]:
    """``ready``, the catch-up, then live events until the client leaves or
    its follower must close (too slow, thread reset): then the stream ends
    and the client reconnects with ``Last-Event-ID``, as a socket does after 1013."""
    follower = opened.follower
    metrics.SOCKETS_OPEN.inc()
    try:
        yield f"retry: {RECONNECT_MS}\nevent: ready\ndata: {ready_frame(opened.ready)}\n\n"
        for replayed in opened.replay:
            if follower.claim(replayed):
                yield _message(replayed)
        while not service.draining:
            event = await _next_event(follower, keepalive_s)
            if follower.closing is not None:
                return
            if event is None:
                yield ": keep-alive\n\n"
            elif follower.claim(event):
                yield _message(event)
                metrics.EVENTS_DELIVERED.inc()
    finally:
        metrics.SOCKETS_OPEN.dec()
        await service.close(follower)


async def _next_event(follower: Follower, timeout_s: float) -> TimelineEvent | None:
    """The follower's next event; None after ``timeout_s`` idle or once it must close."""
    waiter = asyncio.ensure_future(follower.next_event())
    done, _ = await asyncio.wait(
        (waiter, follower.must_close), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
    )
    if waiter in done:
        return waiter.result()
    # Not resumed yet, so it has taken nothing from the queue: cancelling loses no event.
    waiter.cancel()
    return None


def _message(event: TimelineEvent) -> str:
    # A frame is one line (orjson escapes every newline); its type is read
    # without decoding it (the hub forwards frames, it never parses them).
    if event.n < 0:  # presence: no id, so EventSource's Last-Event-ID stays put
        return f"event: {_type_of(event.frame)}\ndata: {event.frame}\n\n"
    return f"id: {event.id}\nevent: {_type_of(event.frame)}\ndata: {event.frame}\n\n"


def _type_of(frame: str) -> str:
    start = frame.index('"type":"') + len('"type":"')
    return frame[start : frame.index('"', start)]


@router.post(
    "/{thread_id}/messages",
    status_code=202,
    response_model=MessageEvent | QueuedEvent,
    summary="Send a prompt (the `prompt` frame): its `message` event, or `queued` while a "
    "turn runs in a thread whose prompt_policy queues",
    dependencies=[Origin],
)
async def post_message(
    thread_id: PathThread, body: PostMessage, user: Caller, service: Chat
) -> Response:
    thread = keys.thread_id(thread_id)
    limit = service.settings.chat_max_prompt_chars
    if len(body.content) > limit:
        raise HttpError(413, "too_large", f"content longer than {limit} characters")
    await service.threads.require_member(thread, user)
    # The answer is the committed message, found again by its idempotency key:
    # a caller who sent none gets one, so a retried request cannot post twice
    # only if the caller sends its own.
    client_msg_id = body.client_msg_id or f"http-{secrets.token_hex(8)}"
    frame = await service.prompt(
        thread, user, body.content, client_msg_id, body.parent_id,
        "parent_id" in body.model_fields_set,
    )  # fmt: skip
    return await _event_of(service, thread, client_msg_id, frame)


async def _event_of(
    service: ChatService, thread: ThreadId, client_msg_id: str, frame: str | None
) -> Response:
    """The event a turn began with (the frame itself, as a socket gets it),
    found again by the turn's idempotency key when it was new."""
    frame = frame or await service.message_frame(thread, client_msg_id)
    if frame is None:
        raise NotFound("the message is gone")
    return Response(frame, status_code=202, media_type="application/json")


@router.post(
    "/{thread_id}/regenerate",
    status_code=202,
    response_model=LoadingEvent,
    summary="A new reply to a user message (the `regenerate` frame): its `loading` event",
    dependencies=[Origin],
)
async def regenerate(
    thread_id: PathThread, body: PostRegenerate, user: Caller, service: Chat
) -> Response:
    thread = keys.thread_id(thread_id)
    await service.threads.require_member(thread, user)
    client_msg_id = body.client_msg_id or f"http-{secrets.token_hex(8)}"
    frame = await service.regenerate(thread, user, body.message_id, client_msg_id)
    return await _event_of(service, thread, client_msg_id, frame)


@router.get(
    "/{thread_id}/messages",
    summary="A page of history (the `get_history` frame)",
    dependencies=[Origin],
)
async def get_messages(
    thread_id: PathThread,
    user: Caller,
    service: Chat,
    before: Annotated[EventId | None, Query(description="a message id")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    leaf: Annotated[
        EventId | None, Query(description="a branch's leaf; default: the active one")
    ] = None,
) -> History:
    thread = keys.thread_id(thread_id)
    await service.threads.require_member(thread, user)
    messages, has_more = await service.history_page(thread, before, limit, user, leaf)
    return History.of(thread, messages, has_more)


@router.post(
    "/{thread_id}/cancel",
    status_code=202,
    summary="Stop the running turn, on whichever pod runs it",
    dependencies=[Origin],
)
async def cancel(
    thread_id: PathThread, user: Caller, service: Chat, body: PostCancel | None = None
) -> CancelAccepted:
    thread = keys.thread_id(thread_id)
    await service.threads.require_member(thread, user)
    if body is not None and body.queue_id is not None:
        await service.cancel_queued(thread, user, body.queue_id)
        return CancelAccepted(queue_id=body.queue_id)
    generation_id = body.generation_id if body else None
    cancelled = await service.cancel(thread, generation_id, user)
    if cancelled is None:
        raise NotFound("no matching turn is running")
    return CancelAccepted(generation_id=cancelled)
