"""The wire protocol: parsing client frames, and the shape of server events."""

from __future__ import annotations

import orjson
import pytest

from app.chat.errors import ChatError, Conflict, ThreadBusy
from app.chat.records import Joined, Message, Queued
from app.protocol import (
    BadFrame,
    Cancel,
    ErrorEvent,
    GetHistory,
    History,
    Ping,
    Prompt,
    Ready,
    Resume,
    encode,
    parse_client_frame,
    ready_frame,
)

MAX = 4096


def parse(frame: object, max_bytes: int = MAX):  # type: ignore[no-untyped-def]
    raw = frame if isinstance(frame, str | bytes) else orjson.dumps(frame).decode()
    return parse_client_frame(raw, max_bytes)


def bad(frame: object, max_bytes: int = MAX) -> BadFrame:
    with pytest.raises(BadFrame) as info:
        parse(frame, max_bytes)
    return info.value


# --- each frame type ----------------------------------------------------------


def test_prompt() -> None:
    frame = parse({"type": "prompt", "content": "hi", "client_msg_id": "c-1"})
    assert isinstance(frame, Prompt)
    assert frame.content == "hi" and frame.client_msg_id == "c-1"


def test_prompt_without_client_msg_id() -> None:
    frame = parse({"type": "prompt", "content": "hi"})
    assert isinstance(frame, Prompt) and frame.client_msg_id is None


def test_get_history_defaults_and_values() -> None:
    frame = parse({"type": "get_history"})
    assert isinstance(frame, GetHistory) and frame.limit == 50 and frame.before is None
    frame = parse({"type": "get_history", "before": "12-3", "limit": 200})
    assert isinstance(frame, GetHistory) and frame.before == "12-3" and frame.limit == 200
    frame = parse({"type": "get_history", "limit": 1})
    assert isinstance(frame, GetHistory) and frame.limit == 1


def test_cancel() -> None:
    frame = parse({"type": "cancel"})
    assert isinstance(frame, Cancel) and frame.generation_id is None
    frame = parse({"type": "cancel", "generation_id": "abc"})
    assert isinstance(frame, Cancel) and frame.generation_id == "abc"


def test_resume() -> None:
    frame = parse({"type": "resume", "after": "1700000000000-0", "epoch": "e1"})
    assert isinstance(frame, Resume) and frame.after == "1700000000000-0" and frame.epoch == "e1"


def test_ping_from_bytes() -> None:
    assert isinstance(parse(b'{"type":"ping"}'), Ping)


def test_frames_are_immutable() -> None:
    frame = parse({"type": "prompt", "content": "hi"})
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error
        frame.content = "changed"  # type: ignore[misc]


# --- refusals -------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "hello"},
        {"type": "PROMPT", "content": "x"},
        {"content": "no type"},
        {"type": 1},
        {"type": None},
    ],
)
def test_unknown_or_missing_type(frame: object) -> None:
    assert bad(frame).code == "bad_request"


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "prompt", "content": "x", "extra": 1},
        {"type": "ping", "thread_id": "t"},
        {"type": "cancel", "force": True},
        {"type": "get_history", "limit": 5, "after": "1-0"},
    ],
)
def test_extra_fields_are_refused(frame: object) -> None:
    assert bad(frame).code == "bad_request"


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "prompt", "content": 5},
        {"type": "prompt", "content": None},
        {"type": "prompt", "content": ["a"]},
        {"type": "prompt", "content": ""},
        {"type": "prompt"},
        {"type": "get_history", "limit": "5"},
        {"type": "get_history", "limit": 5.0},
        {"type": "get_history", "limit": True},
        {"type": "get_history", "limit": 0},
        {"type": "get_history", "limit": 201},
        {"type": "get_history", "limit": -1},
        {"type": "get_history", "before": "yesterday"},
        {"type": "get_history", "before": 5},
        {"type": "resume"},
        {"type": "resume", "after": "abc"},
        {"type": "resume", "after": "1-0", "epoch": "e" * 65},
        {"type": "cancel", "generation_id": 7},
    ],
)
def test_wrong_types_and_ranges(frame: object) -> None:
    error = bad(frame)
    assert error.code == "bad_request"
    assert error.message  # says what was wrong


def test_error_names_the_field() -> None:
    error = bad({"type": "get_history", "limit": 0})
    assert error.message.startswith("limit")


@pytest.mark.parametrize(
    "client_msg_id", ["x" * 65, "has space", "tab\there", "", "é", "new\nline"]
)
def test_bad_client_msg_ids(client_msg_id: str) -> None:
    assert bad({"type": "prompt", "content": "x", "client_msg_id": client_msg_id}).code == (
        "bad_request"
    )


def test_client_msg_id_of_64_printable_chars_is_fine() -> None:
    token = "!~" * 32
    frame = parse({"type": "prompt", "content": "x", "client_msg_id": token})
    assert isinstance(frame, Prompt) and frame.client_msg_id == token


def test_too_large() -> None:
    frame = orjson.dumps({"type": "prompt", "content": "x" * 200}).decode()
    error = bad(frame, max_bytes=100)
    assert error.code == "too_large"
    # At the limit exactly, it is accepted.
    assert isinstance(parse(frame, max_bytes=len(frame)), Prompt)


def test_too_large_is_checked_before_parsing() -> None:
    assert bad("{" * 500, max_bytes=100).code == "too_large"


