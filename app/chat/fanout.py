"""Cross-pod fan-out: one pub/sub connection per pod, one listener task,
and every local follower of a thread fed from it.

A thread's channel is subscribed while at least one local follower (a socket,
or the turn running here) follows it, and unsubscribed on the last.

Redis pub/sub is at-most-once: a subscriber that lags or reconnects misses
messages silently. So the hub never trusts it for completeness. Every
timeline frame carries the thread's contiguous event number ``n``; the hub
keeps the last number it forwarded per thread and, when a frame skips ahead,
first reads what was skipped from the event log (``chat:{T}:events``) and
forwards that. After its connection is re-established it compares every
followed thread's stored event number with its own and fills the difference
the same way. Frames at or below the last number are duplicates and are
dropped. Followers therefore see each thread's timeline in order, without
gaps or duplicates, from the moment they follow it.

A lost *last* event (a turn's ``done``) is revealed by no later frame. Redis
drops pub/sub messages only together with the subscriber's connection (cut
at its output-buffer limit, killed, a failover), or while the subscriber is
deaf, and both end in a reconnect and the full refill above: the probe below
bounds how long a deaf subscriber goes unnoticed. So the periodic audit
(``audit_interval_s``) reads only the threads that are *active*: a turn in
flight (a ``loading`` forwarded, its ``done`` not yet), or a frame forwarded
or a follow begun within the last ``RECENT_AUDITS`` intervals. An idle pod
following ten thousand quiet threads sends Redis its probe and nothing else.
The bound on a lost last event is therefore the audit interval on an active
thread, and on any thread the probe's interval plus its deadline plus one
reconnect (then the refill). On a Cluster the probe's channel lives on one
shard and proves only that shard's connection, so there the audit reads
every followed thread (``audit_idle``), as it did before.

A subscriber can also go deaf without any error: a half-open connection (a
blackholed network), or a connection to a primary that Sentinel demoted
while writers moved on to the new one. Redis's own pings do not catch that
(redis-py does not wait for their replies on a subscriber). So the hub
proves it hears: every probe interval it publishes a random token on its own
probe channel, through the command connection like any writer, and must hear
it on its subscriber within the deadline. A probe unheard replaces the
subscriber (and refills every thread, as after any loss); until a probe is
heard again ``hearing`` is False, and the pod reports not ready. A pod that
stays deaf for the probe's ``move_after_s`` tells its followers to move: its
sockets close (1013) and reconnect, through the load balancer, to a pod that
hears.

Besides its threads and its users' inbox channels, every pod listens on one
more channel, ``chat:erased``: a user id published there (erasing that
user's data, app.chat.service) closes every local socket of that user,
thread, SSE and user sockets alike. Like any pub/sub message it reaches the
pods subscribed at that moment; the erase publishes it at its start and
again at its end, each time also noting the user in ``chat:erasures`` (a
digest of the id, for an hour). A pod whose subscriber comes back from a
loss closes the sockets of every user noted there since it last provably
heard (its last probe heard, or its last subscribe).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, overload

import orjson
from redis.exceptions import RedisError

from app import metrics
from app.chat import keys, tasks
from app.chat.backoff import Backoff
from app.chat.errors import ChatError
from app.chat.keys import ThreadId
from app.chat.redis_types import RedisClient, Subscriber, optional_texts, texts
from app.chat.timeline import Timeline, TimelineEvent, event_type, parse_message

log = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 1.0
RECONNECT_BACKOFF = Backoff(0.1, 5.0)
# Channels one UNSUBSCRIBE names at most (a drain's thousands go in a few).
UNSUBSCRIBE_BATCH = 1000
# How far apart two pods' clocks may be: an erasure replay reaches this much
# further back than the subscriber's last proof of hearing.
ERASURE_CLOCK_SKEW_S = 5.0
RESYNC_BATCH = 200  # threads read per hold of the forwarding lock
# Followers handed one frame between two yields to the event loop: a big room
# (ten thousand sockets of one thread on a pod) must not stall the loop.
FORWARD_SLICE = 1000
# A thread stays in the audit this many intervals after its last frame (or its
# follow), so an event lost right after it is read by at least one audit.
RECENT_AUDITS = 2


class FanoutUnavailable(ChatError):
    """The pod's pub/sub connection is down; the caller may retry."""

    code = "unavailable"
    retryable = True


