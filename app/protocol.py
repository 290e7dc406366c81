"""The wire protocol (version 1) as typed models: every frame a client may send
and every event a server sends, in one place. docs/protocol.md is its prose.

Inbound frames are parsed with one adapter (``parse_client_frame``) into a
discriminated union; anything else is a ``BadFrame`` carrying the protocol's
error code. Outbound events are models serialised with orjson; timeline
events are serialised once, stored and published as they are (see
app.chat.timeline), never re-encoded per socket.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
)

from app.chat import keys, records
from app.chat.errors import DomainCode
from app.chat.records import Joined, MessageStatus, Role
from app.chat.timeline import message_json, queued_json

PROTOCOL_VERSION = 1

# The domain's codes (app.chat.errors), and those only the wire itself raises.
ErrorCode = DomainCode | Literal["too_large", "resume_gap", "llm_error"]


def _stream_id(raw: str) -> str:
    """A Redis Stream id Redis itself accepts (both parts fit 64 bits)."""
    keys.event_id(raw)  # InvalidId is a ValueError: a validation error
    return raw


# Client ids (client_msg_id, generation ids) end up as Redis hash fields and in
# events: bounded and printable, never used to build a key.
ClientToken = Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$")]
EventId = Annotated[
    StrictStr,
    Field(max_length=41, pattern=f"^{keys.EVENT_ID_PATTERN}$"),
    AfterValidator(_stream_id),
]


ThreadIdField = Annotated[StrictStr, Field(pattern=f"^{keys.THREAD_ID_PATTERN}$")]


class _Frame(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _ThreadFrame(_Frame):
    """A frame about one thread: on a user socket ``thread_id`` names a joined
    thread; on a thread socket it may be left out (or be the socket's own)."""

    thread_id: ThreadIdField | None = None


# --- client -> server -------------------------------------------------------


class Prompt(_ThreadFrame):
    """Without ``parent_id`` the message follows the active leaf; with it (a
    message id, or null for a new root) it starts a branch there: an edit."""

    type: Literal["prompt"]
    content: StrictStr = Field(min_length=1)
    client_msg_id: ClientToken | None = None
    parent_id: EventId | None = None

    @property
    def branches(self) -> bool:
        """Whether the client gave ``parent_id`` (null included)."""
        return "parent_id" in self.model_fields_set


class Regenerate(_ThreadFrame):
    type: Literal["regenerate"]
    message_id: EventId
    client_msg_id: ClientToken | None = None


class Switch(_ThreadFrame):
    type: Literal["switch"]
    message_id: EventId


class GetHistory(_ThreadFrame):
    type: Literal["get_history"]
    before: EventId | None = None
    limit: StrictInt = Field(default=50, ge=1, le=200)
    leaf: EventId | None = None


class Cancel(_ThreadFrame):
    """Stops the running turn (``generation_id``: only that one), or with
    ``queue_id`` takes a waiting prompt out of the queue."""

    type: Literal["cancel"]
    generation_id: ClientToken | None = None
    queue_id: EventId | None = None


class Resume(_ThreadFrame):
    type: Literal["resume"]
    after: EventId
    epoch: StrictStr | None = Field(default=None, max_length=64)


class Ping(_Frame):
    type: Literal["ping"]


class Read(_ThreadFrame):
    """The member read the thread up to ``message_id`` (either socket kind)."""

    type: Literal["read"]
    message_id: EventId


class Typing(_ThreadFrame):
    """The member is typing: the thread's other sockets get ``typing``."""

    type: Literal["typing"]


class Join(_Frame):
    """User socket: follow a thread on this socket, as a thread socket would."""

    type: Literal["join"]
    thread_id: ThreadIdField
    after: EventId | None = None
    epoch: StrictStr | None = Field(default=None, max_length=64)


class Leave(_Frame):
    """User socket: stop following a joined thread."""

    type: Literal["leave"]
    thread_id: ThreadIdField


_Frames = (
    Prompt | Regenerate | Switch | GetHistory | Cancel | Resume | Ping | Read | Typing | Join
    | Leave
)  # fmt: skip
ClientFrame = Annotated[_Frames, Field(discriminator="type")]
_client_frame: TypeAdapter[_Frames] = TypeAdapter(ClientFrame)


# Client frames are flat objects; a little nesting is tolerated so the error
# can name the field, but no deeper (orjson itself stops at 1024 levels).
MAX_JSON_DEPTH = 4


class BadFrame(Exception):
    """A client frame the protocol refuses; ``code`` is the error event's code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message


def parse_client_frame(raw: str | bytes, max_bytes: int) -> ClientFrame:
    """Decode one text frame into a typed client frame, or raise ``BadFrame``."""
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode())
    if size > max_bytes:
        raise BadFrame("too_large", f"frame larger than {max_bytes} bytes")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit exceeded"):  # orjson stops at 1024 levels
            raise BadFrame(
                "bad_request", f"frame nested deeper than {MAX_JSON_DEPTH} levels"
            ) from None
        raise BadFrame("bad_request", f"frame is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise BadFrame("bad_request", "frame must be a JSON object with a string 'type'")
    if _deeper_than(data, MAX_JSON_DEPTH):
        raise _too_deep()
    try:
        return _client_frame.validate_python(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or "type"
        raise BadFrame("bad_request", f"{where}: {first['msg']}") from None


def _too_deep() -> BadFrame:
    return BadFrame("bad_request", f"frame nested deeper than {MAX_JSON_DEPTH} levels")


def _deeper_than(value: object, limit: int) -> bool:
    """Whether a decoded JSON value nests more than ``limit`` containers deep
    (iterative: the check itself must not recurse on hostile input)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


# --- server -> client -------------------------------------------------------


class QueuedPrompt(BaseModel):
    """A prompt waiting for the running turn (prompt_policy ``queue``)."""

    queue_id: str
    user_id: str
    content: str
    client_msg_id: str | None = None


class Ready(BaseModel):
    type: Literal["ready"] = "ready"
    thread_id: str
    protocol: int = PROTOCOL_VERSION
    epoch: str
    last_event_id: str | None
    generating: bool
    generation_id: str | None
    leaf_id: str | None = None
    queue: list[QueuedPrompt] = Field(
        default_factory=list, description="the prompts waiting to run, first to run first"
    )
    recovered: bool | None = None


def ready_frame(joined: Joined) -> str:
    """``ready`` for a socket that just joined, as a text frame: ``Ready``'s
    fields in its order, ``last_event_id``, ``generation_id`` and
    ``leaf_id`` null when absent, ``recovered`` left out when None.

    Built straight from the domain record: every connect sends one, and a
    pydantic model built and dumped for it was a fiftieth of a connect's CPU.
    tests/test_protocol.py checks it against the ``Ready`` model."""
    data: dict[str, Any] = {
        "type": "ready", "thread_id": joined.thread_id, "protocol": PROTOCOL_VERSION,
        "epoch": joined.epoch, "last_event_id": joined.last_event_id,
        "generating": joined.generating, "generation_id": joined.generation_id,
        "leaf_id": joined.leaf_id,
        "queue": [
            {**queued_json(queued), "client_msg_id": queued.client_msg_id}
            for queued in joined.queue
        ],
    }  # fmt: skip
    if joined.recovered is not None:
        data["recovered"] = joined.recovered
    return orjson.dumps(data).decode()


class History(BaseModel):
    type: Literal["history"] = "history"
    thread_id: str
    messages: list[Message]
    has_more: bool

    @classmethod
    def of(cls, thread_id: str, messages: list[records.Message], has_more: bool) -> History:
        return cls(
            thread_id=thread_id, messages=[message_json(m) for m in messages], has_more=has_more
        )


class ErrorEvent(BaseModel):
    type: Literal["error"] = "error"
    thread_id: str | None
    code: ErrorCode
    message: str
    retryable: bool = False
    retry_after_ms: int | None = None


class Pong(BaseModel):
    type: Literal["pong"] = "pong"
    thread_id: str | None


# --- the user socket ----------------------------------------------------------


class LastMessageOut(BaseModel):
    id: str
    role: str
    user_id: str
    preview: str = Field(description="the start of its content, at most 200 characters")
    created_at: int = Field(description="ms since the epoch")


class TokenTotals(BaseModel):
    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)


