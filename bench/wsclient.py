"""A deliberately small WebSocket client for the load generator.

Every system under test is driven by the same client, so whatever it costs
is the same for all of them; and it costs little, because the load generator
shares the machine's two cores with the servers it measures. It is an
``asyncio.Protocol`` that parses server frames straight out of
``data_received`` and hands each complete message to a callback together with
one receive timestamp per read (every frame of one read arrived together).

Not a general client: no extensions (none is offered, so the server uses
none), no TLS, text and binary messages only. Client frames are masked with
the all-zero key, which RFC 6455 allows and every server accepts, so sending
costs no XOR in Python.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import time
from collections.abc import Callable

OnMessage = Callable[[bytes, float], None]

_OP_CONT, _OP_TEXT, _OP_BIN, _OP_CLOSE, _OP_PING, _OP_PONG = 0, 1, 2, 8, 9, 10
_ZERO_MASK = b"\x00\x00\x00\x00"


class HandshakeError(Exception):
    """The server did not answer the upgrade with 101."""


def _frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + _ZERO_MASK + payload


class WSClient(asyncio.Protocol):
    """One client connection. ``on_message(payload, received_at)`` runs
    synchronously for each message, in order; it must not block."""

    def __init__(
        self, request: bytes, on_message: OnMessage, on_open: Callable[[WSClient], None] | None
    ) -> None:
        self._request = request
        self.on_message = on_message
        self._on_open = on_open
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buf = b""
        self._handshaken = False
        self._fragments: list[bytes] = []
        self.pings = 0  # the server's keep-alive pings (WebSocket PING frames) answered
        self.close_code: int | None = None  # the server's close frame's code, once it came

    # --- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        if not self._handshaken:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._buf = buf
                return
            status = buf[: buf.find(b"\r\n")]
            if b" 101 " not in status + b" ":
                self._fail(HandshakeError(status.decode(errors="replace")))
                return
            self._handshaken = True
            if self._on_open is not None:
                self._on_open(self)  # before any message: the callback may need to reply
            if not self.opened.done():
                self.opened.set_result(None)
            buf = buf[end + 4 :]
        self._buf = self._parse(buf, time.time())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during the handshake"))
        if not self.closed.done():
            self.closed.set_result(None)

    # --- frames --------------------------------------------------------------

    def _parse(self, buf: bytes, now: float) -> bytes:
        pos, size = 0, len(buf)
        on_message = self.on_message
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            end = pos + head + length
            if end > size:
                break
            payload = buf[pos + head : end]
            pos = end
            opcode = b0 & 0x0F
            if opcode in (_OP_TEXT, _OP_BIN):
                if b0 & 0x80:
                    on_message(payload, now)
                else:
                    self._fragments = [payload]
            elif opcode == _OP_CONT:
                self._fragments.append(payload)
                if b0 & 0x80:
                    on_message(b"".join(self._fragments), now)
                    self._fragments = []
            elif opcode == _OP_PING:
                self.pings += 1
                self._write(_frame(_OP_PONG, payload))
            elif opcode == _OP_CLOSE:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self._write(_frame(_OP_CLOSE, payload[:2]))
                if self.transport is not None:
                    self.transport.close()
                return b""
        return buf[pos:] if pos < size else b""

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _fail(self, exc: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    # --- API -------------------------------------------------------------------

    def send_text(self, text: str | bytes) -> None:
        self._write(_frame(_OP_TEXT, text.encode() if isinstance(text, str) else text))

    def close(self) -> None:
        """Send a normal close and let the connection go."""
        self._write(_frame(_OP_CLOSE, struct.pack("!H", 1000)))
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def connect(
    host: str,
    port: int,
    path: str,
    on_message: OnMessage,
    on_open: Callable[[WSClient], None] | None = None,
) -> WSClient:
    """Open a WebSocket to ``ws://host:port/path``; returns once upgraded (the
    caller bounds the wait, with ``asyncio.timeout``). ``on_open(client)`` runs
    once upgraded, before the first message is handed over."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(
        lambda: WSClient(request, on_message, on_open), host, port
    )
    try:
        await client.opened
    except BaseException:
        client.abort()
        raise
    return client