class SubscriberDeaf(Exception):
    """The subscriber did not hear its probe in time: it must be replaced."""


@dataclass(frozen=True, slots=True)
class Probe:
    """How the hub proves its subscriber hears (see the module docstring)."""

    channel: str
    publish_command: str = "PUBLISH"
    interval_s: float = 5.0
    deadline_s: float = 3.0
    move_after_s: float = 15.0  # 0: never


class Sink(Protocol):
    """A local follower of a thread. Both calls must return at once (no I/O)."""

    def deliver(self, event: TimelineEvent) -> None: ...

    def control(self, message: dict[str, Any]) -> None: ...


class Baseline(Protocol):
    """A join's own read of a thread (``follow``'s ``read``): it carries the
    thread's event number and last event id, the hub's baseline."""

    @property
    def event_n(self) -> int: ...

    @property
    def last_event_id(self) -> str | None: ...


B = TypeVar("B", bound=Baseline)


class InboxSink(Protocol):
    """A local user socket's inbox. Every call must return at once (no I/O)."""

    def notice(self, raw: str) -> None: ...

    def resync(self) -> None: ...

    def control(self, message: dict[str, Any]) -> None: ...


@dataclass(slots=True)
class _Cursor:
    """The last event forwarded for a thread (None until the first is known),
    and what the audit needs to know whether the thread is active."""

    n: int | None = None
    id: str | None = None
    heard_at: float = field(default_factory=time.monotonic)
    turn_open: bool = False


