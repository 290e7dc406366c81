"""Guarantee 3 on real pods: prompts racing on two pods for one thread give
exactly one turn; the loser is told ``thread_busy`` (retryable) and may send
again once the turn is done."""

from __future__ import annotations

import asyncio

from app.llm.fake import expected_reply
from tests.integration.helpers import open_ready, send, turn, unique, until_done

TOKENS = 12  # 12 tokens x 20 ms: the turn outlasts the race by far
ROUNDS = 5


async def test_racing_prompts_on_two_pods_give_exactly_one_turn(redis_server, pod_factory):
    env = {"CHAT_FAKE_TOKEN_DELAY_MS": 20, "CHAT_FAKE_REPLY_TOKENS": TOKENS}
    pods = [pod_factory(redis_server, **env), pod_factory(redis_server, **env)]
    r = redis_server.client()
    for round_ in range(ROUNDS):
        thread = unique(f"race{round_}")
        sockets = [(await open_ready(pod.ws, thread))[0] for pod in pods]
        prompts = [f"socket {i} of round {round_}" for i in range(2)]
        try:
            await asyncio.gather(
                *(
                    send(ws, {"type": "prompt", "content": p})
                    for ws, p in zip(sockets, prompts, strict=True)
                )
            )
            seen = await asyncio.gather(*(until_done(ws) for ws in sockets))

            errors = [[e for e in events if e["type"] == "error"] for events in seen]
            losers = [i for i, errs in enumerate(errors) if errs]
            assert len(losers) == 1, f"round {round_}: errors per socket {errors}"
            loser = losers[0]
            winner = 1 - loser
            (busy,) = errors[loser]
            assert busy["code"] == "thread_busy" and busy["retryable"] is True, busy

            # Both sockets saw the same single turn: one loading, one done.
            for events in seen:
                timeline = [e for e in events if e["type"] != "error"]
                types = [e["type"] for e in timeline]
                assert types.count("loading") == 1 and types.count("done") == 1, types
                assert types[:2] == ["message", "loading"] and types[-2:] == ["message", "done"]
                assert timeline[0]["message"]["content"] == prompts[winner]
            assert [e["id"] for e in seen[0] if "id" in e] == [
                e["id"] for e in seen[1] if "id" in e
            ]

            # Redis holds exactly the winner's message and the one reply.
            entries = r.xrange(f"chat:{{{thread}}}:history")
            assert [(f["role"], f["content"]) for _, f in entries] == [
                ("user", prompts[winner]),
                ("assistant", expected_reply(prompts[winner], TOKENS)),
            ]
            done = seen[winner][-1]
            assert done["status"] == "complete" and done["message_id"] == entries[1][0]
            assert r.exists(f"chat:{{{thread}}}:lock") == 0

            # The thread is free again: the loser's retry is served.
            retry = f"retry of socket {loser} in round {round_}"
            again = await turn(sockets[loser], retry)
            assert [e["type"] for e in again if e["type"] == "error"] == []
            assert again[0]["type"] == "message" and again[0]["message"]["content"] == retry
            assert again[-1]["type"] == "done" and again[-1]["status"] == "complete"
            roles = [f["role"] for _, f in r.xrange(f"chat:{{{thread}}}:history")]
            assert roles == ["user", "assistant", "user", "assistant"]
        finally:
            for ws in sockets:
                await ws.close()
