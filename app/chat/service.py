"""The chat domain's front door: what a socket can ask of a thread.

``ChatService`` wires the Redis-backed parts together (lock, turns, timeline,
history, threads, fan-out, the running turns of this pod) and offers the
operations of the protocol as plain async methods. It knows nothing of
WebSockets or frames: app.ws turns frames into these calls and their
results and errors into events.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson
from redis.exceptions import RedisError

from app.chat import faults, keys, tasks
from app.chat.backoff import Backoff
from app.chat.contexts import ContextCache
from app.chat.errors import (
    BudgetExceeded,
    ClientGone,
    Draining,
    Forbidden,
    InvalidRequest,
    NotFound,
    StillRunning,
    ThreadBusy,
)
from app.chat.fanout import FanoutHub, Probe
from app.chat.follower import Follower
from app.chat.history import HistoryReader, committed, message_from_entry
from app.chat.inbox import Inbox, Notices
from app.chat.joins import Joins, JoinState
from app.chat.keys import ThreadId, UserId
from app.chat.limits import Admission, Limits
from app.chat.lock import Lease, TurnLock
from app.chat.presence import Presence
from app.chat.queue import Enqueued, Head, Idle, PromptQueue, Seen
from app.chat.reaper import Reaper
from app.chat.records import Joined, Loading, Message, PromptPolicy, ThreadCard
from app.chat.redis_types import RedisClient, Subscriber, optional_texts, text, texts
from app.chat.redis_types import entries as entries_of
from app.chat.runner import TurnContext, TurnManager, TurnSetup
from app.chat.scripts import Scripts
from app.chat.threads import Threads
from app.chat.timeline import (
    Timeline,
    TimelineEvent,
    frame_from_entry,
    message_event_data,
)
from app.chat.titles import AutoTitles
from app.chat.turns import Begun, Duplicate, Ended, Orphaned, TurnStore, Waits
from app.chat.usage import UsageStore
from app.llm import ChatModel
from app.llm.context import estimate_tokens, message_tokens
from app.llm.tools import ToolBox, load_tools
from app.settings import Settings

if TYPE_CHECKING:  # PostgreSQL's driver loads only in pods with an archive (app.main)
    from app.chat.archive import Archive

log = logging.getLogger(__name__)

# How long a user's erasing marker lives without being refreshed (an erase
# whose pod died mid-way stops refusing the user's sockets after this).
ERASING_TTL_S = 300
# Erasing a user waits for a turn of theirs to end: this much past the
# reaper's own bound, polling Redis at these delays.
ERASE_WAIT_MARGIN_S = 5.0
ERASE_POLL = Backoff(0.02, 0.5)
# A prompt that finds its thread's lock held by no turn looks again after
# this: a reaper sweep holds a free thread's lock for a few round trips.
LOCK_PASSING_S = 0.02


@dataclass(frozen=True, slots=True)
class Opened:
    """A socket's start on a thread: ``ready``, then ``replay``, then live."""

    ready: Joined
    replay: list[TimelineEvent]
    follower: Follower


@dataclass(frozen=True, slots=True)
class Resumed:
    """The answer to ``resume``: the events to send, or None if they are gone."""

    replay: list[TimelineEvent] | None


# Sockets whose Redis work (a join's reads, a leave's presence exit, a
# close's release of its place) is in flight at once per pod: a reconnect
# storm's thousands of joins, and a drain's thousands of exits, would each
# otherwise take every connection of redis-py's pool (100), failing with
# "Too many connections" every other command of the pod meanwhile.
SOCKETS_AT_ONCE = 32
# A drain waits this long at least for closed sockets' exits (presence and
# places), even with no grace for turns: a few thousand take about a second.
EXITS_MIN_S = 2.0


