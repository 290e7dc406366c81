"""Assistant turns: one task per turn, owned by the pod that granted it.

A turn never depends on the socket that asked for it: it keeps streaming to
Redis while clients come and go (or resume on other pods), and it always
ends through one path that commits the final message and ``done``: complete,
cancelled (a ``cancel`` from any pod), error (the model failed), or
interrupted (this pod is draining). If the pod dies instead, the reaper
(app.chat.reaper) ends the turn.

Tokens are coalesced into deltas: the buffer is cut into a delta when it
reaches CHAT_DELTA_MAX_BYTES or when its oldest piece is CHAT_DELTA_WINDOW_MS
old, so a fast model costs one Redis round trip per window, not one per
token. Deltas cut while the model ran ahead of Redis go in one call (each
still its own event), and those still to publish when the turn ends go with
its end: at full model speed a turn is two script calls, its start and its
end.

Tools: when a model call ends asking for tools, the text so far is flushed,
each call is announced (``tool_call``, once per call id, fenced like every
write) and only then run, on this pod, within the same lock; each result is
published (``tool_result``) as it finishes, and the model is called again
with the reply so far, its calls and their results. A cancel or a drain
stops the running tools; the calls that finished stay in the reply.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from redis.exceptions import RedisError

from app import metrics
from app.chat import tasks
from app.chat.backoff import Backoff
from app.chat.contexts import ContextCache
from app.chat.errors import LockLost
from app.chat.fanout import FanoutHub
from app.chat.history import committed
from app.chat.keys import ThreadId
from app.chat.lock import Lease, TurnLock
from app.chat.records import (
    Delta,
    Done,
    Message,
    MessageStatus,
    ToolCallEvent,
    ToolResultEvent,
    TurnError,
)
from app.chat.timeline import TimelineEvent
from app.chat.tool_calls import TurnTools
from app.chat.turns import Ended, TurnStore
from app.chat.usage import UsageStore
from app.llm import ChatModel, LLMError, ToolCall, Usage
from app.llm.tools import ToolBox

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a write the turn cannot go on without (its end, with the rest of its
# text; a tool call's record) may take in all, retries and attempts in flight
# included, before the turn gives up and leaves itself to the reaper. The
# runner is the only one retrying them: the client it writes through has
# redis-py's retries off (app.redis_client). 20 s outlasts a Sentinel
# failover's write pause (about 10 s with Sentinel's defaults, see
# docs/operations.md), as the 10 s each of the flush and the end did before
# they shared one bound.
WRITE_RETRY_S = 20.0
WRITE_BACKOFF = Backoff(0.05, 1.0)
# On drain, how long turns cut at the grace have to commit `interrupted`.
DRAIN_COMMIT_S = 5.0


class _Stop:
    """A reason to end the turn early, sent through the turn's queue."""

    def __init__(self, status: MessageStatus) -> None:
        self.status: MessageStatus = status


_END = object()


@dataclass
class _ToolRound:
    """The model asked for tools: the consumer runs them, then resolves ``done``."""

    calls: list[ToolCall]
    done: asyncio.Future[None]


