"""Every Redis key and channel name durable-chat uses, built here and only here.

All keys of one thread carry the hash tag ``{T}`` so that a thread's
transactions and Lua scripts touch a single Redis Cluster slot, and its
pub/sub channel lives on the same shard. Nothing outside this module formats
a key, and nothing here formats a key from an unchecked id: callers pass a
``ThreadId``/``UserId``, which only the validators below create.

Layout (see the README for the redis-cli view of each):

    chat:{T}:history   Stream   committed messages; entry id = message id,
                                field ``parent`` the parent message's id
    chat:{T}:tree      Hash     the message tree's indexes: children, chains,
                                newest leaves (see _TREE in app.chat.scripts)
    chat:{T}:events    Stream   the timeline (capped), for resume and gap fill
    chat:{T}:lock      String   owner token of the running turn (PX lease)
    chat:{T}:fence     String   fencing number, INCR at each lock grant; after
                                a delete, a tombstone with a TTL (DELETED_TTL_S)
    chat:{T}:meta      Hash     epoch, owner, title, counts, event number,
                                the active leaf, prompt_policy, erasures
    chat:{T}:queue     Stream   prompts waiting for the running turn; entry
                                id = queue id = its `queued` event's id
    chat:{T}:members   Set      user ids allowed in the thread
    chat:{T}:roles     Hash     member -> 'viewer' (any other member is a member)
    chat:{T}:reads     Hash     m:<U> a member's read marker, u:<U> their unread count
    chat:{T}:presence  Sorted set  <user>|<socket> -> lease expiry (ms, Redis clock)
    chat:{T}:typing:<U> String  a user's typing throttle (expires after 2 s)
    chat:{T}:dedup     Hash     client_msg_id -> message id (expires)
    chat:{T}:turn      Hash     the running turn: generation, fence, pod, start
    chat:{T}:usage     Hash     token charges not yet added to their users' days
    chat:{T}:context   String   where the model's context last started (expires)
    chat:{T}:live      channel  timeline frames as published
    chat:user:{U}:threads  Sorted set  a user's threads by last activity (ms)
    chat:user:{U}:inbox    channel     the user's thread summaries as they change
    chat:user:{U}:owned    Sorted set  threads the user created (the thread quota)
    chat:user:{U}:sockets  Sorted set  the user's open sockets, by lease expiry (ms)
    chat:user:{U}:rate:prompts  Hash   the user's prompt token bucket (expires)
    chat:user:{U}:usage:{day}   Hash   the user's model tokens of a UTC day (expires)
    chat:user:{U}:inflight      Hash   budget room held by the user's running turns
    chat:turns         Sorted set  threads with a running turn, by start (ms)
    chat:reaper:leader String   the reaper's leader lease (a pod's or the worker's)
    chat:queues:leader String   with a standalone reaper: the pods' queue starter's lease
"""

from __future__ import annotations

import hashlib
import re
from typing import NewType

ThreadId = NewType("ThreadId", str)
UserId = NewType("UserId", str)

# The id syntaxes, here and only here: the REST edge's path and body checks
# and the tests' key layout are built from these patterns (unanchored: match
# them whole, with fullmatch or ^...$).
THREAD_ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"
# User ids come from token subjects (emails, UUIDs, provider ids); they only
# ever sit inside a hash tag, so anything printable without braces is safe.
USER_ID_PATTERN = r"[A-Za-z0-9_.@:|+=-]{1,128}"
# [0-9], not \d: \d also matches other scripts' digits, which int() accepts
# and Redis refuses.
EVENT_ID_PATTERN = r"([0-9]{1,20})-([0-9]{1,20})"
_THREAD_ID = re.compile(THREAD_ID_PATTERN)
_USER_ID = re.compile(USER_ID_PATTERN)
_EVENT_ID = re.compile(EVENT_ID_PATTERN)
_MAX_ID_PART = 2**64 - 1