class ThreadSummary(BaseModel):
    """A thread as the caller's inbox shows it."""

    id: str
    title: str
    role: Literal["owner", "member", "viewer"]
    prompt_policy: str
    generating: bool
    unread: int = Field(
        description="messages of the active branch after the caller's read marker, "
        "written by others or the assistant"
    )
    updated_at: int = Field(description="last committed message, ms since the epoch")
    active_at: int = Field(description="last activity, ms since the epoch")
    last_message: LastMessageOut | None
    usage: TokenTotals = Field(description="the tokens every turn of the thread used")

    @classmethod
    def of(cls, card: records.ThreadCard) -> ThreadSummary:
        last = card.last_message
        return cls(
            id=card.id, title=card.title, role=card.role,
            prompt_policy=card.prompt_policy, generating=card.generating, unread=card.unread,
            updated_at=card.updated_at, active_at=card.active_at,
            last_message=LastMessageOut(
                id=last.id, role=last.role, user_id=last.user_id, preview=last.preview,
                created_at=last.created_at,
            ) if last else None,
            usage=TokenTotals(input_tokens=card.input_tokens, output_tokens=card.output_tokens),
        )  # fmt: skip


class Inbox(BaseModel):
    """The first event of a user socket: the caller's threads, most recently
    active first; ``next_cursor`` pages on with ``GET /v1/threads?cursor=``."""

    type: Literal["inbox"] = "inbox"
    threads: list[ThreadSummary]
    next_cursor: str | None


