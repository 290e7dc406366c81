"""Socket leases on real pods and a private redis-server: a pod renews the
leases of all its sockets (their users' socket counts and their presence
entries) in a few script calls per tick, however many users and threads they
belong to, and a pod killed -9 stops counting against its users' socket
limits within CHAT_SOCKET_LEASE_MS."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from tests.integration.helpers import close_code, expect, recv_event, unique
from tests.integration.tokens import AUTH_ENV, open_socket

pytestmark = pytest.mark.integration

LEASE_MS = 1500  # renewed every 500 ms
USERS = 40


class Monitor:
    """The commands a redis-server runs, as MONITOR shows them, from start to stop."""

    def __init__(self, server: Any) -> None:
        self._monitor = server.client().monitor()
        self._monitor.__enter__()
        self.commands: list[str] = []
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        try:
            for command in self._monitor.listen():
                if command.get("client_type") != "lua":  # a script's own: no round trip
                    self.commands.append(command["command"])
        except Exception:  # stopped: the connection was closed under it
            return

    def stop(self) -> list[str]:
        self._monitor.__exit__(None, None, None)
        self._thread.join(timeout=5)
        return list(self.commands)


async def test_leases_are_renewed_in_a_few_calls_and_lapse_after_a_kill(
    redis_server: Any, pod_factory: Any
) -> None:
    env = {**AUTH_ENV, "CHAT_SOCKET_LEASE_MS": LEASE_MS, "CHAT_MAX_SOCKETS_PER_USER": 1}
    pod_a = pod_factory(redis_server, **env)
    pod_b = pod_factory(redis_server, **env)
    users = [unique("leased") for _ in range(USERS)]
    sockets = [await open_socket(pod_a.ws, unique("t"), u) for u in users]
    for ws in sockets:
        await expect(ws, "ready")

    # Renewals over a window of six ticks: one call per tick for all forty
    # users (one per user would be 240).
    monitor = Monitor(redis_server)
    await asyncio.sleep(2 * LEASE_MS / 1000)
    seen = monitor.stop()
    renewals = [c for c in seen if c.startswith("EVALSHA") and ":sockets" in c]
    assert 1 <= len(renewals) <= 8, renewals
    assert all(c.count(":sockets") == USERS for c in renewals)
    # So are the sockets' presence entries: one call per tick for all forty
    # threads (a few more calls read the sets nudged by the last joins).
    presence = [c for c in seen if c.startswith("EVALSHA") and ":presence" in c]
    assert len(presence) <= 10 and max(c.count(":presence") for c in presence) == USERS

    # Renewed: two leases later, each user's one socket still counts.
    refused = await open_socket(pod_b.ws, unique("t"), users[0])
    assert (await close_code(refused))[1] == 1013
    # Pod A dies without a goodbye: its sockets' leases end within a lease
    # of the kill (read on the Redis clock, which the leases run on), and
    # pod B then admits the user again.
    pod_a.kill()
    db = redis_server.client()
    seconds, micros = db.time()
    killed_ms = seconds * 1000 + micros // 1000
    for user in users:
        leases = db.zrange(f"chat:user:{{{user}}}:sockets", 0, -1, withscores=True)
        assert leases and all(expiry <= killed_ms + LEASE_MS for _, expiry in leases), leases
    deadline = time.monotonic() + LEASE_MS / 1000 + 10
    while True:
        ws = await open_socket(pod_b.ws, unique("t"), users[0])
        first = await recv_event(ws)  # ready, or rate_limited before a 1013
        await ws.close()
        if first["type"] == "ready":
            break
        assert first["code"] == "rate_limited", first
        assert time.monotonic() < deadline, "pod B never admitted the user again"
        await asyncio.sleep(0.05)
    for ws in sockets:
        await ws.close()
