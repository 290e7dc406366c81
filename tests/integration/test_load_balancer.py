"""Behind a real load balancer: nginx in front of three pods, configured as
docs/operations.md says (tests/integration/proxies.py reads it from there).

- round-robin without stickiness, the WebSocket upgrade forwarded: sockets of
  one thread land on different pods and see one timeline;
- with nginx rewriting ``Host``, the listed public origin is admitted and
  other origins refused; the client's address is taken from
  ``X-Forwarded-For`` only by a pod told to trust the proxy;
- an idle socket outlives the proxy's idle timeout (nginx's
  ``proxy_read_timeout``, HAProxy's ``timeout tunnel``, shortened to a few
  seconds here) because the pods ping it, while a pod that pings less often
  than that loses its idle sockets: the control that shows the test can fail;
- a rolling restart under load: each pod in turn gets SIGTERM while turns
  stream, drains and comes back; the clients (app.client and the TypeScript
  client, through nginx only) end with the Redis log's timeline, every
  prompt appended once, and no thread left locked.

One Redis, three pods and one nginx serve the whole module. The rolling
restart runs last: it leaves nginx briefly counting the restarted pods as
failed, which would skew the round-robin test.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests import procs
from tests.integration import proxies
from tests.integration.conftest import require_redis, track_pods
from tests.integration.followers import Follower, JsFollower, PyFollower
from tests.integration.helpers import (
    EPHEMERAL,
    Stopwatch,
    assert_idle,
    assert_matches_log,
    assert_turns_well_formed,
    open_ready,
    recv_event,
    refusal,
    send,
    stored_events,
    timeline,
    unique,
    until_done,
)
from tests.integration.test_js_client import JS, build_client, require_node
from tests.procs import RedisServer, Server, wait_until

JS_DIST = JS / "dist" / "index.js"

pytestmark = pytest.mark.integration

PUBLIC_ORIGIN = "https://chat.example.test"
POD_ENV = {
    "CHAT_ALLOWED_ORIGINS": PUBLIC_ORIGIN,
    "CHAT_FAKE_TOKEN_DELAY_MS": 10,
    "CHAT_FAKE_REPLY_TOKENS": 40,  # about half a second a turn
    # Pings every second, so the idle test can shorten the proxies' timeouts
    # to a few seconds (operators keep the 20 s default under 60 s ones).
    "CHAT_WS_PING_INTERVAL_S": 1,
}
IDLE_TIMEOUT_S = 3  # the shortened proxy timeout: three ping intervals
CLIENT_ADDRESS = "127.0.0.2"  # the tests' "remote" client; nginx listens on 127.0.0.1
SPOOFED = "203.0.113.9"


@dataclass
class Stack:
    redis: RedisServer
    pods: list[Server]
    nginx: Server


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    require_redis()
    proxies.require_nginx()
    workdir = tmp_path_factory.mktemp("lb")
    redis = RedisServer(workdir / "redis").start()
    pods = [procs.pod(f"pod{i}", redis.url, workdir / f"pod{i}.log", **POD_ENV) for i in range(3)]
    track_pods(request).extend(pods)
    try:
        with procs.running([*pods, proxies.nginx(workdir / "nginx", pods)]) as started:
            yield Stack(redis, pods, started[-1])
    finally:
        redis.stop()


def accepted(pod: Server, thread: str) -> list[str]:
    """The client addresses a pod logged accepting sockets of ``thread`` with."""
    return re.findall(rf'(\S+) - "WebSocket /v1/threads/{thread}/ws\S*" \[accepted\]', pod.logs())


async def test_round_robin_spreads_one_thread_over_every_pod(stack: Stack) -> None:
    thread = unique("rr")
    sockets = [(await open_ready(stack.nginx.ws, thread))[0] for _ in stack.pods]
    try:
        await send(sockets[0], {"type": "prompt", "content": "through nginx"})
        seen = await asyncio.gather(*(until_done(ws) for ws in sockets))
    finally:
        for ws in sockets:
            await ws.close()
    # No stickiness: three sockets from one client, one on each pod.
    assert [len(accepted(pod, thread)) for pod in stack.pods] == [1, 1, 1]
    # Upgraded and streaming on each: one timeline, the stored one.
    assert timeline(seen[1]) == timeline(seen[2]) == timeline(seen[0])
    assert_matches_log(seen[0], stack.redis, thread)
    assert seen[0][-1]["status"] == "complete"


async def test_the_listed_origin_is_admitted_though_nginx_rewrites_host(stack: Stack) -> None:
    url = f"{stack.nginx.ws}/v1/threads/{unique('origin')}/ws"
    ws = await websockets.connect(url, origin=PUBLIC_ORIGIN, open_timeout=10)  # type: ignore[arg-type]
    try:
        assert (await recv_event(ws))["type"] == "ready"
    finally:
        await ws.close()
    assert await refusal(url, origin="https://evil.example.test") == 403
    # The address the page was loaded from is not listed: were Host passed
    # through, the same-origin rule would admit it. nginx sends the upstream's
    # name instead, so only CHAT_ALLOWED_ORIGINS can admit a public origin.
    assert await refusal(url, origin=stack.nginx.http) == 403


async def test_the_client_address_is_believed_only_from_a_trusted_proxy(
    stack: Stack, pod_factory: Callable[..., Server], tmp_path: Path
) -> None:
    trusting = pod_factory(stack.redis, CHAT_FORWARDED_ALLOW_IPS="127.0.0.1")
    front = proxies.nginx(tmp_path / "nginx", [trusting])
    threads = {"default": unique("xff"), "trusting": unique("xff")}
    with procs.running([front]):
        for balancer, thread in ((stack.nginx, threads["default"]), (front, threads["trusting"])):
            # From another loopback address than nginx's, with a forged
            # header that the documented config must overwrite.
            ws = await websockets.connect(
                f"{balancer.ws}/v1/threads/{thread}/ws",
                additional_headers={"X-Forwarded-For": SPOOFED},
                local_addr=(CLIENT_ADDRESS, 0),
                open_timeout=10,
            )
            try:
                assert (await recv_event(ws))["type"] == "ready"
            finally:
                await ws.close()
    (by_default,) = [a for pod in stack.pods for a in accepted(pod, threads["default"])]
    (trusted,) = accepted(trusting, threads["trusting"])
    # By default the pod logs who connected to it: nginx.
    assert by_default.startswith("127.0.0.1:"), by_default
    # Told to trust nginx, the client nginx saw; never the forged address.
    assert trusted.split(":")[0] == CLIENT_ADDRESS, trusted
    assert SPOOFED not in trusting.logs() + "".join(p.logs() for p in stack.pods)


async def _idle(ws: Any, seconds: float) -> float | None:
    """Wait ``seconds`` on a socket that should carry nothing: None if it
    stayed open, else after how long it was closed."""
    clock = Stopwatch()
    try:
        async with asyncio.timeout(seconds):
            while True:  # presence is not traffic the client asked for
                frame = await ws.recv()
                if orjson.loads(frame)["type"] not in EPHEMERAL:
                    break
    except TimeoutError:
        return None
    except ConnectionClosed:
        return clock.elapsed
    raise AssertionError(f"an idle socket received {frame!r}")


async def test_idle_sockets_outlive_the_proxy_timeout_because_pods_ping(
    stack: Stack, pod_factory: Callable[..., Server], tmp_path: Path
) -> None:
    # The control: a pod that pings less often than the proxies' timeout.
    quiet = pod_factory(stack.redis, CHAT_WS_PING_INTERVAL_S=30)
    balancers = {
        "nginx": proxies.nginx(tmp_path / "nginx", stack.pods, IDLE_TIMEOUT_S),
        "nginx-control": proxies.nginx(tmp_path / "nginx-control", [quiet], IDLE_TIMEOUT_S),
        "haproxy": proxies.haproxy(tmp_path / "haproxy", stack.pods, IDLE_TIMEOUT_S),
        "haproxy-control": proxies.haproxy(tmp_path / "haproxy-control", [quiet], IDLE_TIMEOUT_S),
    }
    sockets: dict[str, Any] = {}
    with procs.running(list(balancers.values())):
        try:
            for name, balancer in balancers.items():
                # No client pings: a client's ping (and the pod's pong) would
                # keep the socket busy whatever the pod does.
                url = f"{balancer.ws}/v1/threads/{unique('idle')}/ws"
                sockets[name] = await websockets.connect(url, ping_interval=None, open_timeout=10)
                assert (await recv_event(sockets[name]))["type"] == "ready"
            idle = [_idle(ws, 2.2 * IDLE_TIMEOUT_S) for ws in sockets.values()]
            cut = dict(zip(sockets, await asyncio.gather(*idle), strict=True))
            for name in ("nginx", "haproxy"):
                assert cut[name] is None, f"{name} cut an idle socket after {cut[name]:.1f}s"
                await send(sockets[name], {"type": "ping"})  # and it still works
                assert (await recv_event(sockets[name], 5))["type"] == "pong"
        finally:
            for ws in sockets.values():
                await ws.close()
    for name in ("nginx-control", "haproxy-control"):
        assert cut[name] is not None, f"{name} kept a socket nothing crossed"
        assert IDLE_TIMEOUT_S - 0.5 < cut[name] < 2 * IDLE_TIMEOUT_S, (name, cut[name])


def test_the_documented_haproxy_config_is_valid(tmp_path: Path) -> None:
    output = proxies.check_haproxy(proxies.documented("haproxy"), tmp_path)
    assert "WARNING" not in output and "ALERT" not in output, output


async def test_a_client_waits_out_a_balancer_with_no_pod(
    stack: Stack, pod_factory: Callable[..., Server], tmp_path: Path
) -> None:
    """While its only pod restarts, nginx answers the handshake 502: the
    client backs off and retries (a 4xx would be final) and resumes."""
    pod = pod_factory(stack.redis)
    front = proxies.nginx(tmp_path / "nginx", [pod])
    thread = unique("nopod")
    follower = PyFollower(front.ws, thread)
    with procs.running([front]):
        try:
            await follower.start()
            await follower.prompt("before")
            await follower.until(lambda events: any(e["type"] == "done" for e in events), 15)
            assert await asyncio.to_thread(pod.terminate) == 0
            # Down long enough for a few refused attempts.
            await asyncio.to_thread(
                wait_until, lambda: _statuses(front).count("502") >= 2, 10, what="502 answers"
            )
            await asyncio.to_thread(pod.start)
            await follower.prompt("after")
            await follower.until(lambda ev: sum(e["type"] == "done" for e in ev) == 2, 15)
        finally:
            await follower.stop()
    assert follower.reconnects == 1
    assert_matches_log(follower.events, stack.redis, thread)
    assert assert_turns_well_formed(stack.redis, thread) == 2


def _statuses(nginx: Server) -> list[str]:
    """The HTTP status of every request nginx logged."""
    log = nginx.log_path.parent / "access.log"
    return [line.split('"')[2].split()[0] for line in log.read_text().splitlines()]


# --- the rolling restart (keep last: see the module docstring) ----------------


def _answered(client_msg_id: str) -> Callable[[list[dict[str, Any]]], bool]:
    """Whether the turn of the prompt ``client_msg_id`` is done: its user
    message was seen and a ``done`` after it (one writer per thread)."""

    def check(events: list[dict[str, Any]]) -> bool:
        at = next(
            (
                i
                for i, e in enumerate(events)
                if e["type"] == "message" and e["message"].get("client_msg_id") == client_msg_id
            ),
            None,
        )
        return at is not None and any(e["type"] == "done" for e in events[at:])

    return check


def _mid_turn(events: list[dict[str, Any]]) -> bool:
    return bool(events) and events[-1]["type"] == "delta"


@pytest.mark.timeout(120)
async def test_a_rolling_restart_under_load_loses_and_repeats_nothing(
    stack: Stack, tmp_path: Path
) -> None:
    node = require_node()
    if _stale(JS_DIST):
        build_client()
    # Three threads written by Python clients, one by a TypeScript client;
    # each followed by a reader of the other kind too.
    py_threads = [unique("roll") for _ in range(3)]
    js_thread = unique("rolljs")
    url = stack.nginx.ws
    py_writers = [PyFollower(url, t) for t in py_threads]
    js_writer = JsFollower(node, url, js_thread, tmp_path / "js-writer.log", write=True)
    js_reader = JsFollower(node, url, py_threads[0], tmp_path / "js-reader.log", write=False)
    writers: list[Follower] = [*py_writers, js_writer]
    readers: list[Follower] = [
        *(PyFollower(url, t) for t in py_threads),
        PyFollower(url, js_thread),
        js_reader,
    ]
    everyone = writers + readers
    rolled = asyncio.Event()

    async def write(writer: PyFollower) -> None:
        """Prompt after prompt, each once its predecessor is answered, until
        the roll is over (and at least once after it)."""
        while True:
            last_round = rolled.is_set()
            client_msg_id = await writer.prompt(f"prompt {len(writer.sent)}")
            await writer.until(_answered(client_msg_id), 30)
            if last_round:
                return

    try:
        for follower in everyone:
            await follower.start()
        writing = [asyncio.create_task(write(w)) for w in py_writers]
        # Every client has seen a turn (an id to resume after) before any pod goes.
        for follower in everyone:
            await follower.until(lambda events: any(e["type"] == "done" for e in events), 20)
        for pod in stack.pods:
            reconnects = sum(f.reconnects for f in everyone)
            done_before = [_dones(w.events) for w in writers]
            # SIGTERM while turns stream.
            await asyncio.to_thread(
                wait_until, lambda: any(_mid_turn(w.events) for w in writers), 10, what="a turn"
            )
            assert await asyncio.to_thread(pod.terminate) == 0, pod.logs()[-2000:]
            await asyncio.to_thread(pod.start)
            # Back in nginx's rotation (it skips a refusing pod for fail_timeout)
            # before the next one goes, as a rollout waits for readiness.
            await _routed_to(pod, stack.nginx)
            # The pod had sockets of ours (round-robin), and they moved.
            moved = reconnects + 1
            await asyncio.to_thread(
                wait_until,
                lambda: sum(f.reconnects for f in everyone) >= moved,  # noqa: B023
                15,
                what="clients of the restarted pod to reconnect",
            )
            # Load went on through the restart: every thread streamed another turn.
            for writer, before in zip(writers, done_before, strict=True):
                await writer.until(lambda ev, b=before: _dones(ev) > b + 1, 20)
        rolled.set()
        await asyncio.wait_for(asyncio.gather(*writing, js_writer.finish()), 30)
        # Readers catch up with the end of their thread's log.
        for reader in readers:
            last = stored_events(stack.redis, reader.thread)[-1]["id"]
            await reader.until(
                lambda ev, last=last: bool(timeline(ev)) and timeline(ev)[-1][0] == last, 15
            )
        await js_reader.finish()
    finally:
        for follower in everyone:
            await follower.stop()

    for follower in everyone:
        # Its first pod was restarted at some point: every client moved.
        assert follower.reconnects >= 1, follower
        readies = [e for e in follower.events if e["type"] == "ready"]
        assert [e.get("recovered") for e in readies[1:]] == [True] * follower.reconnects, follower
        assert_matches_log(follower.events, stack.redis, follower.thread)
    for writer in writers:
        log = stored_events(stack.redis, writer.thread)
        prompts = [
            e["message"].get("client_msg_id")
            for e in log
            if e["type"] == "message" and e["message"]["role"] == "user"
        ]
        # Every prompt appended once, though some were sent again after a reconnect.
        assert Counter(prompts) == Counter(writer.sent) == Counter(set(writer.sent)), writer
        assert assert_turns_well_formed(stack.redis, writer.thread) == len(writer.sent)
        # Drains let running turns finish (CHAT_DRAIN_GRACE_S): none was cut.
        assert {e["status"] for e in log if e["type"] == "done"} == {"complete"}
        assert_idle(stack.redis, writer.thread)


def _dones(events: list[dict[str, Any]]) -> int:
    return sum(e["type"] == "done" for e in events)


def _stale(dist: Path) -> bool:
    """Whether the compiled client is missing or older than its source."""
    sources = [p.stat().st_mtime for p in (JS / "src").glob("*.ts")]
    return not dist.exists() or dist.stat().st_mtime < max(sources)


async def _routed_to(pod: Server, balancer: Server, timeout: float = 15) -> None:
    """Open short sockets through ``balancer`` until one lands on ``pod``."""
    probe = unique("probe")
    async with asyncio.timeout(timeout):
        while not accepted(pod, probe):
            ws, _ = await open_ready(balancer.ws, probe)
            await ws.close()
            await asyncio.sleep(0.1)