class FanoutHub:
    """The pod's single subscriber, dispatching frames to local followers."""

    def __init__(
        self,
        pubsub_factory: Callable[[], Subscriber],
        redis: RedisClient,
        timeline: Timeline,
        audit_interval_s: float = 5.0,
        probe: Probe | None = None,
        audit_idle: bool = False,
    ) -> None:
        self._pubsub_factory = pubsub_factory
        self._redis = redis
        self._timeline = timeline
        self._audit_interval_s = audit_interval_s
        self._audit_idle = audit_idle
        self._probe = probe or Probe(keys.probe_channel(secrets.token_hex(4)))
        self._pubsub: Subscriber | None = None
        self._followers: dict[ThreadId, set[Sink]] = {}
        # Followers whose follow() has not returned yet (see follow()).
        self._joining: set[Sink] = set()
        self._cursors: dict[ThreadId, _Cursor] = {}
        self._confirmed: dict[str, asyncio.Future[None]] = {}
        # Serialises (un)subscribe commands. Two first commands on a fresh
        # redis-py PubSub would each open a connection and the first one's
        # subscription would be lost with its orphaned connection; and an
        # UNSUBSCRIBE must never overtake the SUBSCRIBE of a later follow().
        self._commanding = asyncio.Lock()
        # Serialises forwarding with gap fills, so frames of one thread are
        # forwarded in number order even when a fill awaits Redis.
        self._forwarding = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        # The probe awaited (its token and the future its echo resolves), a
        # request to probe now (after a reconnect), and a verdict of deafness
        # for the listener to act on.
        self._awaited: tuple[str, asyncio.Future[None]] | None = None
        self._probe_now = asyncio.Event()
        self._deaf = False
        self.connected = False
        # Told when a thread's presence may have changed (app.chat.presence).
        self.on_presence: Callable[[ThreadId], None] | None = None
        # Inbox sinks by user channel (the user socket; app.chat.inbox).
        self._inboxes: dict[str, set[InboxSink]] = {}
        # True once the subscriber heard its latest probe; False from a loss
        # or a missed deadline until a probe is heard again (/readyz).
        self.hearing = False
        # Since when it has not heard (monotonic), and whether its followers
        # were told to move in this spell.
        self._unheard_since: float | None = time.monotonic()
        self._moved = False
        # Wall-clock time (s) up to which the subscriber provably heard every
        # message: the publish of its last probe heard, or its subscribe
        # (None before the first). Erasures noted after it are replayed on
        # a reconnect.
        self._heard_up_to: float | None = None
        # Channels nobody here follows any more, to unsubscribe in batches,
        # and the task doing so (see _unsubscribe).
        self._unsubscribing: set[str] = set()
        self._unsubscriber: asyncio.Task[None] | None = None

    # --- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen_forever(), name="fanout-listener"),
            asyncio.create_task(self._audit_forever(), name="fanout-audit"),
            asyncio.create_task(self._probe_forever(), name="fanout-probe"),
        ]

    async def stop(self) -> None:
        """Stop listening (bounded: see app.chat.tasks)."""
        unsubscriber = [self._unsubscriber] if self._unsubscriber else []
        await tasks.stop_all([*self._tasks, *unsubscriber], tasks.RELEASE_S)
        await tasks.within(self._close_pubsub(), tasks.RELEASE_S, "closing the subscriber")

    @property
    def followed_threads(self) -> int:
        return len(self._followers)

    # --- following ----------------------------------------------------------

    @overload
    async def follow(
        self, thread: ThreadId, sink: Sink, *, reads_timeline: bool = True
    ) -> None: ...

    @overload
    async def follow(self, thread: ThreadId, sink: Sink, read: Callable[[], Awaitable[B]]) -> B: ...

    async def follow(
        self, thread: ThreadId, sink: Sink, read: Callable[[], Awaitable[B]] | None = None,
        *, reads_timeline: bool = True,
    ) -> B | None:  # fmt: skip
        """Start feeding ``sink`` the thread's frames; returns once the channel is
        subscribed, so anything published from then on reaches the sink.

        The thread's stored event number is read once subscribed: by ``read``
        when given (a connect's own reads, app.chat.joins, which return it
        with everything else: one round trip for both), whose result is
        returned; else by the hub itself, unless the sink ``reads_timeline``
        not (a turn, for its cancels) and the pod follows the thread already.
        """
        # A follower still joining reads the thread's state only after this
        # returns, so it is up to date whatever happened before: a reset found
        # meanwhile (a resync racing this join after Redis lost the thread)
        # must not close it too.
        self._joining.add(sink)
        try:
            return await self._follow(thread, sink, read, reads_timeline)
        except BaseException:
            await self.unfollow(thread, sink)
            raise
        finally:
            self._joining.discard(sink)

    async def _follow(
        self, thread: ThreadId, sink: Sink, read: Callable[[], Awaitable[B]] | None,
        reads_timeline: bool,
    ) -> B | None:  # fmt: skip
        sinks = self._followers.setdefault(thread, set())
        sinks.add(sink)
        channel = keys.live(thread)
        confirmed = self._confirmed.get(channel)
        if confirmed is None:
            confirmed = asyncio.get_running_loop().create_future()
            self._confirmed[channel] = confirmed
            self._cursors[thread] = _Cursor()
            async with self._commanding:
                # Not connected: the listener's reconnect subscribes every
                # followed channel, this one included. On failure too it
                # reconnects and does so: either way, just wait below.
                if self.connected and self._pubsub is not None:
                    with contextlib.suppress(RedisError, OSError):
                        await self._pubsub.subscribe(channel)
        if not confirmed.done():  # (a followed thread's is: no timer for it)
            try:
                await asyncio.wait_for(asyncio.shield(confirmed), SUBSCRIBE_TIMEOUT_S)
            except TimeoutError:
                raise FanoutUnavailable("cannot subscribe: Redis is unreachable") from None
        # Read outside the forwarding lock: a join never waits for other
        # threads' frames (a reconnect storm's thousands of joins would each
        # hold back every live frame of the pod, one round trip at a time).
        result: B | None = None
        cursor = self._cursors.get(thread)
        if not reads_timeline and cursor is not None and cursor.n is not None:
            # Followed already, its baseline known, and a sink that reads no
            # timeline (a turn following its own thread): no round trip.
            return result
        if read is not None:
            result = await read()
            n, last_id = result.event_n, result.last_event_id
        else:
            n_text, last_id = optional_texts(
                await self._redis.hmget(keys.meta(thread), "event_n", "last_event_id")
            )
            n = int(n_text or 0)
        cursor = self._cursors.get(thread)
        if cursor is None:
            return result  # unfollowed meanwhile
        if cursor.n is None:
            # The baseline: no frame was forwarded since the cursor was made
            # (check and set with no await between), and everything up to
            # the read is in the log, which a new follower reads itself.
            cursor.n, cursor.id = n, last_id
        elif n < cursor.n:
            await self._confirm_reset(thread, sink)
        return result

    async def _confirm_reset(self, thread: ThreadId, sink: Sink) -> None:
        """The stored number read outside the lock is older than the cursor:
        either Redis lost the thread (a reset), or a frame was forwarded
        between that read and the comparison (not a reset: closing every
        local socket for it would be a storm of its own). Under the
        forwarding lock no frame moves the cursor, so a re-read there tells
        them apart. Rare: it costs one round trip only on an apparent reset."""
        async with self._forwarding:
            n, last_id = optional_texts(
                await self._redis.hmget(keys.meta(thread), "event_n", "last_event_id")
            )
            cursor = self._cursors.get(thread)
            if cursor is not None and cursor.n is not None and int(n or 0) < cursor.n:
                self._reset(thread, cursor, int(n or 0), last_id, spare=sink)

    async def unfollow(self, thread: ThreadId, sink: Sink) -> None:
        """Stop feeding ``sink``; unsubscribe when it was the thread's last."""
        sinks = self._followers.get(thread)
        if sinks is None:
            return
        sinks.discard(sink)
        if sinks:
            return
        del self._followers[thread]
        self._cursors.pop(thread, None)
        self._unsubscribe(keys.live(thread))

    async def follow_inbox(self, channel: str, sink: InboxSink) -> None:
        """Feed ``sink`` what is published on a user's inbox ``channel``;
        returns once subscribed. Inbox cards carry no event numbers: a pod
        that lost its subscriber tells its inboxes to ``resync`` (a fresh
        snapshot) instead of filling gaps."""
        sinks = self._inboxes.setdefault(channel, set())
        sinks.add(sink)
        confirmed = self._confirmed.get(channel)
        if confirmed is None:
            confirmed = asyncio.get_running_loop().create_future()
            self._confirmed[channel] = confirmed
            async with self._commanding:
                if self.connected and self._pubsub is not None:
                    with contextlib.suppress(RedisError, OSError):
                        await self._pubsub.subscribe(channel)
        try:
            await asyncio.wait_for(asyncio.shield(confirmed), SUBSCRIBE_TIMEOUT_S)
        except TimeoutError:
            await self.unfollow_inbox(channel, sink)
            raise FanoutUnavailable("cannot subscribe: Redis is unreachable") from None

    async def unfollow_inbox(self, channel: str, sink: InboxSink) -> None:
        sinks = self._inboxes.get(channel)
        if sinks is None:
            return
        sinks.discard(sink)
        if sinks:
            return
        del self._inboxes[channel]
        self._unsubscribe(channel)

    def _unsubscribe(self, channel: str) -> None:
        """Drop ``channel``'s subscription, now that nobody here follows it,
        soon and without waiting: a pod's sockets often close together (its
        drain closes them all; a neighbour's drain moves thousands), and one
        UNSUBSCRIBE each, in turn on the subscriber's connection, kept their
        handlers waiting past the drain's bound."""
        self._confirmed.pop(channel, None)
        self._unsubscribing.add(channel)
        if self._unsubscriber is None or self._unsubscriber.done():
            self._unsubscriber = asyncio.create_task(
                self._unsubscribe_pending(), name="fanout-unsubscribe"
            )

    async def _unsubscribe_pending(self) -> None:
        """UNSUBSCRIBE the channels left, UNSUBSCRIBE_BATCH to a command.
        Under the commanding lock, a channel followed again meanwhile (its
        SUBSCRIBE was sent, or will be after this) is kept. A lost connection
        has dropped them all already (a reconnect subscribes only to what is
        still followed), so errors are ignored."""
        while self._unsubscribing:
            async with self._commanding:
                batch = list(itertools.islice(self._unsubscribing, UNSUBSCRIBE_BATCH))
                self._unsubscribing.difference_update(batch)
                gone = [channel for channel in batch if not self._followed(channel)]
                if gone and self._pubsub is not None and self.connected:
                    with contextlib.suppress(RedisError, OSError):
                        await self._pubsub.unsubscribe(*gone)

    def _followed(self, channel: str) -> bool:
        if keys.user_of_inbox(channel) is not None:
            return channel in self._inboxes
        return keys.thread_of_channel(channel) in self._followers

    # --- the listener -------------------------------------------------------

    async def _listen_forever(self) -> None:
        delays = iter(RECONNECT_BACKOFF)
        while True:
            try:
                # Bounded: over a blackholed network the subscribe would wait forever.
                async with asyncio.timeout(SUBSCRIBE_TIMEOUT_S):
                    pubsub = await self._reconnect()
                delays = iter(RECONNECT_BACKOFF)
                await self._read_messages(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # dropped, deaf, or Redis is down
                self.connected = False
                self._not_hearing()
                metrics.REDIS_ERRORS.labels("subscriber").inc()
                backoff = next(delays)
                log.warning("fan-out subscriber lost (%s); reconnecting in %.1fs", exc, backoff)
                await self._close_pubsub()
                await asyncio.sleep(backoff)

    async def _reconnect(self) -> Subscriber:
        """A fresh connection, subscribed to the probe channel and every
        followed thread, then a resync: whatever was published while we were
        away is read from the log; and a probe, to hear again."""
        await self._close_pubsub()
        self._deaf = False
        async with self._commanding:
            self._pubsub = pubsub = self._pubsub_factory()
            # Under the lock: a follow() that came before is in this list; one
            # that comes after finds us connected and subscribes its own.
            channels = [keys.live(t) for t in self._followers] + list(self._inboxes)
            missed_since, subscribing_at = self._heard_up_to, time.time()
            await pubsub.subscribe(self._probe.channel, keys.ERASED_CHANNEL, *channels)
            self._heard_up_to = subscribing_at
            self.connected = True
        self._probe_now.set()
        if missed_since is not None:
            await self._replay_erasures(missed_since)
        await self._resync(list(self._followers))
        for sinks in list(self._inboxes.values()):
            for inbox in list(sinks):
                inbox.resync()
        metrics.SUBSCRIBER_CONNECTS.inc()
        return pubsub

    async def _read_messages(self, pubsub: Subscriber) -> None:
        while not self._deaf:
            message = await pubsub.get_message(timeout=READ_TIMEOUT_S)
            if message is None:
                continue
            kind = message["type"]
            channel = message["channel"]
            if channel == self._probe.channel:
                if kind == "message":
                    self._heard(message["data"])
            elif channel == keys.ERASED_CHANNEL:
                if kind == "message":
                    self._erased(message["data"])
            elif kind == "message":  # (app.chat.sharded names shard messages the same)
                inboxes = self._inboxes.get(channel)
                if inboxes is not None:
                    for inbox in list(inboxes):
                        inbox.notice(message["data"])
                elif keys.user_of_inbox(channel) is None:
                    await self._on_frame(keys.thread_of_channel(channel), message["data"])
            elif kind == "subscribe":
                confirmed = self._confirmed.get(channel)
                if confirmed is not None and not confirmed.done():
                    confirmed.set_result(None)
        raise SubscriberDeaf("the subscriber missed its probe's deadline")

    def _erased(self, user: str) -> None:
        """A user's data was erased (ERASED_CHANNEL)."""
        self._close_erased({keys.erasure_digest(user)})

    async def _replay_erasures(self, since: float) -> None:
        """Erasures the lost subscriber may have missed: those noted since
        ``since`` (wall clock, s; less ERASURE_CLOCK_SKEW_S between pods)."""
        since_ms = int((since - ERASURE_CLOCK_SKEW_S) * 1000)
        digests = texts(await self._redis.zrangebyscore(keys.ERASURES, since_ms, "+inf"))
        if digests:
            self._close_erased(set(digests))

    def _close_erased(self, digests: set[str]) -> None:
        """Every local socket of the users whose ids have these digests
        closes, whatever it follows; each sink checks its own user. Rare, so
        a walk over every local follower and user socket."""
        control = {"control": "erased", "user_digests": digests}
        for followers in list(self._followers.values()):
            for sink in list(followers):
                sink.control(control)
        for inboxes in list(self._inboxes.values()):
            for inbox in list(inboxes):
                inbox.control(control)

    async def _on_frame(self, thread: ThreadId, frame: str) -> None:
        sinks = self._followers.get(thread)
        if not sinks:
            return
        if frame.startswith('{"control"'):
            message = orjson.loads(frame)
            if message.get("control") == "presence":
                if self.on_presence is not None:
                    self.on_presence(thread)  # coalesced per pod, not per socket
                return
            for sink in list(sinks):
                sink.control(message)
            return
        # One event, or the several one script appended (app.chat.timeline.BATCH).
        events = parse_message(frame)
        async with self._forwarding:
            for i, event in enumerate(events):
                if i:
                    # Between a batch's events, the sockets write the last one
                    # (app.ws): a turn's batch of deltas handed over at once
                    # would fill a reader's bounded queue (CHAT_SEND_QUEUE)
                    # and drop it as too slow however fast it reads.
                    await asyncio.sleep(0)
                if event is None:
                    log.warning("dropping a frame of unknown shape on thread %s", thread)
                    continue
                cursor = self._cursors.get(thread)
                if cursor is None:
                    return
                if cursor.n is not None and cursor.id is not None and event.n <= cursor.n:
                    if event.key > keys.event_id(cursor.id):
                        self._reset(thread, cursor, event.n, event.id)
                    continue  # a duplicate
                if cursor.n is not None and event.n > cursor.n + 1:
                    await self._fill(thread, cursor, until=event)
                await self._forward(thread, cursor, event)

    async def _forward(self, thread: ThreadId, cursor: _Cursor, event: TimelineEvent) -> None:
        cursor.n, cursor.id = event.n, event.id
        cursor.heard_at = time.monotonic()
        kind = event_type(event)
        if kind == "loading":
            cursor.turn_open = True
        elif kind == "done":
            cursor.turn_open = False
        # The event id's first part is the Redis clock at commit time.
        metrics.FANOUT_LAG.observe(max(0.0, time.time() - event.key[0] / 1000))
        sinks = list(self._followers.get(thread, ()))
        for start in range(0, len(sinks), FORWARD_SLICE):
            if start:
                # Under the forwarding lock, so this thread's next frame waits;
                # a follower that joins meanwhile reads this event from the log.
                await asyncio.sleep(0)
            for sink in sinks[start : start + FORWARD_SLICE]:
                sink.deliver(event)

    def _reset(
        self, thread: ThreadId, cursor: _Cursor, n: int, last_id: str | None,
        spare: Sink | None = None,
    ) -> None:  # fmt: skip
        """The thread's event numbers went back: its data was lost and recreated
        (say, Redis restarted without persistence). Its followers cannot go on
        silently: they are told to reconnect, and so learn the new epoch.
        ``spare`` is a follower that joined after the loss and is up to date,
        as is every follower still joining."""
        log.warning("thread %s was reset in Redis (event numbers restarted)", thread)
        cursor.n, cursor.id = n, last_id
        for sink in list(self._followers.get(thread, ())):
            if sink is not spare and sink not in self._joining:
                sink.control({"control": "reset"})

    async def _fill(self, thread: ThreadId, cursor: _Cursor, until: TimelineEvent | None) -> None:
        """Forward what the log holds after the cursor (and before ``until``)."""
        after = cursor.id or "0-0"
        end = f"({until.id}" if until is not None else "+"
        missing = await self._timeline.read_after(thread, after, end)
        if missing:
            metrics.GAP_FILLS.inc(len(missing))
            log.info("filled %d missed event(s) on thread %s from the log", len(missing), thread)
        for event in missing:
            if cursor.n is None or event.n > cursor.n:
                await self._forward(thread, cursor, event)

    async def _resync(self, threads: list[ThreadId]) -> None:
        """Fill every given thread whose stored event number is ahead of ours."""
        # In batches: the forwarding lock is held while a batch is read and
        # checked, and live frames of every thread wait for it meanwhile, so
        # one pipeline for a pod's ten thousand threads would stall them all.
        for start in range(0, len(threads), RESYNC_BATCH):
            await self._resync_batch(threads[start : start + RESYNC_BATCH])

    async def _resync_batch(self, threads: list[ThreadId]) -> None:
        async with self._forwarding:  # read under the lock: see _confirm_reset()
            async with self._redis.pipeline(transaction=False) as pipe:
                for thread in threads:
                    pipe.hmget(keys.meta(thread), "event_n", "last_event_id")
                stored = await pipe.execute()
            for thread, (n, last_id) in zip(threads, stored, strict=True):
                cursor = self._cursors.get(thread)
                if cursor is None or cursor.n is None:
                    continue
                if int(n or 0) > cursor.n:
                    await self._fill(thread, cursor, until=None)
                elif int(n or 0) < cursor.n:
                    self._reset(thread, cursor, int(n or 0), last_id)

    # --- proving the subscriber hears -------------------------------------------

    async def _probe_forever(self) -> None:
        """Probe every interval, and at once after each reconnect (while the
        listener reconnects, it asks for a probe when done)."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._probe.interval_s):
                    await self._probe_now.wait()
            self._probe_now.clear()
            try:
                if self.connected:
                    await self._send_probe()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the publish failed: Redis is unreachable
                self._not_hearing()
                log.warning("subscriber probe not sent: %s", exc)
            self._move_if_long_deaf()

    async def _send_probe(self) -> None:
        token = secrets.token_hex(8)
        echo = asyncio.get_running_loop().create_future()
        self._awaited = (token, echo)
        sent_at = time.time()
        try:
            async with asyncio.timeout(self._probe.deadline_s):
                await self._redis.execute_command(
                    self._probe.publish_command, self._probe.channel, token
                )
                await echo
            # Heard: so was everything published before it (one connection
            # delivers in publish order).
            self._heard_up_to = sent_at
        except TimeoutError:
            self._not_hearing()
            self._deaf = True  # the listener replaces the subscriber
            metrics.SUBSCRIBER_DEAF.inc()
            log.warning(
                "the subscriber did not hear its probe within %.1fs: replacing it",
                self._probe.deadline_s,
            )
        finally:
            self._awaited = None

    def _heard(self, token: str) -> None:
        if self._awaited is not None and self._awaited[0] == token:
            self.hearing = True
            self._unheard_since = None
            self._moved = False
            if not self._awaited[1].done():
                self._awaited[1].set_result(None)

    def _not_hearing(self) -> None:
        self.hearing = False
        if self._unheard_since is None:
            self._unheard_since = time.monotonic()

    def _move_if_long_deaf(self) -> None:
        """Deaf for ``move_after_s``: whatever is published, this pod's
        sockets get it late (audits) or not at all. Tell every follower to
        move; sockets close 1013 and their clients resume on a pod that
        hears (this one fails /readyz, so the load balancer avoids it)."""
        since, limit = self._unheard_since, self._probe.move_after_s
        if since is None or self._moved or not limit or time.monotonic() - since < limit:
            return
        self._moved = True
        sinks = [sink for followers in self._followers.values() for sink in followers]
        if sinks:
            log.warning(
                "the subscriber has not heard for %.0fs: moving %d follower(s) to other pods",
                time.monotonic() - since, len(sinks),
            )  # fmt: skip
            metrics.FOLLOWERS_MOVED.inc(len(sinks))
        for sink in sinks:
            sink.control({"control": "move"})

    def _active_threads(self) -> list[ThreadId]:
        """The threads the audit reads (see the module docstring)."""
        if self._audit_idle:
            return list(self._followers)
        since = time.monotonic() - RECENT_AUDITS * self._audit_interval_s
        return [
            thread
            for thread, cursor in self._cursors.items()
            if cursor.turn_open or cursor.heard_at >= since
        ]

    async def _audit_forever(self) -> None:
        """Catch a lost frame that no later frame reveals (say, a turn's last)."""
        while True:
            await asyncio.sleep(self._audit_interval_s)
            try:
                await self._resync(self._active_threads())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("fan-out audit failed: %s", exc)

    async def _close_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        self.connected = False
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
