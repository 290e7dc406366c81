"""The thread protocol without a WebSocket, on real pods: the SSE stream is a
socket's stream (same frames, same order, across pods), ``Last-Event-ID``
resumes on another pod with the socket's gap rules, keep-alives flow, and
the HTTP prompt, history and cancel behave as their frames, with the REST
API's authentication, origin check and error bodies."""

from __future__ import annotations

import secrets
from typing import Annotated, Union

import httpx
import orjson
import pytest
from pydantic import Field, TypeAdapter

from app import schema
from app.main import create_app
from app.settings import Settings
from tests.integration.helpers import recv_event, send, until_done
from tests.integration.shared_pods import pods
from tests.integration.sse import open_stream
from tests.integration.tokens import AUTH_ENV, bearer, open_socket, token
from tests.test_schema import SOCKET, document_validator, payload_name

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_pods(request, tmp_path_factory):
    env = dict(
        AUTH_ENV, CHAT_SSE_KEEPALIVE_S=0.3, CHAT_FAKE_TOKEN_DELAY_MS=15,
        CHAT_MAX_PROMPT_CHARS=200, CHAT_ALLOWED_ORIGINS="https://app.example.test",
    )  # fmt: skip
    with pods(request, tmp_path_factory.mktemp("sse"), **env) as started:
        yield started


def thread_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def client(pod, user: str | None = "alice", **headers: str) -> httpx.AsyncClient:
    auth = bearer(user) if user else {}
    return httpx.AsyncClient(base_url=pod.http, headers={**auth, **headers}, timeout=10)


async def test_sse_listener_and_socket_on_other_pods_get_the_same_frames(two_pods):
    pod_a, pod_b = two_pods
    thread = thread_id("same")
    ws = await open_socket(pod_a.ws, thread, "alice")
    try:
        assert (await recv_event(ws))["type"] == "ready"
        # The EventSource way: no headers, the token in the query.
        async with (
            client(pod_b, None) as http,
            open_stream(http, thread, params={"token": token("alice")}) as stream,
        ):
            ready = await stream.next()
            assert (ready.event, ready.id, ready.retry) == ("ready", None, 1000)
            assert ready.json["generating"] is False and ready.json["thread_id"] == thread
            async with client(pod_b) as poster:
                posted = await poster.post(
                    f"/v1/threads/{thread}/messages", json={"content": "hello over http"}
                )
            assert posted.status_code == 202, posted.text
            over_sse = await stream.until("done")
        over_socket = [orjson.dumps(e).decode() for e in await until_done(ws)]
    finally:
        await ws.close()
    # Byte for byte the socket's frames, in the same order, with SSE ids and types.
    assert [e.data for e in over_sse] == over_socket
    assert [e.id for e in over_sse] == [orjson.loads(f)["id"] for f in over_socket]
    assert [e.event for e in over_sse] == [orjson.loads(f)["type"] for f in over_socket]
    assert posted.json() == orjson.loads(over_socket[0])
    assert posted.json()["message"]["content"] == "hello over http"
    types = [e.event for e in over_sse]
    assert types[:2] == ["message", "loading"] and types[-2:] == ["message", "done"]


async def test_last_event_id_resumes_on_another_pod(two_pods):
    pod_a, pod_b = two_pods
    thread = thread_id("resume")
    async with client(pod_a) as http_a, client(pod_b) as http_b:
        async with open_stream(http_a, thread) as stream:
            epoch = (await stream.next()).json["epoch"]
            await http_a.post(f"/v1/threads/{thread}/messages", json={"content": "count"})
            before = [await stream.next() for _ in range(5)]  # message, loading, 3 deltas
        assert before[-1].event == "delta"
        last = before[-1].id
        headers = {"Last-Event-ID": last}
        async with open_stream(http_b, thread, headers=headers, params={"epoch": epoch}) as stream:
            ready = await stream.next()
            assert ready.json["recovered"] is True
            after = await stream.until("done")
        events = [e.json for e in before + after]
        ids = [e["id"] for e in events]
        assert ids == sorted(set(ids), key=lambda i: tuple(map(int, i.split("-"))))
        assert [e["n"] for e in events] == list(range(events[0]["n"], events[0]["n"] + len(ids)))
        text = "".join(e["text"] for e in events if e["type"] == "delta")
        assert text == events[-2]["message"]["content"] and text
        # ?after= is the same resume; another epoch or an unknown id is never silent.
        async with open_stream(http_a, thread, params={"after": last}) as stream:
            assert (await stream.next()).json["recovered"] is True
            assert [e.id for e in await stream.until("done")] == [e.id for e in after]
        for query in ({"after": last, "epoch": "another"}, {"after": "99999999999999-0"}):
            async with open_stream(http_b, thread, params=query) as stream:
                assert (await stream.next()).json["recovered"] is False
        bad = await http_a.get(f"/v1/threads/{thread}/events", headers={"Last-Event-ID": "x"})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "bad_request"


