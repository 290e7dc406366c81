"""Uvicorn's internals, in one place: the only module that knows them.

ASGI gives an application no call to cut a connection or to reach its
socket, and the pod needs both (a client that stopped reading cannot even
receive a close frame). Uvicorn's WebSocket protocol objects hold the asyncio
transport; this module finds the protocol behind a Starlette ``WebSocket``
and offers what the pod does with it. Nothing else in the project may touch
uvicorn's objects: write new uses (e.g. frames written straight to the
transport) here.

Checked against uvicorn SUPPORTED_UVICORN (inclusive), with each of its
WebSocket implementations: ``websockets-sansio`` (what ``ws="auto"`` picks
with the websockets package installed, i.e. a pod's), ``websockets`` and
``wsproto``. tests/test_uvicorn_adapter.py runs a real uvicorn with each and
fails when the installed uvicorn is outside that range or no longer works
this way: then re-check this module and widen the range.

The one other reliance on uvicorn beyond its documented ``Config`` and
``Server.serve``: app.process's ``PodServer`` overrides ``Server.startup``
and ``Server.handle_exit`` (to log the bound port and bound the exit). Their
signatures are SERVER_HOOKS, checked by the same test.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, cast

from starlette.websockets import WebSocket

SUPPORTED_UVICORN = ((0, 30), (0, 54))
SERVER_WS_IMPLEMENTATIONS = ("websockets-sansio", "websockets", "wsproto")
# uvicorn.Server methods app.process overrides, and their parameters.
SERVER_HOOKS = {"startup": ("self", "sockets"), "handle_exit": ("self", "sig", "frame")}

# How many wrappers deep uvicorn's send may sit (Starlette wraps it for its
# exception handling; middleware may add more).
_MAX_WRAPPERS = 16


def server_protocol(ws: WebSocket) -> asyncio.Protocol | None:
    """The uvicorn protocol object serving ``ws``, or None under another server.

    The route gets a wrapper of uvicorn's bound ``send`` (the protocol's
    method), so the protocol is looked for in the wrappers' closures too, a
    few levels deep."""
    pending: list[Any] = [ws._send]
    for _ in range(_MAX_WRAPPERS):
        if not pending:
            return None
        send = pending.pop(0)
        owner = getattr(send, "__self__", None)
        if isinstance(owner, asyncio.Protocol) and _transport_of(owner) is not None:
            return owner
        for cell in getattr(send, "__closure__", None) or ():
            with contextlib.suppress(ValueError):  # an empty cell
                if callable(cell.cell_contents):
                    pending.append(cell.cell_contents)
    return None


def transport(ws: WebSocket) -> asyncio.Transport | None:
    """The asyncio transport (the TCP connection) under ``ws``, if reachable."""
    protocol = server_protocol(ws)
    return None if protocol is None else _transport_of(protocol)


def abort(ws: WebSocket) -> bool:
    """Drop ``ws``'s TCP connection at once (no close frame, buffers
    discarded); False when the server is not uvicorn, and the connection
    then ends when the handler returns."""
    found = transport(ws)
    if found is None:
        return False
    found.abort()
    return True


def _transport_of(protocol: asyncio.Protocol) -> asyncio.Transport | None:
    # Duck-typed: uvloop's transports (a pod's loop) do not subclass asyncio's.
    found = getattr(protocol, "transport", None)
    return cast("asyncio.Transport", found) if hasattr(found, "abort") else None
