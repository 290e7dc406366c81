"""The REST edge: threads and their members under ``/v1/threads``, the
caller's token usage at ``/v1/usage``.

The one place where HTTP requests become domain calls (app.chat.threads) and
domain errors become HTTP statuses, each with a JSON body
``{"error": {"code", "message", "retry_after_ms"?}}`` whose ``code`` is the
protocol's: 401 unauthorized (no or bad token), 403 forbidden (not a member,
or not the owner), 404 not_found (no such thread), 409 conflict or thread_busy, 413
too_large, 422 bad_request, 429 rate_limited or budget_exceeded (with
``Retry-After``), 503
unavailable. A stranger gets 403, not 404, for a thread that exists: thread
ids are not secret (opening a socket on an unused id creates the thread, so
existence is observable anyway); what a stranger never gets is its content.
Path and body values are validated before any Redis key is built from them.
"""

from __future__ import annotations

import datetime as dt
import math
import secrets
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Body, Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth import AuthError
from app.chat import keys
from app.chat.errors import (
    BudgetExceeded,
    ChatError,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    RateLimited,
    ThreadBusy,
)
from app.chat.keys import ThreadId, UserId
from app.chat.records import PromptPolicy
from app.chat.service import ChatService
from app.chat.threads import MAX_TITLE_CHARS, ThreadSummary
from app.chat.timeline import message_json
from app.chat.usage import until_next_day_ms
from app.origins import OriginPolicy
from app.protocol import TokenTotals

# Request bodies here are a title at most: anything bigger is refused unread.
MAX_BODY_BYTES = 16 * 1024

THREAD_ID_PATTERN = f"^{keys.THREAD_ID_PATTERN}$"
USER_ID_PATTERN = f"^{keys.USER_ID_PATTERN}$"

PathThread = Annotated[str, Path(pattern=THREAD_ID_PATTERN, description="A thread id.")]
PathUser = Annotated[str, Path(pattern=USER_ID_PATTERN, description="A user id (token sub).")]
Title = Annotated[StrictStr, Field(min_length=1, max_length=MAX_TITLE_CHARS)]


class CreateThread(BaseModel):
    """A new thread; without ``id`` the server picks an unguessable one."""

    model_config = ConfigDict(extra="forbid")
    id: Annotated[StrictStr, Field(pattern=THREAD_ID_PATTERN)] | None = None
    title: Title | None = None


class UpdateThread(BaseModel):
    """The owner's changes: a new title, what prompts sent while a turn runs
    get (``reject``: thread_busy, ``queue``: wait their turn, ``interrupt``:
    stop the turn and run next), or both."""

    model_config = ConfigDict(extra="forbid")
    title: Title | None = None
    prompt_policy: PromptPolicy | None = None


class ThreadOut(BaseModel):
    id: str
    title: str
    owner: str
    role: Literal["owner", "member", "viewer"]
    created_at: int = Field(description="ms since the epoch")
    updated_at: int = Field(description="last committed message, ms since the epoch")
    active_at: int = Field(description="last activity in the caller's list, ms since the epoch")
    prompt_policy: PromptPolicy = Field(description="what a prompt sent while a turn runs gets")
    usage: TokenTotals = Field(description="tokens used by every turn of the thread")


class ThreadDetail(ThreadOut):
    members: list[str]


class UsageOut(BaseModel):
    user_id: str
    day: str = Field(description="the UTC day counted, YYYY-MM-DD")
    input_tokens: int
    output_tokens: int
    total_tokens: int
    turns: int
    limit: int | None = Field(description="CHAT_USER_TOKENS_PER_DAY; null: no limit")
    remaining: int | None
    resets_in_ms: int = Field(description="until the next UTC day")


