"""The uvicorn adapter (app.uvicorn_adapter) against the installed uvicorn.

A real uvicorn serves a real Starlette WebSocket route, once per WebSocket
implementation; the adapter must find the connection behind the socket and
cut it, and (websockets-sansio only) write shared frames that a client
receives byte for byte as it receives ASGI sends. This is the test that
fails when a uvicorn upgrade changes what the adapter relies on.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib.metadata import version
from typing import Any

import pytest
import uvicorn
import websockets
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from app import uvicorn_adapter
from tests.conftest import wait_until


def test_installed_uvicorn_is_one_the_adapter_was_checked_against() -> None:
    installed = tuple(int(part) for part in version("uvicorn").split(".")[:2])
    low, high = uvicorn_adapter.SUPPORTED_UVICORN
    assert low <= installed <= high, (
        f"uvicorn {version('uvicorn')} is outside {low}..{high}: re-check app/uvicorn_adapter.py "
        "against it (this test's other cases must pass), then widen SUPPORTED_UVICORN"
    )


def test_the_installed_uvicorn_is_one_shared_frames_were_checked_against() -> None:
    installed = tuple(int(part) for part in version("uvicorn").split(".")[:2])
    low, high = uvicorn_adapter.FRAME_WRITES_UVICORN
    assert low <= installed <= high, (
        f"uvicorn {version('uvicorn')} is outside {low}..{high} for shared frames: re-check "
        "FrameWriter against its websockets-sansio protocol (this test's frame cases must "
        "pass), then widen FRAME_WRITES_UVICORN"
    )


@asynccontextmanager
async def serving(
    endpoint: Callable[[WebSocket], Awaitable[None]], implementation: str, deflate: bool = False
) -> AsyncIterator[int]:
    """A real uvicorn serving ``endpoint`` at /ws; yields its port."""
    # Listening before uvicorn serves: the client's connect waits in the backlog.
    listener = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(
        Starlette(routes=[WebSocketRoute("/ws", endpoint)]), ws=implementation,
        ws_per_message_deflate=deflate, lifespan="off", log_level="warning",
    )  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        yield listener.getsockname()[1]
    finally:
        server.should_exit = True
        await task
        listener.close()


def test_the_server_methods_app_process_overrides_are_still_there() -> None:
    for name, parameters in uvicorn_adapter.SERVER_HOOKS.items():
        method = getattr(uvicorn.Server, name, None)
        assert method is not None, f"uvicorn.Server.{name} is gone: re-check app.process"
        found = tuple(inspect.signature(method).parameters)
        assert found == parameters, f"uvicorn.Server.{name}{found}: re-check app.process"


@pytest.mark.parametrize("implementation", uvicorn_adapter.SERVER_WS_IMPLEMENTATIONS)
async def test_abort_cuts_the_connection_behind_a_socket(implementation: str) -> None:
    found: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    test_over = asyncio.Event()

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text("hello")
        found.set_result(uvicorn_adapter.server_protocol(ws) is not None)
        uvicorn_adapter.abort(ws)
        await test_over.wait()  # the handler lives on: the cut alone ends the connection

    try:
        async with serving(endpoint, implementation) as port, asyncio.timeout(10):
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as client:
                assert await client.recv() == "hello"
                with pytest.raises(ConnectionClosed) as closed:
                    await client.recv()
            assert await found, f"no uvicorn protocol found behind a socket ({implementation})"
            # Cut, not closed: no close frame reached the client.
            assert closed.value.rcvd is None
            test_over.set()
    finally:
        test_over.set()


@pytest.mark.parametrize("implementation", uvicorn_adapter.SERVER_WS_IMPLEMENTATIONS)
async def test_client_gone_once_the_client_closed_its_connection(implementation: str) -> None:
    accepted, client_left, checked = asyncio.Event(), asyncio.Event(), asyncio.Event()
    seen: list[bool] = []

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        seen.append(uvicorn_adapter.client_gone(ws))
        accepted.set()
        await client_left.wait()
        # The server learns of the close as its loop runs.
        seen.append(await wait_until(lambda: uvicorn_adapter.client_gone(ws), what="gone"))
        checked.set()

    async with serving(endpoint, implementation) as port, asyncio.timeout(10):
        client = await websockets.connect(f"ws://127.0.0.1:{port}/ws")
        await accepted.wait()
        client.transport.abort()  # a client that gave up: no close handshake
        client_left.set()
        await checked.wait()
    assert seen == [False, True], implementation


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_a_text_frame_is_what_websockets_serializes(size: int) -> None:
    text = ("é" * size)[:size] if size % 2 else "x" * size
    expected = Frame(Opcode.TEXT, text.encode()).serialize(mask=False)
    assert uvicorn_adapter.text_frame(text) == expected


# Payloads around every frame-length boundary, and non-ASCII text.
PAYLOADS = ["", "a", '{"type":"delta","text":"é ✓"}', "x" * 125, "y" * 126, "z" * 65535,
            "w" * 65536, "ü" * 40000]  # fmt: skip


class RawClient:
    """A WebSocket client on a plain TCP socket, to see the exact bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def frame(self) -> bytes:
        """One whole frame, exactly as it came off the wire."""
        head = await self.reader.readexactly(2)
        length, extra = head[1] & 0x7F, b""
        if length == 126:
            extra = await self.reader.readexactly(2)
            length = int.from_bytes(extra, "big")
        elif length == 127:
            extra = await self.reader.readexactly(8)
            length = int.from_bytes(extra, "big")
        return head + extra + await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def test_shared_frames_reach_a_client_byte_for_byte_as_asgi_sends() -> None:
    writers: list[uvicorn_adapter.FrameWriter | None] = []
    test_over = asyncio.Event()

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        writer = uvicorn_adapter.frame_writer(ws)
        writers.append(writer)
        assert writer is not None
        for payload in PAYLOADS:  # each payload twice: the ASGI send, then the shared frame
            await ws.send_text(payload)
            assert writer.plain()
            writer.write(uvicorn_adapter.text_frame(payload))
        await test_over.wait()

    async with serving(endpoint, "websockets-sansio") as port, asyncio.timeout(10):
        raw = await RawClient.connect(port)
        try:
            for payload in PAYLOADS:
                through_asgi, shared = await raw.frame(), await raw.frame()
                assert shared == through_asgi, f"{len(payload)}-char payload differs"
                assert through_asgi.endswith(payload.encode())
        finally:
            raw.close()
            test_over.set()
    # And a real WebSocket client reads them as the same messages.
    test_over.clear()
    async with serving(endpoint, "websockets-sansio") as port, asyncio.timeout(10):
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws", max_size=None) as client:
            for payload in PAYLOADS:
                assert await client.recv() == payload
                assert await client.recv() == payload
            test_over.set()


