"""The pod's garbage-collection policy: what CPython's cyclic collector
scans, and when, so that a collection never stalls the event loop for long.

A full (oldest-generation) collection scans every tracked object that is not
frozen, and the event loop, with every socket's frames, waits until it is
done. A pod's long-lived objects are mostly its sockets' (about 130 tracked
objects each: uvicorn's protocol, websockets' connection, the tasks, the
follower), and CPython runs a full collection each time its oldest
generation has grown by a quarter. While 5,000 sockets resumed on one pod (a
reconnect storm, bench.storm), one collection after another over them
stalled its loop for 0.1 to 2.1 s each; while a pod opened a big room's
10,000 sockets, 0.07 to 1.5 s each (gc.callbacks timing, 2 shared cores).

So:

- What the pod loaded at start is frozen (``gc.freeze``) before it serves
  (``freeze_loaded``): modules, classes, the app, the clients.
- What a collection promotes to the oldest generation is frozen at once
  (a ``gc.callbacks`` hook on the end of each collection but the youngest's):
  it has survived two collections, it is a socket's or a turn's state.
  The oldest generation then holds nothing for a full collection to scan,
  however many sockets the pod holds; what a collection costs is the young
  generations' few thousand objects.
- Frozen objects are still freed by reference counting once nothing holds
  them, and a closed socket's nearly all are, but a cycle among them is
  not: 2,000 sockets opened and closed left 20,964 objects (about 10 a
  socket) to the next full collection. So one full collection of
  everything (unfreeze, collect, freeze) runs when, at a check every
  ``full_every_s`` (CHAT_GC_FULL_S), a quarter as many objects were frozen
  since the last one as it kept (CPython's own ratio). It stalls the loop as
  long as one of CPython's full collections (about 0.25 s of CPU per 1,000
  sockets), but at most once a check, never one after another through a
  burst of joins, and never on a pod whose sockets do not come and go.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

# Without CHAT_GC_FULL_S the task only keeps the freezing on; it wakes this
# seldom.
IDLE_WAKE_S = 3600.0
# A full collection is due once the objects frozen since the last one are
# this share of those it kept (CPython's own trigger for a full collection).
FULL_GROWTH = 0.25


def freeze_loaded() -> None:
    """Collect once and freeze everything: what the pod loaded lives as long
    as the pod. (Before this, a pod's full collections scanned every module
    and class it had imported: 40 to 100 ms each, a stall of every stream.)"""
    gc.collect()
    gc.freeze()


class CollectionPolicy:
    """Freezes what collections promote, and collects everything when
    enough was frozen since, checked every ``full_every_s`` (0: never); see
    the module docstring. ``run_forever`` is the pod's task: the freezing
    lasts as long as it runs."""

    def __init__(self, full_every_s: float) -> None:
        self.full_every_s = full_every_s
        self.frozen_since_full = 0
        self.kept = 0
        self._collecting_all = False

    async def run_forever(self) -> None:
        self.kept = gc.get_freeze_count()
        gc.callbacks.append(self._on_collection)
        try:
            while True:
                await asyncio.sleep(self.full_every_s or IDLE_WAKE_S)
                if self.full_every_s and self.frozen_since_full > FULL_GROWTH * self.kept:
                    self.collect_all()
        finally:
            gc.callbacks.remove(self._on_collection)

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        # After a collection of the middle or the oldest generation, the
        # young ones are empty and what survived is in the oldest: settled
        # state. Listing it costs what it holds (one collection's survivors,
        # as the pod froze the rest); gc.freeze only moves lists.
        if phase == "stop" and info["generation"] >= 1 and not self._collecting_all:
            self.frozen_since_full += len(gc.get_objects(2))
            gc.freeze()

    def collect_all(self) -> None:
        """One full collection of everything, the frozen objects included;
        what survives is frozen again, and counted in ``kept``."""
        started = time.perf_counter()
        self._collecting_all = True
        try:
            gc.unfreeze()
            found = gc.collect()
            gc.freeze()
        finally:
            self._collecting_all = False
        self.frozen_since_full, self.kept = 0, gc.get_freeze_count()
        log.info(
            "full garbage collection: %d unreachable objects, %d kept, %.0f ms",
            found, self.kept, 1000 * (time.perf_counter() - started),
        )  # fmt: skip
