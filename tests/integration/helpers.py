"""What the integration tests say, in the order a test says it: open a
socket, send, read until something happens (or start clients that keep what
they see), ask the pods how they are, then check what the clients saw
against what Redis holds.

Sockets speak protocol v1 (docs/protocol.md); every read is bounded by
``TIMEOUT_S`` unless the caller gives its own bound. Tokens for the
authenticated pods are in tests/integration/tokens.py, the clients that
keep everything in tests/integration/followers.py, the processes in
tests/procs.py.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import orjson
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from app.chat import keys
from tests.integration.followers import EPHEMERAL, PyFollower
from tests.procs import RedisServer, wait_until

TIMEOUT_S = 15.0
REFUSED = (403, 1008)  # HTTP 403 on the upgrade, or close 1008 after it

Event = dict[str, Any]


def unique(prefix: str) -> str:
    """A thread id no other test uses."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


# -- a client's socket -------------------------------------------------------


async def connect(base: str, thread: str, query: str = "", **kw: Any) -> Any:
    """A raw protocol socket (its ``ready`` event still unread); ``kw`` go to
    ``websockets.connect`` (``additional_headers=...``)."""
    # An unbounded receive queue: a test that leaves frames unread must not
    # stall its own close handshake (websockets stops reading when it is full).
    return await websockets.connect(
        f"{base}/v1/threads/{thread}/ws{query}", open_timeout=10, max_queue=None, **kw
    )


async def open_ready(base: str, thread: str, query: str = "", **kw: Any) -> tuple[Any, Event]:
    """A protocol socket and its ``ready`` event."""
    ws = await connect(base, thread, query, **kw)
    return ws, await expect(ws, "ready")


async def send(ws: Any, frame: Event) -> None:
    await ws.send(orjson.dumps(frame).decode())


async def recv_any(ws: Any, timeout: float = TIMEOUT_S) -> Event:
    """The next event, whatever it is."""
    return orjson.loads(await asyncio.wait_for(ws.recv(), timeout))


async def _next(ws: Any) -> Event:
    while True:
        event = orjson.loads(await ws.recv())
        if event.get("type") not in EPHEMERAL:
            return event


async def recv_event(ws: Any, timeout: float = TIMEOUT_S) -> Event:
    """The next event, presence and typing aside."""
    return await asyncio.wait_for(_next(ws), timeout)


async def expect(ws: Any, event_type: str, timeout: float = TIMEOUT_S) -> Event:
    """The next event, which must be of type ``event_type``."""
    event = await recv_event(ws, timeout)
    assert event["type"] == event_type, event
    return event


async def read_until(
    ws: Any,
    stop: str | Callable[[Event], bool],
    timeout: float = TIMEOUT_S,
    into: list[Event] | None = None,
) -> list[Event]:
    """Events up to and including the first of type ``stop`` (or for which
    ``stop(event)`` holds). With ``into``, events are appended there as they
    come (so they are kept on timeout)."""
    matches = (lambda e: e["type"] == stop) if isinstance(stop, str) else stop
    events: list[Event] = [] if into is None else into
    start = len(events)
    async with asyncio.timeout(timeout):
        while True:
            event = await _next(ws)
            events.append(event)
            if matches(event):
                return events[start:]


async def until_done(ws: Any, timeout: float = TIMEOUT_S) -> list[Event]:
    """Every event up to and including the next ``done``."""
    return await read_until(ws, "done", timeout)


async def until_deltas(ws: Any, count: int, timeout: float = TIMEOUT_S) -> list[Event]:
    """Events until the ``count``-th delta (inclusive)."""
    seen = 0

    def enough(event: Event) -> bool:
        nonlocal seen
        seen += event["type"] == "delta"
        return seen >= count

    return await read_until(ws, enough, timeout)


async def turn(ws: Any, content: str, **extra: Any) -> list[Event]:
    """Send a prompt and return every event up to its ``done``."""
    await send(ws, {"type": "prompt", "content": content, **extra})
    return await until_done(ws)