async def test_sansio_writes_whole_frames_and_its_close_state_stops_shared_frames() -> None:
    """The invariants FrameWriter relies on: after any send (or ping) nothing
    of a frame stays in uvicorn's websockets protocol, so writing between
    sends never splits a frame; a close started, a full write buffer and a
    gone client each make the socket not plain."""
    checks: asyncio.Future[dict[str, bool]] = asyncio.get_running_loop().create_future()
    test_over = asyncio.Event()

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        writer = uvicorn_adapter.frame_writer(ws)
        assert writer is not None
        protocol: Any = uvicorn_adapter.server_protocol(ws)
        found = {"open": writer.plain()}
        await ws.send_text("one")
        found["nothing pending after a send"] = protocol.conn.data_to_send() == []
        protocol.send_keepalive_ping()
        found["nothing pending after a ping"] = protocol.conn.data_to_send() == []
        # The client does not read: fill its buffers until uvicorn pauses writing.
        frame = uvicorn_adapter.text_frame("p" * 60000)
        for _ in range(10000):
            if not writer.plain():
                break
            writer.write(frame)
        found["paused above the high-water mark"] = not protocol.writable.is_set()
        found["not plain while paused"] = not writer.plain()
        checks.set_result(found)
        await test_over.wait()

    async with serving(endpoint, "websockets-sansio") as port, asyncio.timeout(20):
        raw = await RawClient.connect(port)
        try:
            assert all((await checks).values()), await checks
        finally:
            raw.close()
            test_over.set()

    closed: asyncio.Future[dict[str, bool]] = asyncio.get_running_loop().create_future()

    async def closing(ws: WebSocket) -> None:
        await ws.accept()
        writer = uvicorn_adapter.frame_writer(ws)
        assert writer is not None
        found = {"open": writer.plain()}
        await ws.close(1013)
        found["not plain once a close started"] = not writer.plain()
        closed.set_result(found)

    gone: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    async def left(ws: WebSocket) -> None:
        await ws.accept()
        writer = uvicorn_adapter.frame_writer(ws)
        assert writer is not None
        with contextlib.suppress(Exception):
            await ws.receive_text()  # until the client leaves
        gone.set_result(not writer.plain())

    async with serving(closing, "websockets-sansio") as port, asyncio.timeout(10):
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as client:
            with pytest.raises(ConnectionClosed):
                await client.recv()
        assert all((await closed).values()), await closed
    async with serving(left, "websockets-sansio") as port, asyncio.timeout(10):
        raw = await RawClient.connect(port)
        raw.close()
        assert await gone, "a socket whose client left is still plain"


@pytest.mark.parametrize(
    ("implementation", "deflate"),
    [("websockets", False), ("wsproto", False), ("websockets-sansio", True)],
)
async def test_no_shared_frames_where_the_socket_is_not_plain(
    implementation: str, deflate: bool
) -> None:
    """Other WebSocket implementations, and a socket with permessage-deflate
    negotiated (the websockets client offers it), send the ASGI way only."""
    found: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    async def endpoint(ws: WebSocket) -> None:
        await ws.accept()
        found.set_result(uvicorn_adapter.frame_writer(ws))
        await ws.send_text("hello")

    async with serving(endpoint, implementation, deflate=deflate) as port, asyncio.timeout(10):
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as client:
            assert await client.recv() == "hello"
            if deflate:
                assert client.protocol.extensions, "the client did not negotiate deflate"
    assert await found is None
