"""The standalone reaper process (``durable-chat worker``).

Pods run the reaper themselves unless CHAT_REAPER_IN_POD=0; this process runs
it on its own, built from the few parts it needs: a Redis command client, the
turn lock and the turn store. No model, no fan-out hub, no sockets.
"""

from __future__ import annotations

from app.chat.lock import TurnLock
from app.chat.reaper import Reaper
from app.chat.scripts import Scripts
from app.chat.turns import TurnStore
from app.chat.usage import UsageStore
from app.redis_client import connect
from app.settings import Settings


async def run(settings: Settings) -> None:
    """Sweep for dead pods' turns until cancelled (REDIS_URL must be set)."""
    handles = connect(settings)
    scripts = Scripts(handles.commands)
    turns = TurnStore.configured(handles.commands, scripts, handles.publish_command, settings)
    usage = UsageStore(handles.commands, scripts, settings.chat_user_tokens_per_day)
    reaper = Reaper(
        scripts, TurnLock(scripts, settings.chat_lock_ttl_ms), turns, usage,
        interval_ms=settings.chat_reaper_interval_ms,
        holder=f"worker:{settings.chat_pod_id}",
    )  # fmt: skip
    try:
        await reaper.run_forever()
    finally:
        await handles.aclose()