@pytest.mark.parametrize("raw", ["", "not json", "{", '{"type":"ping",}', "\x00", "nul"])
def test_invalid_json(raw: str) -> None:
    assert bad(raw).code == "bad_request"


@pytest.mark.parametrize("raw", ['[{"type":"ping"}]', '"ping"', "1", "null", "true"])
def test_non_object_json(raw: str) -> None:
    assert bad(raw).code == "bad_request"


def test_deep_nesting_is_refused_not_crashing() -> None:
    raw = '{"type":"prompt","content":"x","client_msg_id":' + "[" * 2000 + "]" * 2000 + "}"
    assert bad(raw, max_bytes=len(raw)).code == "bad_request"


def test_bad_frame_carries_code_and_message() -> None:
    error = BadFrame("too_large", "big")
    assert error.code == "too_large" and error.message == "big" and str(error) == "big"


# --- server side ----------------------------------------------------------------


@pytest.mark.parametrize(
    "joined",
    [
        Joined(thread_id="t", epoch="e", last_event_id=None, generating=False, generation_id=None),
        Joined(
            thread_id="t", epoch="e", last_event_id="1-0", generating=True, generation_id="g",
            leaf_id="2-0", recovered=False,
            queue=(Queued("3-0", "u", "next"), Queued("4-0", "v", "then", client_msg_id="c")),
        ),
        Joined(
            thread_id="t", epoch="e", last_event_id="1-0", generating=False, generation_id=None,
            recovered=True,
        ),
    ],
    ids=["fresh", "resumed-busy-queued", "recovered"],
)  # fmt: skip
def test_ready_frame_is_the_ready_model_and_keeps_its_nulls(joined: Joined) -> None:
    frame = ready_frame(joined)
    data = orjson.loads(frame)
    # What the model (the schema clients are given) reads, it writes back the same.
    assert encode(Ready.model_validate_json(frame)) == frame
    assert data["last_event_id"] == joined.last_event_id and data["protocol"] == 1
    assert data["generation_id"] == joined.generation_id and data["leaf_id"] == joined.leaf_id
    assert ("recovered" in data) == (joined.recovered is not None)
    assert [q["client_msg_id"] for q in data["queue"]] == [q.client_msg_id for q in joined.queue]


def test_encode_drops_none() -> None:
    error = orjson.loads(encode(ErrorEvent(thread_id=None, code="internal", message="m")))
    assert "thread_id" not in error and error["retryable"] is False


# --- cursors and sizes Redis would refuse ------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "resume", "after": "\u0661-\u0660"},  # Arabic-Indic digits
        {"type": "get_history", "before": "\uff11-0"},  # a fullwidth one
        {"type": "resume", "after": f"{2**64}-0"},  # beyond a 64-bit part
        {"type": "get_history", "before": f"1-{2**64}"},
    ],
    ids=["resume-arabic", "history-fullwidth", "resume-65-bits", "history-65-bits"],
)
def test_event_id_cursors_are_ids_redis_accepts(frame: object) -> None:
    assert bad(frame).code == "bad_request"


def test_the_largest_stream_id_is_a_valid_cursor() -> None:
    top = f"{2**64 - 1}-{2**64 - 1}"
    frame = parse({"type": "resume", "after": top})
    assert isinstance(frame, Resume) and frame.after == top


def test_the_frame_limit_counts_bytes_of_text_frames() -> None:
    frame = orjson.dumps({"type": "prompt", "content": "\u00e9" * 100}).decode()
    assert len(frame) < 150 < len(frame.encode())
    assert bad(frame, max_bytes=150).code == "too_large"
    assert isinstance(parse(frame, max_bytes=len(frame.encode())), Prompt)


def test_moderate_nesting_is_refused_before_validation() -> None:
    frame = {"type": "prompt", "content": "x", "client_msg_id": [[[[["deep"]]]]]}
    error = bad(frame)
    assert error.code == "bad_request" and "nested" in error.message


def test_history_frame_carries_messages_as_clients_see_them() -> None:
    messages = [
        Message(id="1-0", role="user", content="q", user_id="u", created_at=1, status="complete"),
        Message(
            id="2-0", role="assistant", content="42", user_id="assistant", created_at=2,
            status="complete", client_msg_id="c", parent_id="1-0", siblings=("2-0", "3-0"),
        ),
    ]  # fmt: skip
    frame = orjson.loads(encode(History.of("t", messages, has_more=True)))
    assert frame == {
        "type": "history",
        "thread_id": "t",
        "messages": [
            {"id": "1-0", "parent_id": None, "role": "user", "content": "q", "user_id": "u",
             "created_at": 1, "status": "complete"},
            {"id": "2-0", "parent_id": "1-0", "role": "assistant", "content": "42",
             "user_id": "assistant", "created_at": 2, "status": "complete",
             "client_msg_id": "c", "siblings": ["2-0", "3-0"]},
        ],
        "has_more": True,
    }  # fmt: skip


def test_every_domain_error_becomes_an_error_event() -> None:
    """Each domain error's code is one the socket's error event can carry."""

    def subclasses(kind: type[ChatError]) -> list[type[ChatError]]:
        return [kind] + [s for sub in kind.__subclasses__() for s in subclasses(sub)]

    kinds = subclasses(ChatError)
    assert Conflict in kinds and ThreadBusy in kinds
    for kind in kinds:
        event = ErrorEvent(thread_id="t", code=kind.code, message="m")
        assert orjson.loads(encode(event))["code"] == kind.code
