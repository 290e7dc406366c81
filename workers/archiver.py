"""The archiver process (``durable-chat archiver``): app.chat.archiver's
sweeps on their own, every CHAT_ARCHIVE_INTERVAL_S, for deployments that
do not run them in the pods (CHAT_ARCHIVER_IN_POD). Built from a Redis
command client, the scripts, the thread store and the archive.
"""

from __future__ import annotations

import logging

from app.chat.archive import Archive
from app.chat.archiver import Archiver
from app.redis_client import connect
from app.settings import Settings

log = logging.getLogger("durable_chat.archiver")


async def run(settings: Settings, once: bool = False) -> None:
    """Sweep every CHAT_ARCHIVE_INTERVAL_S until cancelled (or once: then a
    failed sweep raises)."""
    assert settings.chat_archive_url is not None
    handles = connect(settings)
    archive = await Archive.open(settings.chat_archive_url, settings.chat_archive_pool_size)
    archiver = Archiver.configured(handles.commands, handles.publish_command, archive, settings)
    try:
        if once:
            moved, expired = await archiver.sweep()
            log.info("sweep done: %d messages archived, %d threads expired", moved, expired)
        else:
            await archiver.run_forever()
    finally:
        await archive.close()
        await handles.aclose()