class _Inbox:
    """The turn's queue: the model's pieces, then what ends the turn or asks
    for tools, in order; a stop may come from outside at any time. Not an
    asyncio.Queue: a model at full speed puts a piece every few microseconds,
    and the consumer takes everything waiting at once."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[object] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def __bool__(self) -> bool:
        return bool(self._items)

    def put(self, item: object) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def take_all(self) -> deque[object]:
        items, self._items = self._items, deque()
        return items

    def give_back(self, items: deque[object]) -> None:
        """Put what was taken but not handled back at the front."""
        items.extend(self._items)
        self._items = items

    async def wait(self) -> None:
        """Until something waits in the queue."""
        while not self._items:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                # A waiter cancelled late (a tool round's stop watch) must not
                # take the place of the one waiting now.
                if self._waiter is waiter:
                    self._waiter = None


class _LeftToReaper(Exception):
    """Redis stayed unreachable past WRITE_RETRY_S: the reaper will close the turn."""


@dataclass
class TurnContext:
    """Everything one turn needs to know about its thread."""

    thread: ThreadId
    lease: Lease
    generation_id: str
    messages: Sequence[Message]
    answers: str = ""  # the user message answered (the reply's parent)
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True, slots=True)
class TurnSetup:
    """What every turn of a pod runs with: the model, where it writes, and
    how it coalesces tokens (CHAT_DELTA_WINDOW_MS, CHAT_DELTA_MAX_BYTES)."""

    model: ChatModel
    store: TurnStore
    lock: TurnLock
    window_ms: float
    max_bytes: int
    # Tools the model may call, the most rounds of them in one turn, and
    # where a turn's tokens are charged once it ended (app.chat.usage).
    tools: ToolBox = field(default_factory=ToolBox)
    max_tool_rounds: int = 8
    usage: UsageStore | None = None
    # The pod's kept contexts, which a committed reply continues.
    contexts: ContextCache | None = None


class TurnRunner:
    """Streams one reply from the model into the thread's timeline."""

    def __init__(self, ctx: TurnContext, setup: TurnSetup) -> None:
        self.ctx = ctx
        self._model = setup.model
        self._store = setup.store
        self._lock = setup.lock
        self._window_s = setup.window_ms / 1000
        self._max_bytes = setup.max_bytes
        self._tools = setup.tools
        self._usage_store = setup.usage
        self._contexts = setup.contexts
        self._max_tool_rounds = setup.max_tool_rounds
        # One Usage per model call; the turn's is their sum (ctx.usage).
        self._calls: list[Usage] = []
        self._text: list[str] = []  # every piece the model sent, for its next call
        self._turn_tools = TurnTools(
            setup.tools, ctx.thread, ctx.generation_id, self._publish_tool_event
        )
        self._inbox = _Inbox()
        self._pending: list[str] = []  # pieces of the delta being coalesced
        self._pending_bytes = 0
        self._ready: list[str] = []  # deltas cut, not sent yet
        self._published: list[str] = []
        self._inflight: list[Delta] = []  # sent, not acknowledged: retried as they are
        self._seq = 0  # the next delta's
        self.status: MessageStatus | None = None
        # END_TURN's answer once this turn committed its end (None: it did
        # not, or a retry found it committed already).
        self.ended: Ended | None = None
        # JSON log lines carry these as fields (app.logs).
        self.log_context = {"thread_id": ctx.thread, "generation_id": ctx.generation_id}

    # --- signals from outside (any of them ends the turn early) -------------

    def stop(self, status: MessageStatus) -> None:
        """Ask the turn to end now with ``status`` (cancelled or interrupted)."""
        self._inbox.put(_Stop(status))

    def deliver(self, event: TimelineEvent) -> None:
        """Hub sink: a turn does not need its own thread's frames."""

    def control(self, message: dict[str, Any]) -> None:
        """Hub sink: a cancel published by any pod."""
        wanted = message.get("generation_id")
        if message.get("control") == "cancel" and wanted in (None, self.ctx.generation_id):
            self.stop("cancelled")

    # --- the turn -------------------------------------------------------------

    async def run(self) -> None:
        producer = asyncio.create_task(self._produce(), name=f"llm-{self.ctx.generation_id}")
        renewer = asyncio.create_task(self._renew(), name=f"lease-{self.ctx.generation_id}")
        error: LLMError | None = None
        try:
            status, error = await self._consume()
            self.status = status
            await self._final_writes(status, error)
        except LockLost:
            log.warning(
                "turn %s on thread %s lost its lock; a newer grant owns the thread",
                self.ctx.generation_id, self.ctx.thread,
                extra=self.log_context,
            )  # fmt: skip
        except _LeftToReaper:
            pass  # logged where the writes gave up
        finally:
            # Cancelled until done: a renewer inside a Redis call can lose a
            # single cancel (app.chat.tasks) and would renew a dead lease for
            # ever, the turn waiting on it.
            await tasks.stop_all([producer, renewer], tasks.RELEASE_S, quiet=True)

    async def _produce(self) -> None:
        started = time.monotonic()
        first = True
        try:
            for rounds in itertools.count():
                usage = Usage()
                self._calls.append(usage)
                calls: list[ToolCall] = []
                stream = self._model.stream(self._context(), usage, self._tools.specs)
                keep, put = self._text.append, self._inbox.put
                async for item in stream:
                    if isinstance(item, str):
                        if not item:
                            continue
                        if first:
                            metrics.TIME_TO_FIRST_TOKEN.observe(time.monotonic() - started)
                            first = False
                        keep(item)
                        put(item)
                    else:
                        calls.append(item)
                if not calls:
                    self._inbox.put(_END)
                    return
                if rounds == self._max_tool_rounds:
                    raise LLMError(f"The model kept calling tools; stopped after {rounds} rounds.")
                done = asyncio.get_running_loop().create_future()
                self._inbox.put(_ToolRound(calls, done))
                await done
        except LLMError as exc:
            self._inbox.put(exc)
        except Exception:
            log.exception("model %s failed unexpectedly", self._model.name, extra=self.log_context)
            self._inbox.put(LLMError("the model failed unexpectedly"))

    def _context(self) -> Sequence[Message]:
        """What the model reads: the thread's history, then (after a tool
        round) the reply so far with its calls and their results."""
        answered = self._turn_tools.answered
        if not answered:
            return self.ctx.messages
        so_far = Message(
            id="", role="assistant", content="".join(self._text), user_id="assistant",
            created_at=0, status="complete", tool_calls=tuple(answered),
        )  # fmt: skip
        return [*self.ctx.messages, so_far]

    async def _consume(self) -> tuple[MessageStatus, LLMError | None]:
        """Coalesce the model's pieces into deltas until the turn ends."""
        loop = asyncio.get_running_loop()
        window_s, max_bytes = self._window_s, self._max_bytes
        deadline: float | None = None  # when the buffered text must go out (loop time)
        while True:
            if deadline is not None and loop.time() >= deadline:
                deadline = None
                self._cut()
                if await self._try_flush():
                    return "cancelled", None
                continue
            if not self._inbox:
                try:
                    # asyncio.timeout, not wait_for: no task per wait.
                    async with asyncio.timeout_at(deadline):
                        await self._inbox.wait()
                except TimeoutError:
                    continue  # the window closed: flushed at the top
            items = self._inbox.take_all()
            pending = self._pending
            while items:
                item = items.popleft()
                if not isinstance(item, str):
                    self._inbox.give_back(items)
                    break
                pending.append(item)
                self._pending_bytes += len(item)
                if deadline is None:
                    deadline = loop.time() + window_s
                if self._pending_bytes >= max_bytes or window_s == 0:
                    deadline = None
                    self._cut()
            else:
                # Every piece waiting is handled: what was cut goes out now,
                # in one call however many deltas it is.
                if self._ready and await self._try_flush():
                    return "cancelled", None
                continue
            if item is _END:
                return "complete", None
            if isinstance(item, _Stop):
                return item.status, None
            if isinstance(item, LLMError):
                return "error", item
            if isinstance(item, _ToolRound):
                deadline = None
                stopped = await self._tool_round(item)
                if stopped is not None:
                    return stopped, None

    async def _tool_round(self, round_: _ToolRound) -> MessageStatus | None:
        """Run one round of tool calls (app.chat.tool_calls) after the text so
        far; a status when the turn must end instead (a cancel, a drain)."""
        try:
            await self._must(self._flush_all)
            offset = len("".join(self._published))
            return await self._turn_tools.round(round_.calls, offset, self._stopped)
        finally:
            if not round_.done.done():
                round_.done.set_result(None)

    async def _stopped(self) -> MessageStatus:
        """The status of the next stop asked for (the producer sends nothing
        while its tools run, so nothing else is taken from the queue)."""
        while True:
            await self._inbox.wait()
            for item in self._inbox.take_all():
                if isinstance(item, _Stop):
                    return item.status

    async def _publish_tool_event(self, event: ToolCallEvent | ToolResultEvent) -> bool:
        cancel: bool = await self._must(
            lambda: self._store.append_once(self.ctx.thread, self.ctx.lease, event)
        )
        return cancel

    async def _try_flush(self) -> bool:
        """Flush now; a Redis outage keeps the text buffered for the next try.
        Returns whether a cancel was asked for."""
        try:
            return await self._flush()
        except RedisError as exc:
            log.warning(
                "delta not published yet (%s); keeping it buffered", exc, extra=self.log_context
            )
            return False

    def _cut(self) -> None:
        """The text coalescing so far becomes a delta, ready to send."""
        if self._pending:
            self._ready.append("".join(self._pending))
            self._pending.clear()
            self._pending_bytes = 0

    def _deltas(self, texts: list[str]) -> list[Delta]:
        ctx = self.ctx
        return [
            Delta(thread_id=ctx.thread, generation_id=ctx.generation_id, seq=seq, text=text)
            for seq, text in enumerate(texts, self._seq)
        ]

    def _sent(self, deltas: list[Delta]) -> None:
        metrics.DELTAS_PUBLISHED.inc(len(deltas))
        self._published.extend(delta.text for delta in deltas)
        self._seq += len(deltas)

    async def _flush(self) -> bool:
        """Publish the deltas that are ready, in one call.

        Deltas that failed are retried exactly as they were (same seqs, same
        texts), in a call of their own: their first attempt may have been
        applied with only the reply lost, and the script drops a seq it has
        seen. Deltas cut since go in the next call.
        """
        cancel = False
        if self._inflight:
            cancel = await self._store.append_deltas(
                self.ctx.thread, self.ctx.lease, self._inflight
            )
            self._sent(self._inflight)
            self._inflight = []
        if self._ready:
            self._inflight = self._deltas(self._ready)
            self._ready = []
            cancel = (
                await self._store.append_deltas(self.ctx.thread, self.ctx.lease, self._inflight)
                or cancel
            )
            self._sent(self._inflight)
            self._inflight = []
        return cancel

    async def _flush_all(self) -> None:
        self._cut()
        await self._flush()

    async def _finish(self, status: MessageStatus, error: LLMError | None) -> None:
        ctx = self.ctx
        ctx.usage = Usage()
        for call_usage in self._calls:
            ctx.usage.add(call_usage)
        usage = ctx.usage.wire()
        # The text still to publish goes with the end (retried as it is).
        self._cut()
        last = self._deltas(self._ready)
        content = "".join(self._published) + "".join(self._ready)
        assistant = Message(
            id="", role="assistant", content=content, user_id="assistant",
            created_at=int(time.time() * 1000), status=status,
            tool_calls=tuple(self._turn_tools.answered), usage=usage,
        )  # fmt: skip
        done = Done(
            thread_id=ctx.thread, generation_id=ctx.generation_id, status=status, usage=usage,
            error=TurnError(error.message, error.retryable) if error else None,
        )  # fmt: skip
        if error:
            log.warning(
                "turn %s ended with a model error: %s", ctx.generation_id, error.message,
                extra=self.log_context,
            )  # fmt: skip
        ended = await self._store.end(ctx.thread, ctx.lease, assistant, done, last)
        self._sent(last)
        self._ready = []
        if ended is not None and self._contexts is not None:
            self._contexts.replied(ctx.thread, committed(ended.message_id, ctx.answers, assistant))
        log.info(
            "turn %s ended %s after %d deltas", ctx.generation_id, status, self._seq,
            extra=self.log_context,
        )  # fmt: skip
        metrics.TURNS_FINISHED.labels(status).inc()
        metrics.count_tokens(self._model.provider, ctx.usage.model or self._model.name, usage)
        if self._usage_store is not None:
            # Before leaving the turn index: until then the reaper would
            # settle it, should this pod die now (app.chat.usage).
            await self._usage_store.settle(ctx.thread, ended.charges if ended else None)
        await self._store.index_remove(ctx.thread, ended.queued if ended else None)
        self.ended = ended

    async def _final_writes(self, status: MessageStatus, error: LLMError | None) -> None:
        """Publish the deltas whose call failed, then commit the end with the
        text still buffered (see _must); starting over is safe: a delta is
        retried as it was, and an end already committed is not committed
        again."""

        async def both() -> None:
            if self._inflight:
                await self._flush()
            await self._finish(status, error)

        await self._must(both)

    async def _must(self, write: Callable[[], Awaitable[T]]) -> T:
        """A write the turn cannot go on without (its end; a tool announced
        before it runs, its result before the model reads it), retried
        through a Redis outage for at most WRITE_RETRY_S in all; after that
        the turn is left to the reaper (_LeftToReaper), which closes it from
        the log."""
        delays = iter(WRITE_BACKOFF)
        failure: Exception | None = None
        try:
            async with asyncio.timeout(WRITE_RETRY_S):
                while True:
                    try:
                        return await write()
                    except RedisError as exc:
                        metrics.REDIS_ERRORS.labels("turn").inc()
                        failure = exc
                        await asyncio.sleep(next(delays))
        except TimeoutError:
            log.error(
                "turn %s left to the reaper: %s", self.ctx.generation_id,
                failure or "Redis did not answer", extra=self.log_context,
            )  # fmt: skip
            raise _LeftToReaper from None

    async def _renew(self) -> None:
        """Keep the lease alive, and read the durable cancel flag meanwhile."""
        interval = self._lock.ttl_ms / 3000
        while True:
            await asyncio.sleep(interval)
            try:
                if not await self._lock.renew(self.ctx.thread, self.ctx.lease):
                    # Not fatal by itself: the fencing number decides. If no
                    # one took the thread over, our writes still go through.
                    log.warning(
                        "turn %s: lease expired before renewal", self.ctx.generation_id,
                        extra=self.log_context,
                    )  # fmt: skip
                record = await self._store.record(self.ctx.thread)
                if record is not None and record.cancel_requested:
                    self.stop("cancelled")
            except RedisError as exc:
                log.warning("lease renewal failed: %s", exc, extra=self.log_context)