async def get_history(ws: Any, **params: Any) -> Event:
    """A ``get_history`` answer (other events in between fail the test)."""
    await send(ws, {"type": "get_history", **params})
    return await expect(ws, "history")


async def expect_quiet(ws: Any) -> None:
    """Nothing is pending on the socket: a ping is answered before any event."""
    await ws.send('{"type":"ping"}')
    event = await recv_event(ws, 5)
    assert event["type"] == "pong", f"unexpected event before pong: {event}"


async def close_code(ws: Any, timeout: float = 10.0) -> tuple[list[Event], int | None]:
    """Read until the server closes the socket: the events before, and the close code."""
    events: list[Event] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                events.append(await _next(ws))
    except ConnectionClosed as exc:
        return events, exc.rcvd.code if exc.rcvd is not None else None


async def refusal(url: str, timeout: float = 10.0, **connect_kwargs: Any) -> int:
    """How the server refuses a socket at ``url``: the HTTP status of the
    upgrade (403), or the close code it sends before any frame. Fails if the
    socket is served a frame instead."""
    try:
        ws = await websockets.connect(url, open_timeout=timeout, max_queue=None, **connect_kwargs)
    except InvalidStatus as exc:
        return exc.response.status_code
    try:
        frame = await asyncio.wait_for(ws.recv(), timeout)
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else 1006
    finally:
        await ws.close()
    raise AssertionError(f"socket at {url} was served instead of refused: {frame!r}")


# -- clients that keep what they saw (tests/integration/followers.py) ------


async def recorders(urls: Sequence[str], threads: Sequence[str]) -> list[PyFollower]:
    """A started client per thread, each failing over along ``urls``."""
    return [await PyFollower(urls, thread).start() for thread in threads]


async def close_all(recs: Sequence[PyFollower]) -> None:
    for rec in recs:
        await rec.stop()


# -- what a pod says -------------------------------------------------------