async def test_idle_stream_sends_keepalive_comments(two_pods):
    async with client(two_pods[0]) as http, open_stream(http, thread_id("idle")) as stream:
        assert (await stream.next()).event == "ready"
        comment = await stream.next(timeout=5, comments=True)
        assert comment.comment == "keep-alive"


async def test_cancel_over_http_stops_a_turn_on_another_pod_with_no_socket(two_pods):
    pod_a, pod_b = two_pods
    thread = thread_id("cancel")
    async with client(pod_a) as http_a, client(pod_b) as http_b:
        idle = await http_b.post(f"/v1/threads/{thread}/cancel", json={})
        assert idle.status_code == 404  # not even created yet
        await http_a.post("/v1/threads", json={"id": thread})
        idle = await http_b.post(f"/v1/threads/{thread}/cancel")
        assert idle.status_code == 404 and idle.json()["error"]["code"] == "not_found"
        # A reply started over HTTP: no socket is open anywhere.
        posted = await http_a.post(f"/v1/threads/{thread}/messages", json={"content": "go on"})
        assert posted.status_code == 202
        cancelled = await http_b.post(f"/v1/threads/{thread}/cancel", json={})
        assert cancelled.status_code == 202, cancelled.text
        generation = cancelled.json()["generation_id"]

        async def reply() -> dict | None:
            page = (await http_b.get(f"/v1/threads/{thread}/messages")).json()
            replies = [m for m in page["messages"] if m["role"] == "assistant"]
            return replies[0] if replies else None

        final = None
        async with open_stream(http_b, thread) as stream:
            ready = (await stream.next()).json
            if ready["generating"]:
                assert ready["generation_id"] == generation
                done = (await stream.until("done"))[-1].json
                assert done["status"] == "cancelled"
            final = await reply()
        assert final is not None and final["status"] == "cancelled"


async def test_http_prompts_are_idempotent_and_refused_like_frames(two_pods):
    pod_a, pod_b = two_pods
    thread = thread_id("errors")
    url = f"/v1/threads/{thread}/messages"
    async with client(pod_a) as alice, client(pod_b, "bob") as bob, client(pod_a, None) as anon:
        assert (await anon.get(f"/v1/threads/{thread}/events")).status_code == 401
        unauth = await anon.post(url, json={"content": "hi"})
        assert unauth.status_code == 401 and unauth.json()["error"]["code"] == "unauthorized"
        assert (await alice.post(url, json={"content": "hi"})).status_code == 404
        await alice.post("/v1/threads", json={"id": thread})
        body = {"content": "once", "client_msg_id": "m-1"}
        first = await alice.post(url, json=body)
        busy = await alice.post(url, json={"content": "meanwhile"})
        again = await alice.post(url, json=body)
        assert first.status_code == 202 and again.status_code == 202
        assert again.json() == first.json()  # the original message, nothing new
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "thread_busy"
        for refused, status, code in [
            (await bob.post(url, json={"content": "hi"}), 403, "forbidden"),
            (await bob.get(f"/v1/threads/{thread}/events"), 403, "forbidden"),
            (await bob.post(f"/v1/threads/{thread}/cancel"), 403, "forbidden"),
            (await bob.get(url), 403, "forbidden"),
            (await alice.post(url, json={"content": ""}), 422, "bad_request"),
            (await alice.post(url, json={"content": "x", "extra": 1}), 422, "bad_request"),
            (await alice.post(url, json={"content": "x" * 201}), 413, "too_large"),
            (await alice.post(url, json={"content": "x" * 40000}), 413, "too_large"),
            (await alice.post(url, json={"content": "hi"}, headers={"Origin": "https://evil.test"}),
             403, "forbidden"),
        ]:  # fmt: skip
            assert (refused.status_code, refused.json()["error"]["code"]) == (status, code)
        allowed = await alice.get(url, headers={"Origin": "https://app.example.test"})
        assert allowed.headers["access-control-allow-origin"] == "https://app.example.test"

        resume = {"Last-Event-ID": first.json()["id"]}
        async with open_stream(alice, thread, headers=resume) as stream:
            await stream.until("done")  # the reply is committed
        async with client(pod_b) as on_b:
            page = (await on_b.get(url)).json()
        assert [m["content"] for m in page["messages"]][:1] == ["once"]
        assert [m["role"] for m in page["messages"]] == ["user", "assistant"]
        paths = (await anon.get("/openapi.json")).json()["paths"]
    for path in ("events", "messages", "cancel"):
        assert f"/v1/threads/{{thread_id}}/{path}" in paths
    assert "text/event-stream" in str(paths["/v1/threads/{thread_id}/events"]["get"])