PREFIX = "chat"
TURN_INDEX = f"{PREFIX}:turns"
REAPER_LEADER = f"{PREFIX}:reaper:leader"
QUEUE_LEADER = f"{PREFIX}:queues:leader"
# Every pod listens here: a message (a user id) closes that user's sockets on
# every pod, whatever threads they follow (erasing a user's data).
ERASED_CHANNEL = f"{PREFIX}:erased"
# Users erased lately, for a pod whose subscriber was away when ERASED_CHANNEL
# told the others: member erasure_digest(user), score the time (ms) the pods
# were last told. A pod back from a lost subscriber closes the sockets of
# those told since it last provably heard. Kept ERASURES_KEPT_MS, and only
# as digests: Redis keeps no erased user's id.
ERASURES = f"{PREFIX}:erasures"
ERASURES_KEPT_MS = 3_600_000

# How long a deleted thread's fence stays behind as a tombstone. While it
# exists the thread id cannot be created again, and any write still in flight
# from a turn of the deleted thread fails its fence check (see DELETE_THREAD
# in app.chat.scripts). A turn's writes stop within seconds of its fence
# going stale (the LLM call and write retries are bounded), so a day is
# generous; after it, the id is free and nothing of the thread remains.
DELETED_TTL_S = 86400

# How long a thread's context start is kept (app.chat.history.context). It
# only makes consecutive turns send the model the same prefix, for providers'
# prompt caches, which forget within minutes (Anthropic's in 5, or 60);
# after an hour the next turn simply picks a new start.
CONTEXT_START_TTL_S = 3600


class InvalidId(ValueError):
    """An id from outside failed validation; no key was built from it."""


def thread_id(raw: str) -> ThreadId:
    """Validate a thread id: 1 to 64 of ``A-Za-z0-9_-``."""
    if not isinstance(raw, str) or not _THREAD_ID.fullmatch(raw):
        raise InvalidId("thread_id must be 1 to 64 characters of A-Za-z0-9_-")
    return ThreadId(raw)


def user_id(raw: str) -> UserId:
    """Validate a user id taken from an authenticated token."""
    if not isinstance(raw, str) or not _USER_ID.fullmatch(raw):
        raise InvalidId("user id must be 1 to 128 characters of A-Za-z0-9_.@:|+=-")
    return UserId(raw)


def event_id(raw: str) -> tuple[int, int]:
    """Parse a Redis Stream id ``<ms>-<seq>`` into a comparable tuple."""
    match = _EVENT_ID.fullmatch(raw) if isinstance(raw, str) else None
    if match is None:
        raise InvalidId("event and message ids look like <ms>-<seq>")
    ms, seq = int(match.group(1)), int(match.group(2))
    if ms > _MAX_ID_PART or seq > _MAX_ID_PART:
        # Redis refuses such an id with an error: never send it one.
        raise InvalidId("event and message ids are two 64-bit numbers <ms>-<seq>")
    return ms, seq


def _thread_key(t: ThreadId, suffix: str) -> str:
    return f"{PREFIX}:{{{t}}}:{suffix}"


def history(t: ThreadId) -> str:
    return _thread_key(t, "history")


def events(t: ThreadId) -> str:
    return _thread_key(t, "events")


def lock(t: ThreadId) -> str:
    return _thread_key(t, "lock")


def fence(t: ThreadId) -> str:
    return _thread_key(t, "fence")


def meta(t: ThreadId) -> str:
    return _thread_key(t, "meta")


def members(t: ThreadId) -> str:
    return _thread_key(t, "members")


def roles(t: ThreadId) -> str:
    return _thread_key(t, "roles")


def reads(t: ThreadId) -> str:
    return _thread_key(t, "reads")


def presence(t: ThreadId) -> str:
    return _thread_key(t, "presence")


def typing(t: ThreadId, u: UserId) -> str:
    return _thread_key(t, f"typing:{u}")


def dedup(t: ThreadId) -> str:
    return _thread_key(t, "dedup")


