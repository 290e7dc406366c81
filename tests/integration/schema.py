"""The documented Redis key layout (app/chat/keys.py, README "Redis keys") as
regular expressions: tests check that Redis never holds anything else."""

from __future__ import annotations

import re

THREAD = r"[A-Za-z0-9_-]{1,64}"
USER = r"[A-Za-z0-9_.@:|+=-]{1,128}"

DOCUMENTED = re.compile(
    rf"chat:\{{{THREAD}\}}:(history|events|lock|fence|turn|meta|members|dedup)"
    rf"|chat:user:\{{{USER}\}}:(threads|owned|sockets|rate:prompts)"
    r"|chat:turns|chat:reaper:leader"
)


def undocumented(found: set[str] | list[str]) -> set[str]:
    """The keys among ``found`` that the documented layout does not allow."""
    return {key for key in found if not DOCUMENTED.fullmatch(key)}
