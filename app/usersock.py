"""The user socket, ``GET /v1/ws``: one socket per user for a live inbox and
many threads (docs/protocol.md "The user socket").

First ``inbox`` (a snapshot of the caller's threads, most recently active
first), then ``thread``/``thread_removed`` as they change, from the user's
own channel (app.chat.inbox): one subscription per user socket, whatever
the number of threads. ``join``/``leave`` follow threads on the socket with
exactly the thread socket's code (app.ws.ThreadStream), so a joined thread's
stream is a thread socket's, frame for frame. One slow socket is closed
(1013) as a thread socket is, whichever of its queues overflowed; erasing
the user's data closes it (1008, from the hub's ``chat:erased`` channel).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from fastapi import APIRouter, WebSocket
from redis.exceptions import RedisError
from starlette.websockets import WebSocketDisconnect

from app import metrics
from app.auth import chosen_subprotocol
from app.chat import keys
from app.chat.errors import ChatError, Forbidden, InvalidRequest, RateLimited
from app.chat.fanout import FanoutUnavailable
from app.chat.follower import THREAD_RESET, TOO_SLOW, InboxFollower
from app.chat.inbox import parse_notice
from app.chat.keys import ThreadId, UserId
from app.chat.records import ThreadCard, ThreadGone
from app.chat.service import ChatService
from app.protocol import (
    Inbox,
    Join,
    Leave,
    Ping,
    Pong,
    Read,
    ThreadChanged,
    ThreadRemoved,
    ThreadSummary,
    encode,
)
from app.ws import THREAD_FRAMES, SocketOut, ThreadStream, admit_caller, close_unopened, supervise

log = logging.getLogger(__name__)
router = APIRouter()


async def user_socket(ws: WebSocket) -> None:
    admitted = await admit_caller(ws)
    if admitted is None:
        return
    service, user = admitted
    await ws.accept(subprotocol=chosen_subprotocol(ws))
    try:
        slot = await service.limits.claim_socket(user)
    except (Forbidden, RateLimited, RedisError, OSError) as exc:
        await close_unopened(ws, None, user, exc)
        return
    session = UserSession(ws, service, user)
    metrics.SOCKETS_OPEN.inc()
    try:
        await session.run()
    finally:
        metrics.SOCKETS_OPEN.dec()
        await session.close()
        await service.limits.release_socket(slot)


router.add_websocket_route("/v1/ws", user_socket)


class UserSession:
    """A user socket: the inbox, the joined threads, one reader."""

    def __init__(self, ws: WebSocket, service: ChatService, user: UserId) -> None:
        self.out = SocketOut(ws)
        self.service = service
        self.user = user
        self.inbox = InboxFollower(ThreadId(""), service.settings.chat_send_queue, user)
        self.channel = keys.user_inbox(user)
        self.streams: dict[ThreadId, tuple[ThreadStream, asyncio.Task[None]]] = {}
        # The newest card sent per thread: an older one arriving late is dropped.
        self.revs: dict[str, int] = {}

    async def run(self) -> None:
        try:
            # Follow first, read second, as a thread socket does: a change
            # after the follow is heard, one before is in the snapshot.
            await self.service.hub.follow_inbox(self.channel, self.inbox)
            snapshot = await self._snapshot()
        except (FanoutUnavailable, RedisError, OSError) as exc:
            await close_unopened(self.out.ws, None, self.user, exc)
            return
        max_bytes = self.service.settings.chat_max_frame_bytes
        reader = self.out.read_frames(max_bytes, self._handle, None)
        await supervise(self.out.ws, self.inbox, reader, self._write_forever(snapshot))

    async def close(self) -> None:
        await self.service.hub.unfollow_inbox(self.channel, self.inbox)
        for thread in list(self.streams):
            await self._drop(thread)

    async def _snapshot(self) -> str:
        cards, next_cursor = await self.service.inbox_page(
            self.user, self.service.settings.chat_inbox_limit
        )
        self.revs = {card.id: card.rev for card in cards}
        threads = [ThreadSummary.of(card) for card in cards]
        return encode(Inbox(threads=threads, next_cursor=next_cursor))

    async def _write_forever(self, snapshot: str) -> None:
        try:
            await self.out.send_text(snapshot)
            while True:
                raw = (await self.inbox.next_event()).frame
                if not raw:  # the pod's subscriber was lost: start over
                    await self.out.send_text(await self._snapshot())
                    continue
                frame = self._frame_of(raw)
                if frame is not None:
                    await self.out.send_text(frame)
        except (WebSocketDisconnect, RuntimeError, OSError):
            return
        except RedisError:
            self.inbox.close_for(TOO_SLOW)  # no snapshot: the client reconnects

    def _frame_of(self, raw: str) -> str | None:
        notice = parse_notice(raw, self.service.settings.chat_prompt_policy)
        if isinstance(notice, ThreadGone):
            self.revs.pop(notice.thread_id, None)
            removed = ThreadRemoved.model_validate(
                {"thread_id": notice.thread_id, "reason": notice.reason}
            )
            return encode(removed)
        card: ThreadCard = notice
        if card.rev <= self.revs.get(card.id, -1):
            return None  # older than what the client has (a Cluster's late card)
        self.revs[card.id] = card.rev
        return encode(ThreadChanged(thread=ThreadSummary.of(card)))

    # --- frames -------------------------------------------------------------

    async def _handle(self, frame: Any) -> None:
        thread = getattr(frame, "thread_id", None)
        if isinstance(frame, Ping):
            await self.out.send_text(encode(Pong(thread_id=None)))
        elif isinstance(frame, Join):
            await self.out.answer(thread, self.user, self._join(frame))
        elif isinstance(frame, Leave):
            await self.out.answer(thread, self.user, self._leave(frame))
        elif thread is None:
            await self.out.error(None, "bad_request", f"{frame.type}: thread_id is required here")
        elif isinstance(frame, Read):
            await self.out.answer(
                thread, self.user, self.service.read(thread, self.user, frame.message_id)
            )
        elif isinstance(frame, THREAD_FRAMES):
            joined = self.streams.get(thread)
            if joined is None:
                await self.out.error(thread, "bad_request", "join the thread first")
            else:
                await joined[0].handle(frame)

    async def _join(self, frame: Join) -> None:
        thread = ThreadId(frame.thread_id)
        if thread in self.streams:
            raise InvalidRequest("already joined: send resume, or leave first")
        limit = self.service.settings.chat_max_joined
        if len(self.streams) >= limit:
            raise RateLimited(f"at most {limit} threads joined on one socket", retryable=False)
        opened = await self.service.join_existing(thread, self.user, frame.after, frame.epoch)
        stream = ThreadStream(self.out, self.service, thread, self.user, opened)
        self.streams[thread] = (stream, asyncio.create_task(self._pump(stream)))

    async def _leave(self, frame: Leave) -> None:
        if ThreadId(frame.thread_id) not in self.streams:
            raise InvalidRequest("not joined")
        await self._drop(ThreadId(frame.thread_id))

    async def _pump(self, stream: ThreadStream) -> None:
        """A joined thread's writer, until the socket or the thread ends. A
        slow consumer or a reset closes the whole socket (the client resumes
        every thread); a deleted thread or a revoked member just leaves it
        (the inbox says ``thread_removed``)."""
        writer = asyncio.ensure_future(stream.write_forever())
        must_close = stream.follower.must_close
        try:
            await asyncio.wait((writer, must_close), return_when=asyncio.FIRST_COMPLETED)
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        reason = stream.follower.closing
        if reason in (TOO_SLOW, THREAD_RESET):
            self.inbox.close_for(reason)
        elif reason is not None:
            await self._drop(stream.thread)

    async def _drop(self, thread: ThreadId) -> None:
        joined = self.streams.pop(thread, None)
        if joined is None:
            return
        stream, pump = joined
        if pump is not asyncio.current_task():
            pump.cancel()
        try:
            await self.service.leave(stream.follower)
        except (ChatError, RedisError, OSError) as exc:
            log.warning("leaving %s: %s", thread, exc)