class ThreadChanged(BaseModel):
    """One of the caller's threads changed (or became theirs)."""

    type: Literal["thread"] = "thread"
    thread: ThreadSummary


class ThreadRemoved(BaseModel):
    """A thread left the caller's inbox."""

    type: Literal["thread_removed"] = "thread_removed"
    thread_id: str
    reason: Literal["deleted", "revoked", "left"]


class Presence(BaseModel):
    """Who has a socket on the thread, on any pod (not a timeline event)."""

    type: Literal["presence"] = "presence"
    thread_id: str
    users: list[str]


class TypingEvent(BaseModel):
    """Another socket's user is typing in the thread (not a timeline event)."""

    type: Literal["typing"] = "typing"
    thread_id: str
    user_id: str


# --- timeline events as sent --------------------------------------------------
# A turn's records (app.chat.records) are stored and published once, as
# finished frames with the event's ``id`` and ``n`` in front (app.chat.timeline).
# These models are those frames' exact shapes, for the AsyncAPI document, the
# generated client types and tests (app.schema); the server never builds them.


class Usage(BaseModel):
    """Tokens a turn used: every input token read (cached ones included) and
    the output; the cache counts when the provider reported any."""

    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)
    cache_read_tokens: int | None = Field(default=None, ge=0)
    cache_write_tokens: int | None = Field(default=None, ge=0)


class ToolUse(BaseModel):
    """A tool the model called during a reply, with its result."""

    call_id: str
    name: str
    input: Any = Field(description="the JSON the model sent (its raw text if it did not parse)")
    output: str
    is_error: bool
    offset: int = Field(ge=0, description="how much of the reply's content came before the call")


class Message(BaseModel):
    """A committed message of a thread's history, as clients see it."""

    id: str
    parent_id: str | None = Field(description="the message it follows; null for a root")
    role: Role
    content: str
    user_id: str
    created_at: int = Field(description="ms since the epoch")
    status: MessageStatus
    client_msg_id: str | None = None
    queue_id: str | None = Field(default=None, description="the queued prompt it was")
    siblings: list[str] | None = Field(
        default=None,
        description="history pages only: the ids sharing its parent, oldest first, itself included",
    )
    tool_calls: list[ToolUse] | None = Field(
        default=None, description="assistant messages: the tools called, in the order answered"
    )
    usage: Usage | None = Field(default=None, description="assistant messages: the turn's tokens")