class TurnManager:
    """The turns running on this pod: start, cancel locally, drain."""

    def __init__(
        self, setup: TurnSetup, hub: FanoutHub,
        on_end: Callable[[ThreadId, Ended | None], Awaitable[None]] | None = None,
    ) -> None:  # fmt: skip
        self._setup = setup
        self._hub = hub
        # Called once a turn is over (however it ended) and its thread free,
        # with END_TURN's answer when the turn committed its end: the service
        # starts the thread's next queued prompt and its title from here.
        self._on_end = on_end
        self._running: dict[asyncio.Task[None], TurnRunner] = {}

    @property
    def running(self) -> int:
        return len(self._running)

    def start(self, ctx: TurnContext) -> TurnRunner:
        runner = TurnRunner(ctx, self._setup)
        task = asyncio.create_task(self._run(runner), name=f"turn-{ctx.generation_id}")
        metrics.TURNS_STARTED.inc()
        log.info("turn %s started", ctx.generation_id, extra=runner.log_context)
        self._running[task] = runner
        task.add_done_callback(self._running.pop)
        return runner

    async def _run(self, runner: TurnRunner) -> None:
        thread = runner.ctx.thread
        try:
            await self._hub.follow(thread, runner, reads_timeline=False)
        except Exception as exc:  # cancel still reaches us through the turn record
            log.warning(
                "turn %s runs without live cancel: %s", runner.ctx.generation_id, exc,
                extra=runner.log_context,
            )  # fmt: skip
        try:
            await runner.run()
        except Exception:
            log.exception("turn %s failed", runner.ctx.generation_id, extra=runner.log_context)
        finally:
            await self._hub.unfollow(thread, runner)
        if self._on_end is not None:
            try:
                await self._on_end(thread, runner.ended)
            except Exception as exc:  # the reaper starts what waits, if this could not
                log.warning("after turn %s: %s", runner.ctx.generation_id, exc,
                            extra=runner.log_context)  # fmt: skip

    async def drain(
        self, grace_s: float, commit_s: float = DRAIN_COMMIT_S, release_s: float = tasks.RELEASE_S
    ) -> None:
        """Let running turns finish within ``grace_s``, then end the rest as
        interrupted (their text so far is committed) within ``commit_s``.
        A turn whose commit cannot reach Redis by then is cancelled (within
        ``release_s``): its lease runs out and a reaper closes it, as if this
        pod had died."""
        running = list(self._running)
        if not running:
            return
        log.info("draining: waiting up to %.1fs for %d turn(s)", grace_s, len(running))
        _, pending = await asyncio.wait(running, timeout=grace_s)
        for task in pending:
            self._running[task].stop("interrupted")
        if pending:
            _, stuck = await asyncio.wait(pending, timeout=commit_s)
            if stuck:
                log.warning("%d turn(s) did not end while draining: left to the reaper", len(stuck))
                await tasks.stop_all(list(stuck), release_s)
