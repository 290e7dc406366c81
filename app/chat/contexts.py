"""A pod's cache of the model contexts of the threads whose turns it ran.

At full model speed a turn's context read (HISTORY_PATH: the branch from the
message answered back to where the last context started, 100 KB and more)
was a quarter of Redis's time and a tenth of the pod's. A thread's next turn
on the same pod mostly continues the branch the last one ended: its context
is the last one, that turn's reply and the new prompt. So the pod keeps, per
thread, the last context with its reply, and takes it instead of reading
only where a read would provably return the same messages:

- the new prompt's parent (BEGIN_TURN says it) is the cached reply: the same
  branch, and no turn since, on any pod (each would have moved the leaf on);
- the thread's history version (BEGIN_TURN: its epoch and its erasures,
  which ERASE_AUTHOR counts in the step that redacts) is the one under which
  the messages were read or written: an erased user's words are never
  served from memory, and a thread lost and made again is a new epoch;
- the context start Redis holds is the cached context's first message, so
  the window is chosen as the read would choose it (app.chat.history);
- nothing of it was read from the archive (below the thread's watermark),
  whose erasure runs after ERASE_AUTHOR's.

Otherwise messages never change (an edit or a regenerate is a new message
on another branch; the archive moves them unchanged), so nothing else can
make a kept context differ from what Redis holds. A miss reads the context
as before and keeps it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from app.chat import keys
from app.chat.history import context_of
from app.chat.keys import ThreadId
from app.chat.records import Message
from app.chat.turns import Begun

# Threads kept, and their messages' characters in all: a pod's memory stays
# bounded however many threads it runs (the least recently used go first).
# 100 threads at full speed keep about 13 M characters.
MAX_THREADS = 256
MAX_CHARS = 24_000_000


@dataclass(slots=True)
class _Kept:
    version: str
    path: list[Message]  # from the context's start to the newest message
    chars: int


class ContextCache:
    """The last context (and reply) of each thread this pod ran a turn of."""

    def __init__(self, max_threads: int = MAX_THREADS, max_chars: int = MAX_CHARS) -> None:
        self._kept: OrderedDict[ThreadId, _Kept] = OrderedDict()
        self._max_threads = max_threads
        self._max_chars = max_chars
        self._chars = 0

    def context(
        self, thread: ThreadId, begun: Begun, prompt: Message, budget: int,
        cost: Callable[[Message], int],
    ) -> list[Message] | None:  # fmt: skip
        """The context of the turn ``begun`` opened to answer ``prompt`` (the
        user message it committed), chosen as HistoryReader.context would
        choose it; None when the cache cannot tell (read it)."""
        kept = self._kept.get(thread)
        if (
            kept is None
            or not begun.parent
            or kept.version != begun.version
            or kept.path[-1].id != begun.parent
            or kept.path[0].id != begun.context_start
        ):
            return None
        self._kept.move_to_end(thread)
        return context_of([*kept.path, prompt], budget, cost, begun.context_start)

    def keep(self, thread: ThreadId, begun: Begun, context: Sequence[Message]) -> None:
        """The context a turn of ``begun`` runs with, read or taken from here."""
        self.drop(thread)
        if not context or (
            begun.archived and keys.event_id(context[0].id) < keys.event_id(begun.archived)
        ):
            return  # part of it may come from the archive: see the module
        chars = sum(len(m.content) for m in context)
        self._kept[thread] = _Kept(begun.version, list(context), chars)
        self._chars += chars
        self._bound()

    def replied(self, thread: ThreadId, reply: Message) -> None:
        """A turn of this pod committed ``reply``: it continues the kept
        context when it answers its newest message (else the kept one goes)."""
        kept = self._kept.get(thread)
        if kept is None:
            return
        if kept.path[-1].id != reply.parent_id:
            self.drop(thread)
            return
        kept.path.append(reply)
        kept.chars += len(reply.content)
        self._chars += len(reply.content)
        self._bound()

    def drop(self, thread: ThreadId) -> None:
        """Forget the thread's context (its turn could not read it)."""
        kept = self._kept.pop(thread, None)
        if kept is not None:
            self._chars -= kept.chars

    def _bound(self) -> None:
        while len(self._kept) > self._max_threads or self._chars > self._max_chars:
            _, oldest = self._kept.popitem(last=False)
            self._chars -= oldest.chars
