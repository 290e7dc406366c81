"""Doubling delays between attempts, for the loops that own a retry.

Who retries what is decided once (docs/architecture.md, "Retries"): redis-py
retries the commands of the pod's command client, the turn runner retries
its own writes (on a client redis-py does not retry), the fan-out hub
reconnects its subscriber. The last two wait with a ``Backoff``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays of ``first_s``, then twice the last one, never over ``cap_s``."""

    first_s: float
    cap_s: float

    def __iter__(self) -> Iterator[float]:
        delay = self.first_s
        while True:
            yield delay
            delay = min(delay * 2, self.cap_s)
