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

Shared frames (``FrameWriter``): a server's WebSocket frames are not masked,
so an event's text frame is the same bytes for every socket; the pod encodes
it once and hands those bytes to each ready socket's transport, bypassing the
ASGI send (app.ws's fan-out). This relies on more of uvicorn, so it is
pinned on its own (FRAME_WRITES_UVICORN) and offered only by the
``websockets-sansio`` implementation, whose invariants the test asserts: it
writes whole frames only, in one ``transport.write`` each (nothing stays
buffered in its websockets protocol between sends), and its close state is
``close_sent`` / ``disconnected``. Under any other implementation or
version, or on a socket that negotiated permessage-deflate, there is no
``FrameWriter`` and every frame takes the ASGI send. A writer refuses a
frame (``plain()`` is False: the caller falls back) once a close started,
once the client is gone, and while the transport's write buffer is above
its high-water mark (uvicorn's ``writable`` is clear: an ASGI send would
wait, and so must this frame, so a client that stops reading still fills
its socket's queue and is closed 1013 exactly as before).

The one other reliance on uvicorn beyond its documented ``Config`` and
``Server.serve``: app.process's ``PodServer`` overrides ``Server.startup``
and ``Server.handle_exit`` (to log the bound port and bound the exit). Their
signatures are SERVER_HOOKS, checked by the same test.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import struct
from importlib.metadata import version
from typing import Any, cast

from starlette.websockets import WebSocket

SUPPORTED_UVICORN = ((0, 30), (0, 54))
SERVER_WS_IMPLEMENTATIONS = ("websockets-sansio", "websockets", "wsproto")
# Shared frames (FrameWriter) rely on websockets-sansio's attributes; checked
# against these versions only (inclusive). Outside them: the ASGI send.
FRAME_WRITES_UVICORN = ((0, 54), (0, 54))
FRAME_WRITES_IMPLEMENTATION = "websockets-sansio"
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


def client_gone(ws: WebSocket) -> bool:
    """Whether ``ws``'s TCP connection is closed or closing (the client left);
    False when the server is not uvicorn (then nobody knows)."""
    found = transport(ws)
    return found is not None and found.is_closing()


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


def text_frame(text: str) -> bytes:
    """``text`` as one server WebSocket frame: final, text, unmasked (RFC 6455
    5.2), byte for byte what uvicorn's send would write without extensions."""
    payload = text.encode()
    length = len(payload)
    if length < 126:
        return struct.pack("!BB", 0x81, length) + payload
    if length < 65536:
        return struct.pack("!BBH", 0x81, 126, length) + payload
    return struct.pack("!BBQ", 0x81, 127, length) + payload


class FrameWriter:
    """Writes whole, pre-encoded frames straight to one socket's transport
    (see the module docstring). Made by ``frame_writer`` once the socket is
    accepted; a frame is written only right after ``plain()`` said so:
    otherwise the caller sends it the ASGI way."""

    __slots__ = ("_open", "_protocol", "_transport", "_writable")

    def __init__(self, protocol: Any, open_state: object) -> None:
        self._protocol = protocol
        self._transport: asyncio.Transport = protocol.transport
        self._writable: asyncio.Event = protocol.writable
        self._open = open_state

    def plain(self) -> bool:
        """Whether a frame may be written now: no close started, the client
        still there, the write buffer under its high-water mark."""
        protocol = self._protocol
        return not (
            protocol.close_sent
            or protocol.disconnected
            or not self._writable.is_set()
            or protocol.conn.state is not self._open
            or self._transport.is_closing()
        )

    def write(self, frame: bytes) -> None:
        """Write one whole frame (``text_frame``); only right after ``plain()``."""
        self._transport.write(frame)


def frame_writer(ws: WebSocket) -> FrameWriter | None:
    """A ``FrameWriter`` for an accepted ``ws``, or None when its frames must
    take the ASGI send (another server, implementation or uvicorn version,
    permessage-deflate negotiated, a socket not open)."""
    sansio = _sansio()
    protocol = server_protocol(ws)
    if sansio is None or protocol is None or type(protocol) is not sansio[0]:
        return None
    found: Any = protocol
    conn = found.conn
    if (
        conn.extensions
        or not found.handshake_complete
        or found.initial_response is not None
        or conn.expect_continuation_frame
        or conn.state is not sansio[1]
    ):
        return None
    return FrameWriter(found, sansio[1])


@functools.cache
def _sansio() -> tuple[type, object] | None:
    """websockets-sansio's protocol class and its websockets OPEN state, when
    the installed uvicorn is one shared frames were checked against."""
    installed = tuple(int(part) for part in version("uvicorn").split(".")[:2])
    low, high = FRAME_WRITES_UVICORN
    if not low <= installed <= high:
        return None
    try:
        from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
        from websockets.protocol import State
    except ImportError:  # no websockets package: no sansio implementation either
        return None
    return WebSocketsSansIOProtocol, State.OPEN