async def test_every_frame_a_pod_sends_is_in_its_asyncapi_document(two_pods):
    """The served document is the one generated from the models, and every
    frame of a real session (socket and SSE) is valid for the models and for
    the document's schema of its message."""
    pod_a, pod_b = two_pods
    async with client(pod_a) as http:
        document = (await http.get("/asyncapi.json")).json()
    app = create_app(Settings(chat_auth="off"))
    assert document == schema.asyncapi(schema.websocket_paths(app.routes), app.version)
    channels = {c["address"]: cid for cid, c in document["channels"].items()}
    thread = thread_id("asyncapi")
    ws = await open_socket(pod_a.ws, thread, "alice")
    try:
        frames = [await recv_event(ws)]
        for frame in ({"type": "ping"}, {"type": "get_history"}, {"type": "nope"}):
            await send(ws, frame)
            frames.append(await recv_event(ws))
        await send(ws, {"type": "prompt", "content": "describe yourself"})
        frames += await until_done(ws)
    finally:
        await ws.close()
    first = next(f["id"] for f in frames if "id" in f)
    async with client(pod_b) as http, open_stream(http, thread, params={"after": first}) as sse:
        over_sse = [(await sse.next()).json, *[e.json for e in await sse.until("done")]]
    assert {f["type"] for f in frames} == {
        "ready", "pong", "history", "error", "message", "loading", "delta", "done",
    }  # fmt: skip
    models = TypeAdapter(
        Annotated[Union[tuple(schema.server_events().values())], Field(discriminator="type")]  # noqa: UP007
    )
    for address, seen in ((SOCKET, frames), (schema.SSE_PATH, over_sse)):
        for frame in seen:
            models.validate_python(frame)
            name = payload_name(document, channels[address], frame["type"])
            document_validator(document, name).validate(frame)


async def test_regenerate_over_http_answers_with_its_loading_event(two_pods):
    pod_a, pod_b = two_pods
    thread = thread_id("regen")
    async with client(pod_a) as http_a, client(pod_b) as http_b:
        await http_a.post("/v1/threads", json={"id": thread})
        async with open_stream(http_b, thread) as stream:
            await stream.next()
            posted = await http_a.post(f"/v1/threads/{thread}/messages", json={"content": "hi"})
            first = await stream.until("done")
            url = f"/v1/threads/{thread}/regenerate"
            question = posted.json()["message"]["id"]
            body = {"message_id": question, "client_msg_id": "again-1"}
            regenerated = await http_b.post(url, json=body)
            assert regenerated.status_code == 202, regenerated.text
            loading = regenerated.json()
            second = await stream.until("done")
            repeat = await http_a.post(url, json=body)
        assert repeat.status_code == 202 and repeat.json() == loading  # nothing new
        # Exactly the socket's turn, less the user message: loading, deltas, reply, done.
        assert second[0].json == loading and second[0].event == "loading"
        reply = second[-2].json["message"]
        assert (reply["role"], reply["parent_id"]) == ("assistant", question)
        assert first[-2].json["message"]["parent_id"] == question  # a sibling of the first
        for bad, status in (({"message_id": "1-1"}, 404), ({"message_id": "x"}, 422), ({}, 422)):
            refused = await http_a.post(url, json=bad)
            assert refused.status_code == status, refused.text
            assert refused.json()["error"]["code"] in {"not_found", "bad_request"}
        paths = (await http_a.get("/openapi.json")).json()["paths"]
    assert "/v1/threads/{thread_id}/regenerate" in paths
