"""The uvicorn adapter (app.uvicorn_adapter) against the installed uvicorn.

A real uvicorn serves a real Starlette WebSocket route, once per WebSocket
implementation; the adapter must find the connection behind the socket and
cut it. This is the test that fails when a uvicorn upgrade changes what the
adapter relies on.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
from importlib.metadata import version

import pytest
import uvicorn
import websockets
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.exceptions import ConnectionClosed

from app import uvicorn_adapter


def test_installed_uvicorn_is_one_the_adapter_was_checked_against() -> None:
    installed = tuple(int(part) for part in version("uvicorn").split(".")[:2])
    low, high = uvicorn_adapter.SUPPORTED_UVICORN
    assert low <= installed <= high, (
        f"uvicorn {version('uvicorn')} is outside {low}..{high}: re-check app/uvicorn_adapter.py "
        "against it (this test's other cases must pass), then widen SUPPORTED_UVICORN"
    )


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

    # Listening before uvicorn serves: the client's connect waits in the backlog.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = uvicorn.Config(
        Starlette(routes=[WebSocketRoute("/ws", endpoint)]),
        ws=implementation, lifespan="off", log_level="warning",
    )  # fmt: skip
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        async with asyncio.timeout(10):
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as client:
                assert await client.recv() == "hello"
                with pytest.raises(ConnectionClosed) as closed:
                    await client.recv()
        assert await found, f"no uvicorn protocol found behind a socket ({implementation})"
        # Cut, not closed: no close frame reached the client.
        assert closed.value.rcvd is None
    finally:
        test_over.set()
        server.should_exit = True
        await serving
        listener.close()
