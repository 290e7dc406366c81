"""The pod's Prometheus metrics, served at /metrics: one place names them all.

Counters are process-wide (the default registry), as Prometheus expects of
one pod process. Gauges that mirror live state are read at scrape time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

_PREFIX = "durable_chat"

SOCKETS_OPEN = Gauge(f"{_PREFIX}_sockets_open", "WebSockets open on this pod")
THREADS_FOLLOWED = Gauge(f"{_PREFIX}_threads_followed", "Threads this pod is subscribed to")
TURNS_RUNNING = Gauge(f"{_PREFIX}_turns_running", "Turns running on this pod")
TURNS_STARTED = Counter(f"{_PREFIX}_turns_started", "Turns started on this pod")
TURNS_FINISHED = Counter(
    f"{_PREFIX}_turns_finished", "Turns ended on this pod, by final status", ["status"]
)
TURNS_REAPED = Counter(f"{_PREFIX}_turns_reaped", "Dead pods' turns closed as interrupted")
THREAD_BUSY = Counter(f"{_PREFIX}_thread_busy", "Prompts refused because a turn was running")
DELTAS_PUBLISHED = Counter(f"{_PREFIX}_deltas_published", "Coalesced deltas written and published")
EVENTS_DELIVERED = Counter(f"{_PREFIX}_events_delivered", "Timeline events sent to sockets")
GAP_FILLS = Counter(
    f"{_PREFIX}_gap_fill_events", "Events pub/sub lost that were filled from the event log"
)
FANOUT_LAG = Histogram(
    f"{_PREFIX}_fanout_lag_seconds",
    "From an event's commit in Redis to its dispatch on this pod",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
TIME_TO_FIRST_TOKEN = Histogram(
    f"{_PREFIX}_time_to_first_token_seconds",
    "From a turn's start to the model's first text",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
)
LLM_TOKENS = Counter(
    f"{_PREFIX}_llm_tokens",
    "Model tokens, by provider, model and kind (input, output, cache_read, cache_write)",
    ["provider", "model", "kind"],
)
TOOL_CALLS = Counter(
    f"{_PREFIX}_tool_calls",
    "Tool calls answered on this pod, by tool (unknown: a name no tool has) and outcome",
    ["tool", "outcome"],
)
REDIS_ERRORS = Counter(
    f"{_PREFIX}_redis_errors", "Redis errors seen while serving, by where", ["where"]
)
SUBSCRIBER_CONNECTS = Counter(
    f"{_PREFIX}_subscriber_connects", "Connections of the pub/sub subscriber (1 + reconnects)"
)
SUBSCRIBER_DEAF = Counter(
    f"{_PREFIX}_subscriber_deaf",
    "Times the pub/sub subscriber missed its probe's deadline and was replaced",
)
FOLLOWERS_MOVED = Counter(
    f"{_PREFIX}_followers_moved",
    "Sockets closed (1013) to reconnect elsewhere because this pod's subscriber stayed deaf",
)
ARCHIVED_MESSAGES = Counter(
    f"{_PREFIX}_archived_messages", "Messages moved from Redis to the archive (the archiver)"
)
THREADS_EXPIRED = Counter(
    f"{_PREFIX}_threads_expired",
    "Threads deleted from both tiers for idling past CHAT_RETENTION_DAYS (the archiver)",
)
SLOW_CLIENT_DROPS = Counter(
    f"{_PREFIX}_slow_client_drops", "Sockets closed 1013 for being too slow"
)


def count_tokens(provider: str, model: str, usage: dict[str, int]) -> None:
    """Add one turn's tokens (``done.usage``) to LLM_TOKENS."""
    for kind, count in usage.items():
        LLM_TOKENS.labels(provider, model, kind.removesuffix("_tokens")).inc(count)


ASYNCIO_TASKS = Gauge(
    f"{_PREFIX}_asyncio_tasks",
    "asyncio tasks alive in the pod (flat under steady load; a climb is a leak)",
)


def _tasks() -> int:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # scraped outside the pod's event loop
        return 0


LOOP_LAG = Histogram(
    f"{_PREFIX}_loop_lag_seconds",
    "How late the event loop woke its lag probe (CHAT_LOOP_LAG_PROBE_MS): by the wall "
    "clock (clock=wall: what sockets feel, the host's scheduling included) and by the "
    "loop's own CPU time (clock=cpu: the pod's own stalls)",
    ["clock"],
    buckets=(0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0),
)


async def probe_loop_lag(interval_s: float) -> None:
    """Sleep ``interval_s`` again and again; record how late each wake-up was.
    The CPU-clock figure counts only what the loop's thread ran meanwhile (a
    callback that ran long), not the time the host gave other processes."""
    loop = asyncio.get_running_loop()
    wall, cpu = LOOP_LAG.labels("wall"), LOOP_LAG.labels("cpu")
    while True:
        asleep, ran = loop.time(), time.thread_time()
        await asyncio.sleep(interval_s)
        late = max(0.0, loop.time() - asleep - interval_s)
        wall.observe(late)
        cpu.observe(min(late, max(0.0, time.thread_time() - ran - interval_s)))


def bind_live_gauges(followed: Callable[[], int], running: Callable[[], int]) -> None:
    """Read the live gauges from the pod's own state at scrape time."""
    THREADS_FOLLOWED.set_function(followed)
    TURNS_RUNNING.set_function(running)
    ASYNCIO_TASKS.set_function(_tasks)


def exposition() -> tuple[bytes, str]:
    """The metrics in Prometheus text format, and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST
