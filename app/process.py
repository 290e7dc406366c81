"""The pod's process: its listening socket, its signals, a bounded exit.

A pod must never outlive its welcome. It binds its port before anything
starts, so a port in use is a one-line error and exit 1, not a started and
then hung pod. Once it is told to stop (SIGTERM, SIGINT) it exits within
``CHAT_DRAIN_GRACE_S + EXIT_MARGIN_S`` whatever its sockets, tasks or Redis
do: the shutdown steps are each bounded (uvicorn's socket close, the
lifespan's drain in app.main), and a watchdog thread ends the process with
exit code 1 should they still overrun, since a blocked event loop cannot
bound itself. A second signal ends it at once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from types import FrameType

import uvicorn

from app.chat import tasks
from app.chat.runner import DRAIN_COMMIT_S

log = logging.getLogger(__name__)

# How long uvicorn waits for socket handlers after closing every socket with
# 1012, before the lifespan drains the turns.
SOCKETS_CLOSE_S = 3
# How long after SIGTERM a pod may take beyond CHAT_DRAIN_GRACE_S before the
# watchdog ends it: uvicorn's socket close, the commits of interrupted turns,
# a few RELEASE_S of letting go of tasks and connections, and slack.
EXIT_MARGIN_S = 15
assert SOCKETS_CLOSE_S + DRAIN_COMMIT_S + 5 * tasks.RELEASE_S < EXIT_MARGIN_S


class PortInUse(Exception):
    """The pod cannot listen where it was told to."""


def bind(host: str, port: int) -> socket.socket:
    """The pod's listening socket, bound now (uvicorn listens on it later)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortInUse(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


class PodServer(uvicorn.Server):
    """uvicorn's server, whose exit after a stop signal is bounded. The
    methods overridden here are app.uvicorn_adapter.SERVER_HOOKS, whose
    test fails should uvicorn change them."""

    def __init__(self, config: uvicorn.Config, drain_grace_s: float) -> None:
        super().__init__(config)
        self._exit_budget_s = drain_grace_s + EXIT_MARGIN_S
        self._watchdog: threading.Timer | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        for sock in sockets or []:  # uvicorn says so only for sockets it binds
            host, port = sock.getsockname()[:2]
            log.info("listening on http://%s:%d", host, port)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._watchdog is not None:
            log.warning("second stop signal: exiting now, without finishing the drain")
            _exit_now(1)
        log.info("stop signal: draining, exiting within %.1fs", self._exit_budget_s)
        self._watchdog = threading.Timer(self._exit_budget_s, self._overran)
        self._watchdog.daemon = True
        self._watchdog.start()
        super().handle_exit(sig, frame)

    def _overran(self) -> None:
        log.error(
            "the pod did not stop within %.1fs of the stop signal (CHAT_DRAIN_GRACE_S + %ds): "
            "exiting now",
            self._exit_budget_s, EXIT_MARGIN_S,
        )  # fmt: skip
        _exit_now(1)


def _exit_now(code: int) -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(code)