def metric(pod: Any, name: str) -> float:
    """A pod's counter or gauge, from its /metrics (0 when not exported yet)."""
    text = httpx.get(f"{pod.http}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(f"{name} ") or line.startswith(f"{name}_total "):
            return float(line.split()[-1])
    return 0.0


async def readyz(pod: Any, timeout: float = 5.0) -> int:
    """The pod's /readyz status (0 when it does not answer at all)."""
    try:
        async with httpx.AsyncClient() as http:
            return (await http.get(f"{pod.http}/readyz", timeout=timeout)).status_code
    except httpx.HTTPError:
        return 0


async def until_status(
    pod: Any, wanted: Callable[[int], bool], timeout: float, what: str, each_s: float = 5.0
) -> float:
    """Seconds until the pod's /readyz status satisfies ``wanted``; each
    request may take ``each_s`` (0 when it does not answer in time)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() - start < timeout:
        if wanted(await readyz(pod, each_s)):
            return loop.time() - start
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# -- what a client saw -------------------------------------------------------


def of_type(events: list[Event], kind: str) -> list[Event]:
    """The events of one type (``done``, ``delta``...), in order."""
    return [e for e in events if e["type"] == kind]


def timeline(events: list[Event]) -> list[tuple[str, int, str]]:
    """The timeline part of a list of events: (id, n, type)."""
    return [(e["id"], e["n"], e["type"]) for e in events if "id" in e]


def deltas_text(events: list[Event], generation_id: str | None = None) -> str:
    """The concatenated delta texts (of one generation, if given), checking
    that their ``seq`` numbers run 0, 1, 2... with none missing or repeated."""
    deltas = [
        e for e in events if e["type"] == "delta" and generation_id in (None, e["generation_id"])
    ]
    if generation_id is not None and deltas:
        assert [d["seq"] for d in deltas] == list(range(len(deltas))), "delta seq gap/dup"
    return "".join(d["text"] for d in deltas)


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start


# -- what Redis holds --------------------------------------------------------

# The key layout (app/chat/keys.py, README "Redis keys"), built from the key
# builders themselves: tests check that Redis never holds anything else. The
# groups ``thread`` and ``user`` hold the id a key belongs to.
_T, _U = keys.ThreadId("T"), keys.UserId("U")
_USER_KEYS = (
    keys.user_threads, keys.user_owned, keys.user_sockets, keys.user_prompt_bucket,
    keys.user_inflight, keys.user_erasing,
)  # fmt: skip
KEY_LAYOUT = re.compile(
    rf"chat:\{{(?P<thread>{keys.THREAD_ID_PATTERN})\}}:"
    rf"({'|'.join(re.escape(k.removeprefix('chat:{T}:')) for k in keys.all_thread_keys(_T))}"
    rf"|typing:{keys.USER_ID_PATTERN})"
    rf"|chat:user:\{{(?P<user>{keys.USER_ID_PATTERN})\}}:"
    rf"({'|'.join(re.escape(k(_U).removeprefix('chat:user:{U}:')) for k in _USER_KEYS)}"
    rf"|usage:[0-9]+)"
    rf"|{re.escape(keys.TURN_INDEX)}|{re.escape(keys.REAPER_LEADER)}|{re.escape(keys.QUEUE_LEADER)}"
)


def undocumented(found: set[str] | list[str]) -> set[str]:
    """The keys among ``found`` that the documented layout does not allow."""
    return {key for key in found if not KEY_LAYOUT.fullmatch(key)}


def stored_events(server: RedisServer, thread: str, start: str = "-") -> list[Event]:
    """The thread's stored timeline (``chat:{T}:events``) as frames with id and n."""
    entries = server.client().xrange(keys.events(keys.thread_id(thread)), start, "+")
    return [
        {"id": entry_id, "n": int(fields["n"]), **orjson.loads(fields["data"])}
        for entry_id, fields in entries
    ]


def stored_history(server: RedisServer, thread: str) -> list[dict[str, str]]:
    """The thread's committed messages (``chat:{T}:history``), with their ids."""
    entries = server.client().xrange(keys.history(keys.thread_id(thread)))
    return [{"id": entry_id, **fields} for entry_id, fields in entries]


def assert_matches_log(events: list[Event], server: RedisServer, thread: str) -> None:
    """Guarantee 1 and 2 for one client: the timeline events it received are
    exactly the thread's event log from its first received event on, in
    order: ids strictly increasing, no duplicate, no gap."""
    got = timeline(events)
    assert got, "the client received no timeline event"
    keys = [tuple(map(int, event_id.split("-"))) for event_id, _, _ in got]
    assert all(a < b for a, b in itertools.pairwise(keys)), "ids not increasing"
    stored = timeline(stored_events(server, thread, got[0][0]))
    if got != stored:
        at = next((i for i, (a, b) in enumerate(zip(got, stored, strict=False)) if a != b), None)
        at = min(len(got), len(stored)) if at is None else at
        raise AssertionError(
            f"client timeline differs from the log at index {at} (client has {len(got)} "
            f"events, log {len(stored)}): client {got[max(0, at - 2) : at + 3]}, "
            f"log {stored[max(0, at - 2) : at + 3]}"
        )


def assert_turns_well_formed(server: RedisServer, thread: str) -> int:
    """Every turn in the event log is whole: the user message (none for a
    regenerate), loading, deltas (seq 0..k), the assistant message whose
    content is the deltas' text and whose parent is the user message it
    answers, and ``done`` naming that message with the same status; and the
    history holds exactly those messages, with their parents. ``branch``
    events come only between turns; ``queued``/``unqueued`` anywhere, and
    each queued prompt either ran once (a user message with its queue_id),
    in queue order, or left the queue once. Returns the number of turns."""
    full = stored_events(server, thread)
    stored = {m["id"]: m for m in stored_history(server, thread)}
    numbers = [e["n"] for e in full]
    if numbers:
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "n not contiguous"
    queued = [e["queue_id"] for e in full if e["type"] == "queued"]
    assert queued == [e["id"] for e in full if e["type"] == "queued"]
    unqueued = [e["queue_id"] for e in full if e["type"] == "unqueued"]
    log = [e for e in full if e["type"] not in ("queued", "unqueued")]
    turns, committed, ran = 0, 0, []
    i = 0
    while i < len(log):
        if log[i]["type"] == "branch":
            assert log[i]["leaf_id"] in stored, log[i]
            i += 1
            continue
        user = log[i] if log[i]["type"] == "message" else None
        if user is not None:
            assert user["message"]["role"] == "user", user
            if user["message"].get("queue_id"):
                ran.append(user["message"]["queue_id"])
            i += 1
        loading = log[i]
        assert loading["type"] == "loading", loading
        generation = loading["generation_id"]
        j = i + 1
        answered: dict[str, Event] = {}  # tool calls and their results, between deltas
        while log[j]["type"] in ("delta", "tool_call", "tool_result"):
            if log[j]["type"] == "tool_result":
                assert log[j]["call_id"] in answered, "a result before its call"
                answered[log[j]["call_id"]] = log[j]
            elif log[j]["type"] == "tool_call":
                assert log[j]["call_id"] not in answered, "a call announced twice"
                answered[log[j]["call_id"]] = {}
            j += 1
        text = deltas_text(log[i + 1 : j], generation)
        final, done = log[j], log[j + 1]
        assert final["type"] == "message" and final["message"]["role"] == "assistant", final
        assert final["message"]["content"] == text, (thread, generation)
        # The reply keeps exactly the calls that were answered, with their results.
        kept = {c["call_id"]: c["output"] for c in final["message"].get("tool_calls", [])}
        assert kept == {k: r["output"] for k, r in answered.items() if r}, final
        assert done["type"] == "done" and done["generation_id"] == generation, done
        assert done["message_id"] == final["id"] == final["message"]["id"]
        assert done["status"] == final["message"]["status"]
        if user is not None:
            assert final["message"]["parent_id"] == user["id"], (user, final)
        else:  # a regenerate: a new reply to a user message already there
            assert stored[final["message"]["parent_id"]]["role"] == "user", final
        for event in (user, final):
            if event is not None:
                entry = stored[event["id"]]
                assert entry["content"] == event["message"]["content"]
                assert entry["status"] == event["message"]["status"]
                assert (entry.get("parent") or None) == event["message"]["parent_id"]
                committed += 1
        turns += 1
        i = j + 2
    assert len(stored) == committed, "history holds messages the timeline does not show"
    assert sorted(ran + unqueued) == sorted(set(ran + unqueued)), "a queued prompt ran twice"
    assert ran == [q for q in queued if q in ran], "queued prompts ran out of order"
    assert set(ran) | set(unqueued) == set(queued), "a queued prompt neither ran nor left"
    return turns


def turn_leftovers(server: RedisServer, thread: str) -> list[str]:
    """What a turn of the thread still holds: its lock, its turn record, its
    place in the reaper's index (none, once the thread is idle)."""
    db, t = server.client(), keys.thread_id(thread)
    held = [("lock", db.exists(keys.lock(t))), ("turn record", db.exists(keys.turn(t)))]
    held.append(("place in the turn index", db.zscore(keys.TURN_INDEX, t) is not None))
    return [what for what, there in held if there]


def assert_idle(server: RedisServer, thread: str, timeout: float = 10.0) -> None:
    """No stuck turn: the thread's last turn lets go of everything it held.
    A turn's ``done`` and its lock go in one step, its index entry just
    after: so this waits (bounded) rather than catch the pod in between."""
    try:
        wait_until(lambda: not turn_leftovers(server, thread), timeout, what="an idle thread")
    except AssertionError:
        raise AssertionError(f"stuck turn: {turn_leftovers(server, thread)}") from None


def assert_consistent(recs: Sequence[PyFollower], truth: Any, turns: int | None = None) -> None:
    """The end of every scenario: each client saw exactly the Redis log from
    its first event on, every turn in the log is whole (and there are
    ``turns`` of them, if given), and nothing is left locked or running.
    ``truth`` has ``client()``: a RedisServer, or the primary of a group."""
    for rec in recs:
        assert_matches_log(rec.events, truth, rec.thread)
        whole = assert_turns_well_formed(truth, rec.thread)
        if turns is not None:
            assert whole == turns, (rec.thread, whole)
        assert_idle(truth, rec.thread)