class ChatService:
    """Every protocol operation on threads, for any number of sockets."""

    def __init__(
        self,
        settings: Settings,
        redis: RedisClient,
        pubsub_factory: Callable[[], Subscriber],
        model: ChatModel,
        publish_command: str,
        turn_writes: RedisClient | None = None,
        tools: ToolBox | None = None,
        archive: Archive | None = None,
    ) -> None:
        """``turn_writes`` is the client running turns write through, one
        redis-py does not retry (the runner retries those writes itself:
        app.redis_client); ``redis`` when None. ``tools``: the model's tools
        (None: loaded from the settings, app.llm.tools.load_tools). ``archive``:
        the cold tier (CHAT_ARCHIVE_URL), which history reads continue into."""
        self.settings = settings
        self.redis = redis
        self.model = model
        self.scripts = Scripts(redis)
        self.lock = TurnLock(self.scripts, settings.chat_lock_ttl_ms)
        self.timeline = Timeline(redis)
        self.archive = archive
        self.history = HistoryReader(redis, self.scripts, archive)
        self.threads = Threads(
            redis, self.scripts, publish_command,
            max_threads=settings.chat_max_threads_per_user,
            max_members=settings.chat_max_members_per_thread,
            open_access=not settings.auth_enabled, default_policy=settings.chat_prompt_policy,
        )  # fmt: skip
        self.limits = Limits(redis, self.scripts, settings)
        self.inbox = Inbox(
            redis, self.scripts, publish_command, settings.chat_prompt_policy,
            open_access=not settings.auth_enabled,
        )  # fmt: skip
        # The socket slot (app.chat.limits) each open follower holds.
        self._slots: dict[Follower, str] = {}
        self._exiting: set[asyncio.Task[None]] = set()  # closed sockets' exits (close)
        # Joins reading Redis at once. A reconnect storm's joins would each
        # take a connection of the pool (redis-py's holds 100 and then fails
        # outright, "Too many connections") and starve the turns' writes;
        # past this they wait their turn here, holding nothing.
        self._socket_work = asyncio.Semaphore(SOCKETS_AT_ONCE)
        self.turns = TurnStore.configured(redis, self.scripts, publish_command, settings)
        probe = Probe(
            keys.probe_channel(settings.chat_pod_id), publish_command,
            settings.chat_subscriber_probe_s, settings.chat_subscriber_deadline_s,
            settings.chat_subscriber_move_s,
        )  # fmt: skip
        # On a Cluster (SPUBLISH) the probe proves one shard's subscriber
        # connection only: the audit keeps reading every followed thread there.
        self.hub = FanoutHub(
            pubsub_factory, redis, self.timeline, settings.chat_fanout_audit_s, probe,
            audit_idle=publish_command != "PUBLISH",
        )  # fmt: skip
        self.usage = UsageStore(redis, self.scripts, settings.chat_user_tokens_per_day)
        self.tools = tools if tools is not None else load_tools(settings)
        runner_turns, runner_usage = self.turns, self.usage
        if turn_writes is not None and turn_writes is not redis:
            writes = Scripts(turn_writes)
            runner_turns = TurnStore.configured(turn_writes, writes, publish_command, settings)
            runner_usage = UsageStore(turn_writes, writes, settings.chat_user_tokens_per_day)
        self.contexts = ContextCache()
        setup = TurnSetup(
            model, runner_turns, self.lock, settings.chat_delta_window_ms,
            settings.chat_delta_max_bytes, tools=self.tools,
            max_tool_rounds=settings.chat_max_tool_rounds, usage=runner_usage,
            contexts=self.contexts,
        )  # fmt: skip
        self.manager = TurnManager(setup, self.hub, self._after_turn)
        self.queue = PromptQueue(
            redis, self.scripts, publish_command, settings.chat_event_retention,
            settings.chat_dedup_ttl_s, settings.chat_max_queued,
            members_only=settings.auth_enabled,
        )  # fmt: skip
        self._publish = publish_command
        self._notices = Notices(redis, self.scripts, publish_command)
        self.titles = AutoTitles(redis, self.scripts, self.threads, model)
        self.presence = Presence(
            redis, self.scripts, self.hub, publish_command, settings.chat_socket_lease_ms
        )
        self.joins = Joins(
            redis, self.scripts, self.threads, self.limits, publish_command,
            settings.auth_enabled,
        )  # fmt: skip
        self.draining = False
        # What the history may fill of the model's context: the system
        # prompt and the tools' schemas are spoken for.
        fixed = estimate_tokens(settings.chat_system_prompt) + sum(
            estimate_tokens(orjson.dumps(dataclasses.asdict(spec)).decode())
            for spec in self.tools.specs
        )
        self._context_budget = max(settings.chat_context_tokens - fixed, 100)
        # Room held in a user's daily budget while a turn of theirs runs: the
        # most context it may send (once per model call; the first) and the
        # longest reply.
        self._room_per_turn = self._context_budget + settings.chat_max_tokens

    def reaper(self, holder: str, *, close_orphans: bool = True) -> Reaper:
        """The reaper a pod runs beside this service, sweeping as ``holder``;
        beside a standalone worker (``close_orphans=False``), only its queue
        starter."""
        return Reaper(
            self.scripts, self.lock, self.turns, self.usage,
            interval_ms=self.settings.chat_reaper_interval_ms, holder=holder,
            start_next=self.start_next, close_orphans=close_orphans,
        )  # fmt: skip

    async def start(self) -> None:
        await self.hub.start()
        await self.limits.start()
        await self.presence.start()

    async def drain(self) -> None:
        """Stop starting turns, let running ones finish, stop the hub: within
        CHAT_DRAIN_GRACE_S + DRAIN_COMMIT_S + 3 RELEASE_S (app.process),
        whatever Redis does."""
        self.draining = True
        grace = self.settings.chat_drain_grace_s
        # Side by side: the exits' wait ends within the turns' (which may
        # take DRAIN_COMMIT_S past the grace), so it adds nothing to the bound.
        exits_s = max(grace, EXITS_MIN_S)
        await asyncio.gather(self.manager.drain(grace), self.exits_done(exits_s))
        await self.presence.stop()
        await self.titles.stop()
        await asyncio.gather(self.hub.stop(), self.limits.stop())

    async def exits_done(self, timeout_s: float) -> None:
        """Wait for closed sockets' exits; those still waiting after
        ``timeout_s`` are left to their leases."""
        if self._exiting:
            _done, pending = await asyncio.wait(set(self._exiting), timeout=timeout_s)
            await tasks.stop_all(list(pending), tasks.RELEASE_S, quiet=True)

    # --- opening a thread -----------------------------------------------------

    async def open(
        self, thread: ThreadId, user: UserId, after: str | None, epoch: str | None,
        client_gone: Callable[[], bool] | None = None,
    ) -> Opened:  # fmt: skip
        """Join a thread: count the socket against the limits, create the
        thread if new, check access, follow it live, and work out what the
        client must be sent before the live events. ``client_gone`` says
        whether the client left meanwhile (see ``join``)."""
        # With one Redis the socket's count across pods is the join's first
        # step (JOIN_THREAD): one round trip for both.
        if self.joins.admits:
            slot, admission = self.limits.claim_socket_for_join(user)
        else:
            slot, admission = await self.limits.claim_socket(user), None
        try:
            opened = await self.join(
                thread, user, after, epoch, admission=admission, client_gone=client_gone
            )
        except BaseException:
            await self.limits.release_socket(slot)
            raise
        self._slots[opened.follower] = slot
        return opened

    async def join(
        self, thread: ThreadId, user: UserId, after: str | None, epoch: str | None,
        create: bool = True, admission: Admission | None = None,
        client_gone: Callable[[], bool] | None = None,
    ) -> Opened:  # fmt: skip
        """Follow a thread on a socket that already counts against the limits
        (a user socket's ``join``, which never creates the thread: ``create``
        False), or whose ``admission`` the join runs first: as ``open``
        without the count. A join whose client left while it waited its turn
        (``client_gone``) raises ClientGone and touches nothing."""
        async with self._socket_work:
            if client_gone is not None and client_gone():
                raise ClientGone("the client left before its join's turn")
            return await self._join(thread, user, after, epoch, create, admission)

    async def _join(
        self, thread: ThreadId, user: UserId, after: str | None, epoch: str | None,
        create: bool, admission: Admission | None,
    ) -> Opened:  # fmt: skip
        follower = Follower(thread, self.settings.chat_send_queue, user)
        presence = self.presence.joining(user)

        def read() -> Awaitable[JoinState]:
            return self.joins.join(thread, user, after, epoch, presence, create, admission)

        # Follow first, read second: whatever is published after the follow
        # reaches the queue, whatever was published before is in the log. The
        # join's reads, its catch-up and its presence entry are one script,
        # once subscribed: one round trip (app.chat.joins).
        state = await self.hub.follow(thread, follower, read)
        try:
            if state.recovered:
                follower.restart_from(keys.event_id(after or ""))
            if not state.recovered and state.last_event_id is not None and not state.replay:
                follower.restart_from(keys.event_id(state.last_event_id))
            self.presence.entered(follower, presence.entry, state.present)
        except BaseException:
            await self.leave(follower)
            raise
        turn = state.turn
        ready = Joined(
            thread_id=thread, epoch=state.epoch, last_event_id=state.last_event_id,
            generating=turn is not None, generation_id=turn.generation_id if turn else None,
            leaf_id=state.leaf, queue=tuple(state.queue), recovered=state.recovered,
        )  # fmt: skip
        return Opened(ready, state.replay, follower)

    async def close(self, follower: Follower) -> None:
        """A socket closed: it stops following at once; its exit from the
        thread's presence and the release of its place count against the
        user's limit follow in the background (SOCKETS_AT_ONCE at a time),
        so that a drain's thousands of closing sockets do not each wait their
        turn for Redis (the drain waits for them, within its grace)."""
        await self.hub.unfollow(follower.thread, follower)
        exit_task = asyncio.create_task(self._exit(follower, self._slots.pop(follower, None)))
        self._exiting.add(exit_task)
        exit_task.add_done_callback(self._exiting.discard)

    async def _exit(self, follower: Follower, slot: str | None) -> None:
        async with self._socket_work:
            await self._exit_presence(follower)
            if slot is not None:
                try:
                    await self.limits.release_socket(slot)
                except (RedisError, OSError) as exc:  # its lease runs out instead
                    log.warning("socket's place not released: %s", exc)

    async def join_existing(
        self, thread: ThreadId, user: UserId, after: str | None, epoch: str | None
    ) -> Opened:
        """A user socket's ``join``: as ``join``, but never creates the thread,
        and says Forbidden for a thread that does not exist as for one the
        user is not in (no leak of which ids exist)."""
        return await self.join(thread, user, after, epoch, create=False)

    async def leave(self, follower: Follower) -> None:
        """Stop following a joined thread."""
        await self.hub.unfollow(follower.thread, follower)
        async with self._socket_work:
            await self._exit_presence(follower)

    async def _exit_presence(self, follower: Follower) -> None:
        try:
            await self.presence.exit(follower)
        except (RedisError, OSError) as exc:  # the entry's lease runs out instead
            log.warning("presence on %s not left: %s", follower.thread, exc)

    async def typing(self, thread: ThreadId, user: UserId) -> None:
        """``user`` types: the thread's other users hear it (throttled; a
        viewer's typing is dropped, as they cannot write)."""
        if self.settings.auth_enabled and await self.threads.role(thread, user) == "viewer":
            return
        await self.presence.typing(thread, user)

    async def inbox_page(
        self, user: UserId, limit: int, cursor: str | None = None
    ) -> tuple[list[ThreadCard], str | None]:
        """One page of the user's inbox, most recently active first, and the
        next page's cursor: a bounded number of round trips however many
        threads the page holds."""
        page, next_cursor = await self.threads.page_of_user(user, limit, cursor)
        cards = await self.inbox.cards(user, [(s.id, s.active_at) for s in page])
        return cards, next_cursor

    async def read(self, thread: ThreadId, user: UserId, message_id: str) -> None:
        """Move the user's read marker (every socket of theirs learns it)."""
        await self.inbox.read(thread, user, message_id)

    async def resume(self, thread: ThreadId, after: str, epoch: str | None) -> Resumed:
        """The events after ``after``, or None when they are no longer all there."""
        meta_epoch, last_id = optional_texts(
            await self.redis.hmget(keys.meta(thread), "epoch", "last_event_id")
        )
        if epoch is not None and epoch != meta_epoch:
            return Resumed(None)
        if not await self.timeline.covers(thread, after, last_id):
            return Resumed(None)
        return Resumed(await self.timeline.read_after(thread, after))

    async def _may_access(self, thread: ThreadId, user: UserId) -> bool:
        return not self.settings.auth_enabled or await self.threads.is_member(thread, user)

    async def _check_writer(self, thread: ThreadId, user: UserId) -> None:
        """Forbidden unless ``user`` may change the thread: a member who is
        not a viewer."""
        if not self.settings.auth_enabled:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.sismember(keys.members(thread), user)
            pipe.hget(keys.roles(thread), user)
            member, role = await pipe.execute()
        if not member:
            raise Forbidden("you are not a member of this thread")
        if role == "viewer":
            raise Forbidden("viewers read and watch this thread; they cannot change it")

    # --- prompts and turns ----------------------------------------------------

    async def prompt(
        self, thread: ThreadId, user: UserId, content: str, client_msg_id: str | None,
        parent: str | None = None, branches: bool = False,
    ) -> str | None:  # fmt: skip
        """Commit the user's message and start the assistant's turn.

        The message follows the active leaf, or with ``branches`` it starts a
        branch under ``parent`` (None: a new root). Returns None when the
        message was committed (its ``message`` event reaches every follower,
        the sender included), or the original ``message`` frame when
        ``client_msg_id`` was seen before (nothing new is written). Raises
        ThreadBusy while another turn runs, Forbidden when ``user`` is no
        longer a member, NotFound for a ``parent`` not of this thread,
        RateLimited when ``user`` sent too many prompts (a repeat of a seen
        ``client_msg_id`` costs nothing), BudgetExceeded when ``user`` spent
        their tokens of the day.
        """
        message = Message(
            id="", role="user", content=content, user_id=user,
            created_at=int(time.time() * 1000), status="complete", client_msg_id=client_msg_id,
        )  # fmt: skip
        anchor = (parent or "-") if branches else ""
        return await self._turn(thread, user, message, anchor, client_msg_id)

    async def regenerate(
        self, thread: ThreadId, user: UserId, message_id: str, client_msg_id: str | None
    ) -> str | None:
        """Start a new reply to the user message ``message_id`` answers (or to
        it, if it is a user message), a sibling of the old reply. Returns None,
        or the original ``loading`` frame for a ``client_msg_id`` seen before.
        Raises as ``prompt``, and InvalidRequest when no user message is
        answered."""
        return await self._turn(thread, user, None, message_id, client_msg_id)

    async def _turn(
        self, thread: ThreadId, user: UserId, message: Message | None, anchor: str,
        client_msg_id: str | None,
    ) -> str | None:  # fmt: skip
        """A prompt (``message``) or a regenerate (none) as one turn: see
        TurnStore.begin for ``anchor``. While a turn runs, a prompt is refused,
        queued or interrupts, as the thread's prompt_policy says.

        Seen through once received, even when its caller goes away meanwhile
        (its socket closed, cancelling the socket's reader): cancelled between
        the lock's grant and the turn's start, it would leave a lock nobody
        releases (thread_busy until its lease ends) or a begun turn nobody
        runs (until the reaper ends it interrupted), and the client's re-sent
        copy would meet either."""
        return await asyncio.shield(self._take_turn(thread, user, message, anchor, client_msg_id))

    async def _take_turn(
        self, thread: ThreadId, user: UserId, message: Message | None, anchor: str,
        client_msg_id: str | None,
    ) -> str | None:  # fmt: skip
        if self.draining:
            raise Draining("this server is restarting; send again in a moment")
        await self._check_writer(thread, user)
        if client_msg_id is not None:
            original = await self.message_frame(thread, client_msg_id)
            if original is not None:
                return original
        await self.limits.take_prompt(user)
        await self.usage.check(user)  # over today's budget: not even queued
        answers = ""
        if message is None and self.archive is not None:
            answers = await self._answered(thread, anchor)
        return await self._open(thread, user, message, anchor, client_msg_id, answers)

    async def _answered(self, thread: ThreadId, message_id: str) -> str:
        """The user message a regenerate of ``message_id`` answers: itself,
        or its parent. Read from both tiers, since BEGIN_TURN sees only Redis
        and either may be archived. NotFound, or InvalidRequest when it
        answers no user message."""
        path, _ = await self.history.page(thread, None, 2, leaf=message_id)
        asked = path[-1] if path[-1].role == "user" else path[0] if len(path) > 1 else None
        if asked is None or asked.role != "user":
            raise InvalidRequest("that message answers no user message")
        return asked.id

    async def _open(
        self, thread: ThreadId, user: UserId, message: Message | None, anchor: str,
        client_msg_id: str | None, answers: str = "",
    ) -> str | None:  # fmt: skip
        """_turn() once the user may: commit the message and start the turn,
        or, while a turn runs, refuse, queue or interrupt as the thread's
        prompt_policy says. A turn starts only with room held in its user's
        daily budget (app.chat.usage), taken under the thread's lock."""
        generation_id = secrets.token_hex(8)
        loading = Loading(thread_id=thread, generation_id=generation_id, model=self.model.name)
        policy: PromptPolicy | None = None  # read once the thread is busy: a free one needs none
        # A few times at most: after closing a turn a dead pod left open,
        # when the thread freed itself between a refused lock and the queue,
        # or when its lock was held by no turn.
        for _attempt in range(4):
            lease = await self.lock.acquire(thread)
            result: Begun | Duplicate | Orphaned | Waits | None = None
            if lease is not None:
                try:
                    await self.usage.reserve(user, generation_id, self._room_per_turn)
                except BaseException:
                    await self._release(thread, lease)
                    raise
                try:
                    await self.turns.index_add(thread)
                    result = await self.turns.begin(
                        thread, lease, message, loading, self.settings.chat_pod_id, anchor,
                        client_msg_id, charge_to=user, answers=answers,
                    )  # fmt: skip
                except BaseException:
                    await self._release(thread, lease)
                    await self.usage.release(user, generation_id)
                    raise
                if not isinstance(result, Begun):
                    await self.usage.release(user, generation_id)
            if isinstance(result, Begun) and lease is not None:
                await self._start_turn(thread, lease, generation_id, message, result)
                try:
                    await self.threads.touch_members(thread, result.members)
                except RedisError as exc:  # only the members' lists go stale
                    log.warning("thread lists of %s's members not updated: %s", thread, exc)
                return None
            if isinstance(result, Duplicate) and lease is not None:
                await self._release(thread, lease)
                return await self.message_frame(thread, client_msg_id or "")
            if isinstance(result, Orphaned) and lease is not None:
                record = await self.turns.record(thread)
                if record is None:  # closed meanwhile by the reaper
                    await self._release(thread, lease)
                else:
                    log.info(
                        "closing turn %s left open by pod %s", record.generation_id, record.pod
                    )
                    await self.turns.close_orphan(thread, lease, record)
                    await self.usage.settle(thread)
                continue
            # Busy, or prompts wait in the queue (result: Waits).
            if lease is not None:
                await self._release(thread, lease)
            if message is not None and policy is None:
                policy = await self.threads.prompt_policy(thread)
            if message is None or policy is None or policy == "reject":
                if lease is None and await self.turns.record(thread) is None:
                    # Locked with no turn running: a reaper sweep passing by
                    # (it holds each indexed thread's lock for a few round
                    # trips, just after a turn ended, say), or a turn about to
                    # begin. Look again rather than refuse a free thread.
                    await asyncio.sleep(LOCK_PASSING_S)
                    continue
                raise ThreadBusy("a reply is being generated in this thread")
            queued = await self.queue.enqueue(thread, message, anchor)
            if not isinstance(queued, Idle):  # Idle: the thread freed itself meanwhile
                # Its budget is checked again, and room held, when it starts.
                return await self._queued(thread, message, queued, policy)
        raise ThreadBusy("a reply is being generated in this thread")

    async def _queued(
        self, thread: ThreadId, message: Message, result: Enqueued | Seen, policy: PromptPolicy
    ) -> str | None:
        """After ENQUEUE_PROMPT: None once queued (its ``queued`` event
        reaches every socket), or the original frame of a client_msg_id seen
        before. An ``interrupt`` prompt stops the running turn; a thread found
        free (prompts already waiting) starts its queue's head."""
        if isinstance(result, Seen):
            return await self.message_frame(thread, message.client_msg_id or "")
        # The reaper starts it should no pod do so (this one dying, say).
        await self.turns.index_add(thread)
        if policy == "interrupt":
            await self.turns.request_cancel(thread, None)
        if not result.running:
            await self.start_next(thread)
        return None

    async def start_next(self, thread: ThreadId, lease: Lease | None = None) -> bool:
        """Start the thread's next queued prompt, if one waits and the thread
        is free (or ``lease``, which this takes over, holds it). Whoever holds
        the thread otherwise starts it when done. True when one started."""
        attempts = 0
        while attempts < 3:
            head = await self.queue.head(thread)
            if head is None or self.draining:  # a draining pod leaves it to the others
                break
            if lease is None:
                lease = await self.lock.acquire(thread)
                if lease is None:
                    return False
            generation_id = secrets.token_hex(8)
            if not await self._admit_queued(thread, head, generation_id):
                continue  # it left the queue (at most CHAT_MAX_QUEUED): the next head
            attempts += 1
            loading = Loading(thread, generation_id, self.model.name)
            try:
                await self.turns.index_add(thread)
                result = await self.turns.begin(
                    thread, lease, head.message, loading, self.settings.chat_pod_id, head.anchor
                )
            except Forbidden:
                # Its sender is no longer a member (removed, or being erased):
                # it never runs, and leaves the queue. The next head, same lease.
                await self.usage.release(UserId(head.message.user_id), generation_id)
                with contextlib.suppress(NotFound):
                    await self.queue.cancel(
                        thread, head.message.queue_id or "", head.message.user_id, False,
                        reason="revoked",
                    )  # fmt: skip
                continue
            except BaseException:
                await self.lock.release(thread, lease)
                await self.usage.release(UserId(head.message.user_id), generation_id)
                raise
            if isinstance(result, Begun):
                await self._start_turn(thread, lease, generation_id, head.message, result)
                return True
            await self.usage.release(UserId(head.message.user_id), generation_id)
            if isinstance(result, Orphaned):
                record = await self.turns.record(thread)
                if record is not None:
                    await self.turns.close_orphan(thread, lease, record)
                    await self.usage.settle(thread)
                    lease = None
            # Waits ("moved": cancelled meanwhile): the next head, same lease.
        if lease is not None:
            await self.lock.release(thread, lease)
        return False

    async def _admit_queued(self, thread: ThreadId, head: Head, generation_id: str) -> bool:
        """The daily budget, checked again as a queued prompt starts: its
        sender may have spent it while it waited (or queued many), and a
        queued turn must not take them further over the line than a prompt
        could. A refused one leaves the queue: ``unqueued{reason:
        budget_exceeded}``."""
        user = UserId(head.message.user_id)
        try:
            await self.usage.reserve(user, generation_id, self._room_per_turn)
        except BudgetExceeded:
            with contextlib.suppress(NotFound):  # cancelled meanwhile: gone anyway
                await self.queue.cancel(
                    thread, head.message.queue_id or "", user, False, reason="budget_exceeded"
                )
            return False
        return True

    async def _release(self, thread: ThreadId, lease: Lease) -> None:
        """Free the thread, and start what waits in its queue: a prompt may
        have been queued while this lease held the thread."""
        await self.lock.release(thread, lease)
        if await self.queue.size(thread):
            await self.start_next(thread)

    async def _after_turn(self, thread: ThreadId, ended: Ended | None) -> None:
        """A turn of this pod is over: title the thread, start what waits in
        its queue. A turn that committed its end tells whether either is
        wanted (END_TURN reads both in its step: a prompt queued later finds
        the thread free and starts itself); one that did not is checked."""
        if ended is None or ended.untitled:
            self.titles.after_turn(thread)
        if ended is None or ended.queued:
            await self.start_next(thread)

    async def _start_turn(
        self, thread: ThreadId, lease: Lease, generation_id: str, prompt: Message | None,
        begun: Begun,
    ) -> None:  # fmt: skip
        """Hand the begun turn to a runner. From here on the turn must run (or
        be reaped) whatever fails: a failed history read only narrows the
        model's context to the prompt itself. The context is the branch that
        ends at the user message answered, never another branch, and starts
        where the last turn's did while it fits (HistoryReader.context)."""
        asked = committed(begun.message_id, begun.parent, prompt) if prompt else None
        try:
            start_key = keys.context_start(thread)
            start = begun.context_start  # read by BEGIN_TURN
            context = (
                self.contexts.context(thread, begun, asked, self._context_budget, message_tokens)
                if asked else None
            )  # fmt: skip
            if context is None:
                context = await self.history.context(
                    thread, begun.message_id, self._context_budget, message_tokens, start
                )
            self.contexts.keep(thread, begun, context)
            if context and context[0].id != start:
                await self.redis.set(start_key, context[0].id, ex=keys.CONTEXT_START_TTL_S)
        except RedisError as exc:
            log.warning("turn %s sees only its prompt: %s", generation_id, exc)
            self.contexts.drop(thread)
            context = [asked] if asked else []
        self.manager.start(TurnContext(thread, lease, generation_id, context, begun.message_id))

    async def switch(self, thread: ThreadId, user: UserId, message_id: str) -> str:
        """Make the newest leaf under ``message_id`` the active leaf; every
        socket gets ``branch``. Under the thread's lock, like a turn: ThreadBusy
        while one runs."""
        await self._check_writer(thread, user)
        lease = await self.lock.acquire(thread)
        if lease is None:
            raise ThreadBusy("a reply is being generated in this thread")
        try:
            return await self.turns.switch(thread, lease, message_id)
        finally:
            await self._release(thread, lease)

    async def message_frame(self, thread: ThreadId, client_msg_id: str) -> str | None:
        """The frame first sent for ``client_msg_id``, if any (the HTTP prompt's
        answer, and a repeated prompt's or regenerate's): a prompt's
        ``message``, a regenerate's ``loading``. A message whose event was
        trimmed is rebuilt from history; a trimmed ``loading`` is not worth
        a frame."""
        message_id = text(await self.redis.hget(keys.dedup(thread), client_msg_id))
        if message_id is None:
            return None
        stored = entries_of(await self.redis.xrange(keys.events(thread), message_id, message_id))
        if stored:
            return frame_from_entry(stored[0][0], stored[0][1]).frame
        entries = entries_of(await self.redis.xrange(keys.history(thread), message_id, message_id))
        if not entries:
            return None
        data = message_event_data(thread, message_from_entry(entries[0][0], entries[0][1]))
        return f'{{"id":"{message_id}",{data[1:]}'

    async def cancel(
        self, thread: ThreadId, generation_id: str | None, user: UserId | None = None
    ) -> str | None:
        """Ask the thread's running turn to stop, wherever it runs (with
        ``user``, only if they may change the thread)."""
        if user is not None:
            await self._check_writer(thread, user)
        return await self.turns.request_cancel(thread, generation_id)

    async def cancel_queued(self, thread: ThreadId, user: UserId, queue_id: str) -> None:
        """Take a waiting prompt out of the queue: its sender or the owner
        (anyone, with authentication off; never a viewer). NotFound when it
        no longer waits."""
        await self._check_writer(thread, user)
        await self.queue.cancel(thread, queue_id, user, self.settings.auth_enabled)

    async def delete_thread(self, thread: ThreadId, user: UserId) -> None:
        """Delete the thread from Redis, then its archived messages: a failure
        in between leaves rows of a thread that no longer exists, which a
        second delete (or retention) removes; never a thread without its past."""
        await self.threads.delete(thread, user)
        if self.archive is not None:
            await self.archive.delete_thread(thread)

    async def erase_user(self, target: UserId, caller: UserId) -> dict[str, int]:
        """Erase ``target``'s data, for the user themself or an admin
        (CHAT_ADMIN_USERS); what was removed, by kind.

        While it runs the user's new sockets are refused (their erasing
        marker, checked by ADMIT_SOCKET), and every open socket of theirs, on
        every pod, is told to close (ERASED_CHANNEL), at the start and again
        at the end. Threads they own are deleted whole, from both tiers. In
        every other thread (every thread is visited: one may hold their
        messages after they left it) their membership goes first, so nothing
        of theirs can be committed or queued there any more (BEGIN_TURN and
        ENQUEUE_PROMPT check it); then their queued prompts leave the queue
        (``unqueued``, reason ``revoked``); then a turn of theirs, or one
        answering them, still running is stopped and waited for; then their
        messages, the model's replies to them and a title made from their
        prompt are taken out (ERASE_AUTHOR, Archive.erase_author) with their
        read marker, role and presence. The threads their lists still name
        then (created or joined while the scan ran: their creation needs a
        reservation, which the marker refuses from the start) get the same.
        Last, every key of the user (lists, usage, limits, sockets) is
        deleted. StillRunning when a turn to wait
        for outlives the reaper's bound: erasing again finishes the job."""
        if caller != target and caller not in self.settings.admin_users:
            raise Forbidden("only the user themself or an admin may erase a user's data")
        report = dict.fromkeys(
            ("threads_deleted", "memberships_removed", "messages_erased",
             "archived_messages_erased", "queued_prompts_dropped", "titles_cleared",
             "sockets_closed", "user_keys_deleted"), 0,
        )  # fmt: skip
        erasing = keys.user_erasing(target)
        await self.redis.set(erasing, "1", ex=ERASING_TTL_S)
        report["sockets_closed"] = await self.redis.zcount(
            keys.user_sockets(target), int(time.time() * 1000), "+inf"
        )
        await self._tell_pods_erased(target)
        archived = await self.archive.ids_by(target) if self.archive is not None else {}
        visited = 0
        async for key in self.redis.scan_iter(match=keys.META_PATTERN, count=500):
            thread = keys.thread_of_meta(key if isinstance(key, str) else key.decode())
            if thread is None:
                continue
            visited += 1
            if visited % 500 == 0:  # a long erase keeps refusing their sockets
                await self.redis.expire(erasing, ERASING_TTL_S)
            await self._erase_in(thread, target, archived.get(thread, []), report)
        # A thread created by them (before the marker: RESERVE_THREAD), or
        # one they were added to, while the scan ran may have been missed by
        # it. Their lists name every such thread (the scan took the others out).
        listed: set[str] = set()
        for key in (keys.user_threads(target), keys.user_owned(target)):
            listed.update(texts(await self.redis.zrange(key, 0, -1)))
        for name in sorted(listed):
            with contextlib.suppress(keys.InvalidId):
                thread = keys.thread_id(name)
                await self._erase_in(thread, target, archived.get(thread, []), report)
        if self.archive is not None:
            report["archived_messages_erased"] = await self.archive.erase_author(target)
        async for key in self.redis.scan_iter(match=keys.user_keys_pattern(target), count=500):
            if key != erasing:
                report["user_keys_deleted"] += await self.redis.delete(key)
        # Again: a socket whose opening began before the marker was set may
        # have missed the first message.
        await self._tell_pods_erased(target)
        await self.redis.delete(erasing)
        log.info("erased the data of user %s: %s", target, report)
        return report

    async def _tell_pods_erased(self, target: UserId) -> None:
        """Every pod closes the user's sockets: told over pub/sub, and noted
        in ERASURES first for a pod whose subscriber is away right now (it
        replays what was noted since it last heard: app.chat.fanout)."""
        now_ms = int(time.time() * 1000)
        await self.redis.zadd(keys.ERASURES, {keys.erasure_digest(target): now_ms})
        await self.redis.zremrangebyscore(keys.ERASURES, "-inf", now_ms - keys.ERASURES_KEPT_MS)
        await self.redis.execute_command(self._publish, keys.ERASED_CHANNEL, target)

    async def _erase_in(
        self, thread: ThreadId, target: UserId, archived: list[str], report: dict[str, int]
    ) -> None:
        """Erase ``target`` from one thread (see ``erase_user``), counted in ``report``."""
        if text(await self.redis.hget(keys.meta(thread), "owner")) == target:
            with contextlib.suppress(NotFound):
                await self.delete_thread(thread, target)
                report["threads_deleted"] += 1
            return
        if await self.threads.is_member(thread, target):
            with contextlib.suppress(NotFound):
                await self.threads.remove_member(thread, target, target)
                report["memberships_removed"] += 1
        report["queued_prompts_dropped"] += await self._drop_queued(thread, target)
        erased, titles = await self._erase_author(thread, target, archived)
        report["messages_erased"] += erased
        report["titles_cleared"] += titles

    async def _drop_queued(self, thread: ThreadId, user: UserId) -> int:
        """Take ``user``'s waiting prompts out of the thread's queue; how many."""
        dropped = 0
        for waiting in await self.queue.waiting(thread):
            if waiting.user_id == user:
                with contextlib.suppress(NotFound):  # it started meanwhile: a turn now
                    await self.queue.cancel(thread, waiting.queue_id, user, False, reason="revoked")
                    dropped += 1
        return dropped

    async def _erase_author(
        self, thread: ThreadId, user: UserId, archived: list[str]
    ) -> tuple[int, int]:
        """ERASE_AUTHOR on one thread: (messages redacted, titles cleared).
        A running turn of the user's, or answering them, is cancelled first
        and waited for: it ends within moments on a live pod, or is closed
        by the reaper within CHAT_LOCK_TTL_MS + CHAT_REAPER_INTERVAL_MS if
        its pod died; past that (and a margin), StillRunning."""
        bound_s = (
            self.settings.chat_lock_ttl_ms + self.settings.chat_reaper_interval_ms
        ) / 1000 + ERASE_WAIT_MARGIN_S
        deadline = time.monotonic() + bound_s
        delays = iter(ERASE_POLL)
        while True:
            reply = await self.scripts.erase_author(
                keys=[
                    keys.history(thread), keys.events(thread), keys.reads(thread),
                    keys.presence(thread), keys.roles(thread), keys.meta(thread),
                    keys.turn(thread),
                ],
                args=[user, self._publish, *archived],
            )  # fmt: skip
            if reply[0] == "ok":
                if int(reply[2]):
                    await self._notices.changed(thread)
                return int(reply[1]), int(reply[2])
            if time.monotonic() >= deadline:
                raise StillRunning(
                    f"a turn of thread {thread} did not end within {bound_s:.0f}s; erase again"
                )
            await self.turns.request_cancel(thread, text(reply[1]))
            await asyncio.sleep(next(delays))

    async def export(self, thread: ThreadId, user: UserId) -> AsyncIterator[Message]:
        """Every message of the thread, every branch, oldest first, from both
        tiers (the owner's export). Checked now; read as it is iterated."""
        await self.threads.require_owner(thread, user)
        at = self.settings.chat_pause_at
        return self.history.everything(thread, lambda: faults.pause_here("export_read", at))

    async def history_page(
        self, thread: ThreadId, before: str | None, limit: int, user: UserId | None = None,
        leaf: str | None = None,
    ) -> tuple[list[Message], bool]:  # fmt: skip
        """A page of the branch ending at ``leaf`` (default: the active one);
        with ``user``, only while they are a member (a removed member's socket
        may not have been closed yet)."""
        if user is not None and not await self._may_access(thread, user):
            raise Forbidden("you are not a member of this thread")
        return await self.history.page(thread, before, limit, leaf)