class ThreadPage(BaseModel):
    threads: list[ThreadOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page")


class ApiError(BaseModel):
    code: str
    message: str
    retry_after_ms: int | None = None


class ErrorBody(BaseModel):
    error: ApiError


class HttpError(Exception):
    """A refusal that is not a domain error (authentication, body size)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (401, 403, 404, 409, 413, 422, 429, 503)
}
router = APIRouter(prefix="/v1/threads", tags=["threads"], responses=_ERRORS)


def caller(request: Request) -> UserId:
    """The authenticated user (``anonymous`` with auth off), or 401."""
    try:
        user: UserId = request.app.state.auth.user_for(request)
    except AuthError as exc:
        raise HttpError(401, "unauthorized", str(exc)) from None
    return user


def chat(request: Request) -> ChatService:
    service: ChatService = request.app.state.chat
    return service


Caller = Annotated[UserId, Depends(caller)]
Chat = Annotated[ChatService, Depends(chat)]


@router.post("", status_code=201, summary="Create a thread (the caller owns it)")
async def create_thread(
    user: Caller, service: Chat, body: Annotated[CreateThread | None, Body()] = None
) -> ThreadDetail:
    body = body or CreateThread()  # no body at all: as `{}`
    thread = keys.thread_id(body.id) if body.id else ThreadId(secrets.token_urlsafe(12))
    await service.threads.create(thread, user, body.title or "")
    return await _detail(service, thread, user)


@router.get("", summary="The caller's threads, most recently active first")
async def list_threads(
    user: Caller,
    service: Chat,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=120)] = None,
) -> ThreadPage:
    page, next_cursor = await service.threads.page_of_user(user, limit, cursor)
    return ThreadPage(threads=[_out(s, user) for s in page], next_cursor=next_cursor)


@router.get("/{thread_id}", summary="A thread and its members (members only)")
async def get_thread(thread_id: PathThread, user: Caller, service: Chat) -> ThreadDetail:
    return await _detail(service, keys.thread_id(thread_id), user)


@router.patch("/{thread_id}", summary="Rename a thread or set its prompt_policy (owner only)")
async def update_thread(
    thread_id: PathThread, body: UpdateThread, user: Caller, service: Chat
) -> ThreadDetail:
    thread = keys.thread_id(thread_id)
    if body.title is not None:
        await service.threads.rename(thread, user, body.title)
    if body.prompt_policy is not None:
        await service.threads.set_prompt_policy(thread, user, body.prompt_policy)
    return await _detail(service, thread, user)


@router.delete(
    "/{thread_id}", status_code=204, summary="Delete a thread, its history and all its keys"
)
async def delete_thread(thread_id: PathThread, user: Caller, service: Chat) -> Response:
    await service.delete_thread(keys.thread_id(thread_id), user)
    return Response(status_code=204)


@router.get(
    "/{thread_id}/export",
    summary="Every message of the thread, all branches, both tiers, as JSON lines (owner only)",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}}}},
)
async def export_thread(thread_id: PathThread, user: Caller, service: Chat) -> StreamingResponse:
    messages = await service.export(keys.thread_id(thread_id), user)

    async def lines() -> AsyncIterator[bytes]:
        async for message in messages:
            yield orjson.dumps(message_json(message)) + b"\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


class MemberRole(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["member", "viewer"] = Field(
        default="member", description="a viewer reads and watches, and cannot write"
    )


@router.put(
    "/{thread_id}/members/{member}",
    status_code=204,
    summary="Add a member, or change a member's role (owner only)",
)
async def add_member(
    thread_id: PathThread, member: PathUser, user: Caller, service: Chat,
    body: MemberRole | None = None,
) -> Response:  # fmt: skip
    role = body.role if body else "member"
    await service.threads.add_member(keys.thread_id(thread_id), user, keys.user_id(member), role)
    return Response(status_code=204)


@router.delete(
    "/{thread_id}/members/{member}",
    status_code=204,
    summary="Remove a member (owner), or leave (the member); their sockets close",
)
async def remove_member(
    thread_id: PathThread, member: PathUser, user: Caller, service: Chat
) -> Response:
    await service.threads.remove_member(keys.thread_id(thread_id), user, keys.user_id(member))
    return Response(status_code=204)


async def _detail(service: ChatService, thread: ThreadId, user: UserId) -> ThreadDetail:
    summary, members = await service.threads.describe(thread, user)
    out = _out(summary, user)
    if out.role == "member" and await service.threads.role(thread, user) == "viewer":
        out.role = "viewer"
    return ThreadDetail(**out.model_dump(), members=members)


usage_router = APIRouter(prefix="/v1", tags=["usage"], responses=_ERRORS)


class ErasureReport(BaseModel):
    """What erasing a user's data removed (ChatService.erase_user)."""

    user_id: str
    threads_deleted: int = Field(description="threads they owned, deleted from both tiers")
    memberships_removed: int
    messages_erased: int = Field(
        description="their messages and the replies to them, redacted in Redis"
    )
    archived_messages_erased: int = Field(description="the same, in the archive")
    queued_prompts_dropped: int = Field(
        description="their prompts still waiting in a queue, which never ran"
    )
    titles_cleared: int = Field(description="thread titles the model made from their prompts")
    sockets_closed: int = Field(
        description="their sockets open when the erase began, on every server (0 without "
        "CHAT_MAX_SOCKETS_PER_USER, which keeps their count)"
    )
    user_keys_deleted: int = Field(description="their lists, usage, limits and sockets")


@usage_router.delete(
    "/users/{user}/data",
    summary="Erase a user's data from both tiers (the user, or CHAT_ADMIN_USERS)",
)
async def erase_user(user: PathUser, caller: Caller, service: Chat) -> ErasureReport:
    target = keys.user_id(user)
    return ErasureReport(user_id=target, **await service.erase_user(target, caller))


@usage_router.get("/usage", summary="The caller's tokens today (UTC) and their daily limit")
async def get_usage(user: Caller, service: Chat) -> UsageOut:
    today = await service.usage.today(user)
    limit = today.limit or None
    return UsageOut(
        user_id=user, day=(dt.date(1970, 1, 1) + dt.timedelta(days=today.day)).isoformat(),
        input_tokens=today.input_tokens, output_tokens=today.output_tokens,
        total_tokens=today.total, turns=today.turns, limit=limit,
        remaining=None if limit is None else max(0, limit - today.total),
        resets_in_ms=until_next_day_ms(),
    )  # fmt: skip


def _out(summary: ThreadSummary, user: UserId) -> ThreadOut:
    return ThreadOut(
        id=summary.id, title=summary.title, owner=summary.owner,
        role="owner" if summary.owner == user else "member",
        created_at=summary.created_at, updated_at=summary.updated_at,
        active_at=summary.active_at, prompt_policy=summary.prompt_policy,
        usage=TokenTotals(
            input_tokens=summary.input_tokens, output_tokens=summary.output_tokens
        ),
    )  # fmt: skip


# --- errors ------------------------------------------------------------------

_STATUS: list[tuple[type[ChatError], int]] = [
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (ThreadBusy, 409),  # a prompt over HTTP (app.sse) while a turn runs
    (InvalidRequest, 422),
    (RateLimited, 429),
    (BudgetExceeded, 429),
]


def _error(status: int, code: str, message: str, retry_after_ms: int | None = None) -> JSONResponse:
    body = ErrorBody(error=ApiError(code=code, message=message, retry_after_ms=retry_after_ms))
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if retry_after_ms is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_ms / 1000)))
    return JSONResponse(body.model_dump(exclude_none=True), status, headers=headers)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, HttpError):
        raise exc
    return _error(exc.status, exc.code, str(exc))


