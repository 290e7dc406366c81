"""Auto-titles: after the first reply of an untitled thread the model names
it (app.llm.titles), off the turn's path.

A turn's end only schedules the work; a task of this pod claims the thread
(CLAIM_TITLE: once per thread, so a thread is titled by one pod, once), asks
the model, at most twice (one retry), and sets the title only if the thread
still has none (UPDATE_THREAD's auto mode): an owner's rename always wins,
before or after. Every member's inbox hears the new title.
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from app.chat import keys
from app.chat.keys import ThreadId
from app.chat.redis_types import RedisClient, text
from app.chat.scripts import Scripts
from app.chat.threads import Threads
from app.llm import ChatModel, LLMError
from app.llm.titles import make_title

log = logging.getLogger(__name__)

TITLE_TIMEOUT_S = 20.0
ATTEMPTS = 2  # the first try and one retry, never more


class AutoTitles:
    """The title tasks of this pod; ``stop`` cancels and awaits them."""

    def __init__(
        self, redis: RedisClient, scripts: Scripts, threads: Threads, model: ChatModel
    ) -> None:
        self._redis = redis
        self._scripts = scripts
        self._threads = threads
        self._model = model
        self._tasks: set[asyncio.Task[None]] = set()

    async def settled(self) -> None:
        """Wait until the title tasks running now are done."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def after_turn(self, thread: ThreadId) -> None:
        """A turn of ``thread`` ended: title it if it is its first reply's turn."""
        task = asyncio.create_task(self._title(thread), name=f"title-{thread}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _title(self, thread: ThreadId) -> None:
        try:
            prompt = text(
                await self._scripts.claim_title(keys=[keys.meta(thread), keys.history(thread)])
            )
        except (RedisError, OSError) as exc:
            log.warning("thread %s not titled: %s", thread, exc)
            return
        if prompt is None:
            return  # titled, claimed before, or gone
        for attempt in range(1, ATTEMPTS + 1):
            try:
                async with asyncio.timeout(TITLE_TIMEOUT_S):
                    title = await make_title(self._model, prompt)
            except (LLMError, TimeoutError) as exc:
                log.info("title of %s, attempt %d: %s", thread, attempt, exc)
                continue
            if not title:
                return
            try:
                if await self._threads.auto_title(thread, title):
                    log.info("thread %s titled", thread, extra={"thread_id": thread})
            except (RedisError, OSError) as exc:
                log.warning("thread %s not titled: %s", thread, exc)
            return
