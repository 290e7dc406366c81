"""Tests only: named points where a process dies or stops itself, so an
integration test can force an interleaving of real processes instead of
hoping for it.

CHAT_ARCHIVE_CRASH_AT names where the archiver kills itself (as kill -9
would); CHAT_PAUSE_AT where a process stops itself (SIGSTOP, as if the
machine had descheduled it) the first time it gets there, until the test
continues it (SIGCONT) once it has done what must happen meanwhile. Unset
in production (tests/test_deploy.py checks the manifests leave them so).
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

_paused: set[str] = set()


def crash_here(point: str, at: str | None) -> None:
    """Die here (SIGKILL) when ``at`` names this point."""
    if at == point:
        log.warning("killing myself at %s (CHAT_ARCHIVE_CRASH_AT)", point)
        os.kill(os.getpid(), signal.SIGKILL)


def pause_here(point: str, at: str | None) -> None:
    """Stop here (SIGSTOP) the first time, when ``at`` names this point."""
    if at == point and point not in _paused:
        _paused.add(point)
        log.warning("stopping myself at %s (CHAT_PAUSE_AT)", point)
        os.kill(os.getpid(), signal.SIGSTOP)
