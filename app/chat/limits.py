"""Abuse limits: prompts per minute and open sockets per user, shared by every
pod, and this pod's own ceiling on sockets.

Per-user counts live in Redis (the TAKE_TOKEN, ADMIT_SOCKET and RENEW_SOCKETS
scripts of app.chat.scripts), so a user who spreads prompts or sockets over
many pods meets one limit. The per-pod count is kept in memory: its point is
to protect this process. (The thread quota is the thread's own business:
app.chat.threads.) With auth off every caller is the same user,
``anonymous``, so per-user limits are not applied at all.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import defaultdict
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.chat import keys, tasks
from app.chat.errors import ChatError, Forbidden, PodFull, RateLimited
from app.chat.keys import UserId
from app.chat.redis_types import RedisClient
from app.chat.scripts import Scripts, renewals
from app.settings import Settings

log = logging.getLogger(__name__)

# What a client refused by a full pod is told to wait (another pod may answer
# sooner: the load balancer picks again on reconnect).
POD_FULL_RETRY_MS = 1000
# Renewal calls in flight at once (on a Cluster: one per user, each user's
# key has its own slot).
RENEW_CALLS_AT_ONCE = 100


@dataclass(frozen=True, slots=True)
class Admission:
    """A socket's count across pods, still to run: ADMIT_SOCKET's keys and
    arguments (the user's sockets and erasing marker; the socket's id, the
    most sockets per user, the lease)."""

    keys: list[str]
    args: list[str | int]


class Limits:
    """The prompt bucket and the socket counts, for every user of this pod."""

    def __init__(self, redis: RedisClient, scripts: Scripts, settings: Settings) -> None:
        self._redis = redis
        self._scripts = scripts
        per_user = settings.auth_enabled
        self._prompts_per_min = settings.chat_rate_prompts_per_min if per_user else 0
        self._burst = settings.chat_rate_prompt_burst
        self._max_user_sockets = settings.chat_max_sockets_per_user if per_user else 0
        self._max_pod_sockets = settings.chat_max_sockets_per_pod
        self._lease_ms = settings.chat_socket_lease_ms
        self._pod = settings.chat_pod_id
        # Whether every user's keys are on one Redis (not a Cluster).
        self._one_redis = isinstance(redis, Redis)
        # Sockets open on this pod: socket id -> user.
        self._local: dict[str, UserId] = {}
        self._heartbeat: asyncio.Task[None] | None = None

    @property
    def local_sockets(self) -> int:
        return len(self._local)

    async def start(self) -> None:
        if self._max_user_sockets:
            self._heartbeat = asyncio.create_task(self._renew_forever(), name="socket-leases")

    async def stop(self) -> None:
        if self._heartbeat is not None:
            await tasks.stop(self._heartbeat, tasks.RELEASE_S)
            self._heartbeat = None

    # --- prompts --------------------------------------------------------------

    async def take_prompt(self, user: UserId) -> None:
        """Count one prompt of ``user``; RateLimited when the bucket is empty."""
        if not self._prompts_per_min:
            return
        allowed, retry_after_ms = await self._scripts.take_token(
            keys=[keys.user_prompt_bucket(user)],
            args=[self._burst, self._prompts_per_min / 60000, 1],
        )
        if not allowed:
            raise RateLimited(
                f"too many prompts: at most {self._prompts_per_min} a minute",
                retry_after_ms=int(retry_after_ms),
            )

    # --- sockets --------------------------------------------------------------

    async def claim_socket(self, user: UserId) -> str:
        """Count a new socket of ``user`` on this pod and across pods; its id,
        for ``release_socket``. PodFull or RateLimited when over a limit,
        Forbidden while the user's data is being erased."""
        socket_id, admission = self.claim_socket_for_join(user)
        if admission is None:
            return socket_id
        try:
            admitted, retry_after_ms = await self._scripts.admit_socket(
                keys=admission.keys, args=admission.args
            )
        except BaseException:
            self._local.pop(socket_id, None)
            raise
        refusal = self.refusal(admitted, retry_after_ms)
        if refusal is not None:
            self._local.pop(socket_id, None)
            raise refusal
        return socket_id

    def claim_socket_for_join(self, user: UserId) -> tuple[str, Admission | None]:
        """As ``claim_socket``, but the count across pods is left to the
        caller when there is one (with the Admission to run: a thread's join
        runs it in its own script, JOIN_THREAD, with one Redis); then the
        caller releases the socket if refused. PodFull over this pod's limit."""
        if len(self._local) >= self._max_pod_sockets:
            raise PodFull("this server is full; try again", retry_after_ms=POD_FULL_RETRY_MS)
        socket_id = f"{self._pod}:{secrets.token_hex(8)}"
        # Counted locally before the first await, so concurrent opens on this
        # pod cannot all pass the check above.
        self._local[socket_id] = user
        if not self._max_user_sockets:
            return socket_id, None
        keys_ = [keys.user_sockets(user), keys.user_erasing(user)]
        args: list[str | int] = [socket_id, self._max_user_sockets, self._lease_ms]
        return socket_id, Admission(keys_, args)

    def refusal(self, admitted: int, retry_after_ms: int) -> ChatError | None:
        """The error of an ADMIT_SOCKET reply (None: admitted)."""
        if int(admitted) == -1:
            return Forbidden("this user's data is being erased")
        if not int(admitted):
            return RateLimited(
                f"too many open sockets: at most {self._max_user_sockets} per user",
                retry_after_ms=int(retry_after_ms),
            )
        return None

    async def release_socket(self, socket_id: str) -> None:
        """The socket closed: stop counting it (on failure, its lease runs out)."""
        user = self._local.pop(socket_id, None)
        if user is None or not self._max_user_sockets:
            return
        try:
            await self._redis.zrem(keys.user_sockets(user), socket_id)
        except (RedisError, OSError) as exc:
            log.warning("socket %s stays counted until its lease ends: %s", socket_id, exc)

    async def renew_leases(self) -> None:
        """Extend the lease of every socket open on this pod: with one Redis,
        one call per RENEW_BATCH sockets, whatever their users; on a Cluster,
        one call per user (app.chat.scripts.renewals)."""
        by_user: dict[UserId, list[str]] = defaultdict(list)
        for socket_id, user in list(self._local.items()):
            by_user[user].append(socket_id)
        groups = [(keys.user_sockets(user), ids) for user, ids in by_user.items()]
        calls = renewals(self._lease_ms, groups, self._one_redis)
        for start in range(0, len(calls), RENEW_CALLS_AT_ONCE):
            await asyncio.gather(
                *(
                    self._scripts.renew_sockets(keys=k, args=a)
                    for k, a in calls[start : start + RENEW_CALLS_AT_ONCE]
                )
            )

    async def _renew_forever(self) -> None:
        # Three renewals per lease: one late or failed renewal never lets a
        # live socket expire.
        interval_s = self._lease_ms / 3000
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.renew_leases()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("socket leases not renewed: %s", exc)
