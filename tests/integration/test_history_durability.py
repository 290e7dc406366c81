"""Guarantee 4 and paging on real pods: committed history outlives the pod that
wrote it, is readable in Redis, and pages oldest-first with ``has_more``."""

from __future__ import annotations

from app.llm.fake import expected_reply
from tests.integration.helpers import get_history, open_ready, turn, unique

HISTORY_FIELDS = {"parent", "role", "content", "user_id", "status", "created_at"}


def _check(messages: list[dict], user_event: dict, assistant_event: dict, prompt: str) -> None:
    assert [(m["id"], m["role"], m["content"], m["status"]) for m in messages] == [
        (user_event["id"], "user", prompt, "complete"),
        (assistant_event["id"], "assistant", expected_reply(prompt, 30), "complete"),
    ]
    # A page adds each message's siblings (here: itself alone) to the event's.
    assert messages[0] == {**user_event["message"], "siblings": [user_event["id"]]}
    assert messages[1] == {**assistant_event["message"], "siblings": [assistant_event["id"]]}


async def test_history_survives_kill_9_of_the_writing_pod(redis_server, pod_factory):
    pod_a, pod_b = pod_factory(redis_server), pod_factory(redis_server)
    thread = unique("durable")
    prompt = "remember this after the crash"
    ws, ready = await open_ready(pod_a.ws, thread)
    assert ready["last_event_id"] is None and ready["generating"] is False
    try:
        events = await turn(ws, prompt)
    finally:
        await ws.close()
    user_event, assistant_event, done = events[0], events[-2], events[-1]
    assert user_event["type"] == "message" and user_event["message"]["id"] == user_event["id"]
    assert assistant_event["type"] == "message"
    assert assistant_event["message"]["id"] == assistant_event["id"] == done["message_id"]
    assert done["status"] == "complete"

    pod_a.kill()

    # Another pod, a brand-new pod, and the killed pod restarted all see it.
    pod_c = pod_factory(redis_server)
    pod_a.start()
    for pod in (pod_b, pod_c, pod_a):
        ws, ready = await open_ready(pod.ws, thread)
        try:
            assert ready["last_event_id"] == done["id"] and ready["generating"] is False
            page = await get_history(ws)
        finally:
            await ws.close()
        assert page["has_more"] is False
        _check(page["messages"], user_event, assistant_event, prompt)

    # And directly in Redis, readable by an operator.
    entries = redis_server.client().xrange(f"chat:{{{thread}}}:history", "-", "+")
    assert [entry_id for entry_id, _ in entries] == [user_event["id"], assistant_event["id"]]
    for (_, fields), role in zip(entries, ("user", "assistant"), strict=True):
        assert HISTORY_FIELDS <= fields.keys(), fields
        assert fields["role"] == role and fields["status"] == "complete"
        assert fields["created_at"].isdigit()
    assert entries[0][1]["user_id"] == "anonymous"  # the sender (auth off)
    assert entries[1][1]["user_id"] == assistant_event["message"]["user_id"]
    assert entries[0][1]["content"] == prompt
    assert entries[1][1]["content"] == expected_reply(prompt, 30)


async def test_history_pages_walk_every_message_oldest_first(redis_server, pod_factory):
    pod = pod_factory(redis_server, CHAT_FAKE_REPLY_TOKENS=3, CHAT_FAKE_TOKEN_DELAY_MS=0)
    thread = unique("pages")
    prompts = [f"question number {i}" for i in range(4)]
    ws, _ = await open_ready(pod.ws, thread)
    try:
        for prompt in prompts:
            assert (await turn(ws, prompt))[-1]["status"] == "complete"
        expected = []
        for prompt in prompts:
            expected += [("user", prompt), ("assistant", expected_reply(prompt, 3))]

        everything = await get_history(ws, limit=200)
        assert everything["has_more"] is False
        all_messages = everything["messages"]
        assert [(m["role"], m["content"]) for m in all_messages] == expected
        ids = [m["id"] for m in all_messages]
        assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))

        for limit in (2, 3):
            pages: list[list[dict]] = []
            before = None
            while True:
                params = {"limit": limit} | ({"before": before} if before else {})
                page = await get_history(ws, **params)
                pages.append(page["messages"])
                if not page["has_more"]:
                    break
                assert len(page["messages"]) == limit
                before = page["messages"][0]["id"]
                assert len(pages) <= len(expected), "paging never ends"
            walked = [m for p in reversed(pages) for m in p]
            assert walked == all_messages, f"limit={limit}"
            assert len(pages) == -(-len(expected) // limit)

        oldest = await get_history(ws, before=ids[0])
        assert oldest == {**oldest, "messages": [], "has_more": False}
        newest_two = await get_history(ws, limit=2)
        assert newest_two["messages"] == all_messages[-2:] and newest_two["has_more"] is True
        middle = await get_history(ws, before=ids[4], limit=200)
        assert middle["messages"] == all_messages[:4] and middle["has_more"] is False
    finally:
        await ws.close()