async def _on_chat_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, ChatError) or request.scope["type"] != "http":
        raise exc  # sockets map their own errors (app.ws)
    status = next((s for kind, s in _STATUS if isinstance(exc, kind)), 503)
    code = exc.code if status != 503 else "unavailable"
    return _error(status, code, str(exc), exc.retry_after_ms)


async def _on_invalid(request: Request, exc: Exception) -> JSONResponse:
    if request.scope["type"] != "http":
        raise exc
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":  # not "1: JSON decode error"
            context = first.get("ctx")
            why = context.get("error", "") if isinstance(context, dict) else ""
            return _error(422, "bad_request", f"body is not valid JSON: {why}".rstrip(": "))
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return _error(422, "bad_request", f"{where}: {first.get('msg', 'invalid')}")
    return _error(422, "bad_request", str(exc))


# Starlette's own errors (no route, wrong method, an unparsable body) in the
# same shape as ours, with codes of the protocol.
_HTTP_CODES = {401: "unauthorized", 403: "forbidden", 404: "not_found", 413: "too_large"}


async def _on_starlette_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, StarletteHTTPException):
        raise exc
    if isinstance(exc.__cause__, RecursionError):  # the JSON parser gave up, not the JSON
        return _error(422, "bad_request", "body is nested too deeply")
    unrouted = exc.status_code == 404 and "endpoint" not in request.scope
    message = f"no such path: {request.url.path}" if unrouted else exc.detail
    response = _error(exc.status_code, _HTTP_CODES.get(exc.status_code, "bad_request"), message)
    response.headers.update(exc.headers or {})
    return response


async def _on_storage_error(request: Request, exc: Exception) -> JSONResponse:
    if request.scope["type"] != "http":
        raise exc
    return _error(503, "unavailable", "storage is unavailable; retry")


class BodyLimit:
    """Refuse request bodies over MAX_BODY_BYTES (a prompt's: a frame's size)
    with 413 before they are read into memory: by Content-Length at once, or as
    a chunked body grows."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = MAX_BODY_BYTES
        if scope["path"].endswith("/messages"):  # a prompt (app.sse): as big as a frame
            limit = scope["app"].state.settings.chat_max_frame_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                await _error(413, "too_large", f"body over {limit} bytes")(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HttpError(413, "too_large", f"body over {limit} bytes")
            return message

        await self.app(scope, limited, send)


def install(app: FastAPI, origins: OriginPolicy) -> None:
    """Mount the REST API on ``app``: routes, error mapping, body limit, CORS."""
    app.include_router(router)
    app.include_router(usage_router)
    app.add_exception_handler(HttpError, _on_http_error)
    app.add_exception_handler(ChatError, _on_chat_error)
    app.add_exception_handler(RequestValidationError, _on_invalid)
    app.add_exception_handler(StarletteHTTPException, _on_starlette_error)
    app.add_exception_handler(keys.InvalidId, _on_invalid)
    app.add_exception_handler(RedisError, _on_storage_error)
    app.add_middleware(BodyLimit)
    if origins.explicit:
        # Bearer tokens, not cookies: no credentials mode, so "*" stays harmless.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins.explicit,
            allow_methods=["GET", "POST", "PATCH", "PUT", "DELETE"],
            allow_headers=["authorization", "content-type", "last-event-id"],
        )
