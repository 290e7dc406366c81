"""A fault-injecting TCP proxy for the sick-network tests (test_sick_network,
test_deaf_subscriber): pods talk to Redis through it, and the test makes the
network slow, silent or cut while every connection stays what it was.

It runs its own event loop in a background thread, so a module's tests can
share one proxy whatever event loop each test runs in. Faults:

- ``latency(s)``: every round trip takes ``s`` seconds longer (each chunk is
  held ``s/2`` each way, order kept);
- ``blackhole()``: bytes are read and dropped, both ways, and connections
  stay open: a half-open network that only timeouts and probes detect; new
  connections are accepted and go nowhere too;
- ``blackhole(subscribers=True)``: the same, for pub/sub connections only;
- ``cut_subscribers()``: closes (RST) only the connections that sent a
  SUBSCRIBE, as Redis does to a subscriber past its output-buffer limit;
- ``heal()``: back to a clean network (connections made meanwhile stay).

A connection counts as a subscriber once its client sent a (S)SUBSCRIBE.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's and Redis's transports."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    subscriber: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for writer in (self.client, self.server):
            writer.transport.abort()


class FaultProxy:
    """Listens on 127.0.0.1:``port`` and forwards to 127.0.0.1:``target``."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.delay_s = 0.0
        self._blackhole_all = False
        self._blackhole_subscribers = False
        self._links: set[_Link] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._accept, "127.0.0.1", 0))
        sock: socket.socket = self._server.sockets[0]
        self.port: int = sock.getsockname()[1]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    # --- faults (called from the test's thread) ------------------------------

    def latency(self, seconds: float) -> None:
        self.delay_s = seconds / 2

    def blackhole(self, subscribers: bool = False) -> None:
        if subscribers:
            self._blackhole_subscribers = True
        else:
            self._blackhole_all = True

    def cut_subscribers(self) -> int:
        """RST every subscriber connection; returns how many were cut."""

        async def cut() -> int:
            doomed = [link for link in self._links if link.subscriber]
            for link in doomed:
                link.abort()
            return len(doomed)

        return self._call(cut())

    def heal(self) -> None:
        self.delay_s = 0.0
        self._blackhole_all = self._blackhole_subscribers = False

    def subscribers(self) -> int:
        return sum(link.subscriber for link in list(self._links))

    def close(self) -> None:
        async def shut() -> None:
            assert self._server is not None
            self._server.close()
            for link in list(self._links):
                link.abort()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        self._call(shut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    # --- the proxy (runs on its own loop) --------------------------------------

    def _call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def _dropping(self, link: _Link) -> bool:
        return self._blackhole_all or (self._blackhole_subscribers and link.subscriber)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        link.tasks = [
            asyncio.create_task(self._pump(link, reader, up_writer, upstream=True)),
            asyncio.create_task(self._pump(link, up_reader, writer, upstream=False)),
        ]
        try:
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            self._links.discard(link)
            link.abort()

    async def _pump(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
        upstream: bool,
    ) -> None:  # fmt: skip
        """Copy one direction, chunk by chunk, applying the faults of the moment.
        Delayed chunks go through a queue so that their order is kept."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(65536):
                if upstream and b"SUBSCRIBE\r\n" in data.upper():
                    link.subscriber = True
                if self._dropping(link):
                    continue
                queue.put_nowait((time.monotonic() + self.delay_s, data))
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sender, 5)
            link.abort()