class TimelineFrame(BaseModel):
    """What every timeline event carries: its id (a Redis Stream id, the same on
    every pod) and its contiguous per-thread number."""

    id: str = Field(pattern=r"^[0-9]{1,20}-[0-9]{1,20}$")
    n: int = Field(ge=0)


class MessageEvent(TimelineFrame):
    """A message committed to the thread's history (a user's or the assistant's)."""

    type: Literal["message"] = "message"
    thread_id: str
    message: Message


class BranchEvent(TimelineFrame):
    """The thread's active leaf changed (a ``switch``)."""

    type: Literal["branch"] = "branch"
    thread_id: str
    leaf_id: str


class QueuedEvent(TimelineFrame):
    """A prompt sent while a turn runs waits in the thread's queue; its
    ``queue_id`` is this event's id, and its ``message`` carries it once it
    runs."""

    type: Literal["queued"] = "queued"
    thread_id: str
    queue_id: str
    user_id: str
    content: str
    client_msg_id: str | None = None


class UnqueuedEvent(TimelineFrame):
    """A waiting prompt left the queue without running (``reason``: cancelled;
    budget_exceeded: its sender spent the day's tokens before it started;
    revoked: its sender is no longer a member of the thread)."""

    type: Literal["unqueued"] = "unqueued"
    thread_id: str
    queue_id: str
    reason: str


class LoadingEvent(TimelineFrame):
    """A turn started: ``model`` is generating the reply ``generation_id``."""

    type: Literal["loading"] = "loading"
    thread_id: str
    generation_id: str
    model: str


class DeltaEvent(TimelineFrame):
    """A piece of the reply: a generation's texts in ``seq`` order make its content."""

    type: Literal["delta"] = "delta"
    thread_id: str
    generation_id: str
    seq: int
    text: str


class ToolCallEvent(TimelineFrame):
    """The model asked for a tool; it runs on the turn's pod after this event."""

    type: Literal["tool_call"] = "tool_call"
    thread_id: str
    generation_id: str
    call_id: str
    name: str
    input: Any


class ToolResultEvent(TimelineFrame):
    """What the tool of ``call_id`` answered (``is_error``: a failure the model reads)."""

    type: Literal["tool_result"] = "tool_result"
    thread_id: str
    generation_id: str
    call_id: str
    output: str
    is_error: bool


class TurnError(BaseModel):
    """Why a turn ended ``error``: the model failed (``llm_error``)."""

    code: Literal["llm_error"]
    message: str
    retryable: bool


class DoneEvent(TimelineFrame):
    """A turn ended; ``message_id`` is the assistant message's id."""

    type: Literal["done"] = "done"
    thread_id: str
    generation_id: str
    status: MessageStatus
    message_id: str
    usage: Usage
    error: TurnError | None = Field(default=None, description="status error: why")


def encode(event: BaseModel) -> str:
    """One server event as a text frame (None fields dropped, except in
    ``history``, and in ``ready``, whose ``last_event_id``, ``generation_id``
    and ``leaf_id`` are null when absent: a socket's own comes from
    ``ready_frame``, the same bytes without a model)."""
    if isinstance(event, Inbox | ThreadChanged):
        return orjson.dumps(event.model_dump()).decode()  # last_message is null, not absent
    if isinstance(event, Ready):
        data = event.model_dump(exclude={"recovered"} if event.recovered is None else set())
    elif isinstance(event, History):
        data = event.model_dump(exclude_none=True)
        for message in data["messages"]:
            message.setdefault("parent_id", None)  # a root's is null, not absent
    else:
        data = event.model_dump(exclude_none=True)
    return orjson.dumps(data).decode()