def tree(t: ThreadId) -> str:
    return _thread_key(t, "tree")


def queue(t: ThreadId) -> str:
    return _thread_key(t, "queue")


def turn(t: ThreadId) -> str:
    return _thread_key(t, "turn")


def usage_outbox(t: ThreadId) -> str:
    """Charges of the thread's ended turns not yet added to their users' days."""
    return _thread_key(t, "usage")


def context_start(t: ThreadId) -> str:
    return _thread_key(t, "context")


def live(t: ThreadId) -> str:
    return _thread_key(t, "live")


def all_thread_keys(t: ThreadId) -> list[str]:
    """Every key a thread owns (its channel is not a key). A delete removes
    all but the fence, which stays a while as a tombstone (DELETED_TTL_S)."""
    return [
        history(t), events(t), lock(t), fence(t), meta(t), members(t), dedup(t), turn(t),
        tree(t), usage_outbox(t), context_start(t), queue(t), roles(t), reads(t), presence(t),
    ]  # fmt: skip


def user_threads(u: UserId) -> str:
    return f"{PREFIX}:user:{{{u}}}:threads"


def user_keys_pattern(u: UserId) -> str:
    """Every key of one user, for SCAN (a user id holds no glob character)."""
    return f"{PREFIX}:user:{{{u}}}:*"


def user_inbox(u: UserId) -> str:
    """A user's inbox channel (the scripts' inbox_channel builds the same name)."""
    return f"{PREFIX}:user:{{{u}}}:inbox"


def user_of_inbox(channel: str) -> UserId | None:
    """The user whose inbox channel this is, or None for any other channel."""
    head, tail = f"{PREFIX}:user:{{", "}:inbox"
    if channel.startswith(head) and channel.endswith(tail):
        return UserId(channel[len(head) : -len(tail)])
    return None


def user_owned(u: UserId) -> str:
    return f"{PREFIX}:user:{{{u}}}:owned"


def user_sockets(u: UserId) -> str:
    return f"{PREFIX}:user:{{{u}}}:sockets"


def erasure_digest(u: str) -> str:
    """What ERASURES keeps of an erased user's id."""
    return hashlib.blake2b(u.encode(), digest_size=16).hexdigest()


def user_erasing(u: UserId) -> str:
    """Set while the user's data is being erased: their new sockets are refused."""
    return f"{PREFIX}:user:{{{u}}}:erasing"


def user_prompt_bucket(u: UserId) -> str:
    return f"{PREFIX}:user:{{{u}}}:rate:prompts"


def user_usage(u: UserId, day: int) -> str:
    """A user's token counts of one UTC day (days since the epoch)."""
    return f"{PREFIX}:user:{{{u}}}:usage:{day}"


def user_inflight(u: UserId) -> str:
    """Room held in a user's daily budget by their turns still running."""
    return f"{PREFIX}:user:{{{u}}}:inflight"


def probe_channel(pod: str) -> str:
    """The channel a pod publishes its subscriber's probes on (app.chat.fanout).
    ``pod`` is the operator's CHAT_POD_ID; probes carry random tokens, so
    two pods given the same id still never take each other's for their own."""
    return f"{PREFIX}:probe:{pod}"


# Every thread's meta key, for SCAN (the archiver's sweep).
META_PATTERN = f"{PREFIX}:{{*}}:meta"


def thread_of_meta(key: str) -> ThreadId | None:
    """The thread whose meta key this is (checked like any id), or None."""
    head, tail = f"{PREFIX}:{{", "}:meta"
    if not (key.startswith(head) and key.endswith(tail)):
        return None
    try:
        return thread_id(key[len(head) : -len(tail)])
    except InvalidId:
        return None


def thread_of_channel(channel: str) -> ThreadId:
    """The thread a live channel belongs to (channels are only built above)."""
    return ThreadId(channel[len(PREFIX) + 2 : -len("}:live")])
