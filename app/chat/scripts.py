"""Every Lua script durable-chat runs, with its contract, registered once per client.

Why Lua rather than MULTI/EXEC for the writes of a turn: a turn's commit must
be refused when its fencing number is stale, and the event it publishes must
carry the id of the history entry written in the same step. A MULTI/EXEC
block can do neither (it cannot branch on a value it read, and a failed
command inside EXEC does not roll back the others). A script is Redis's
stronger transaction: it runs atomically like MULTI/EXEC, and it can check,
branch and reuse results. Every script touches only keys of one thread (all
hash-tagged ``{T}``), so it runs on one Redis Cluster shard.

Timeline ids. Scripts choose each event's Stream id themselves (the Redis
clock, or last id + 1 when the clock has not moved on), so a message's id can
be written into its own event and into the history entry of the same step:
a message id, its history entry id and its ``message`` event id are one id.

Placeholders. Event JSON is built by Python (orjson) with the raw byte
``\\x01`` where the message id committed by the same script goes. orjson
escapes every control character inside strings, so a raw ``\\x01`` can only
be a placeholder, never user text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from app.chat.redis_types import RedisClient

# Shared Lua helpers, prepended to the timeline scripts.
#
# next_event_id: a Stream id strictly after the thread's last one.
# emit: appends one event to the timeline (XADD events), numbers it with the
#   thread's contiguous event number n (pods use n to notice a lost pub/sub
#   message), and publishes the finished wire frame. The frame is the event
#   JSON with "id" and "n" spliced in front, so pods forward it as is. Given
#   a batch (a table), it keeps the frame's pieces there instead, and
#   publish_batch sends the script's frames as one pub/sub message: a script
#   that appends several events (a turn's start, its deltas, its end) costs
#   every pod one message to read, not one per event. A batch of two or more
#   is a newline followed by the frames separated by newlines
#   (app.chat.timeline.BATCH: JSON from orjson never holds a raw newline); a
#   batch of one is the frame.
# Pieces, not strings: Redis's Lua hashes every byte of every string it makes
#   (a 12 KB reply costs as much to hash as to copy), so a frame is not made
#   as a string of its own when it goes in a batch: its pieces are joined
#   once, into the batch's message. `body`, when given, is the pieces of the
#   frame after its id and n (a message event's, see message_event), so
#   that not even data's tail is copied for it.
_PRELUDE = r"""
local function next_event_id(meta)
  local now = redis.call('TIME')
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local last = redis.call('HGET', meta, 'last_event_id')
  if last then
    local lms, lseq = string.match(last, '^(%d+)-(%d+)$')
    lms = tonumber(lms)
    if ms <= lms then
      return string.format('%d-%d', lms, tonumber(lseq) + 1)
    end
  end
  return string.format('%d-0', ms)
end

local function emit(meta, events, channel, publish, id, data, maxlen, batch, body)
  local n = redis.call('HINCRBY', meta, 'event_n', 1)
  redis.call('HSET', meta, 'last_event_id', id)
  if maxlen > 0 then
    redis.call('XADD', events, 'MAXLEN', '~', maxlen, id, 'n', n, 'data', data)
  else
    redis.call('XADD', events, id, 'n', n, 'data', data)
  end
  local frame = batch or {}
  if batch then frame[#frame + 1] = '\n' end
  frame[#frame + 1] = '{"id":"'
  frame[#frame + 1] = id
  frame[#frame + 1] = '","n":'
  frame[#frame + 1] = n
  frame[#frame + 1] = ','
  for _, piece in ipairs(body or {string.sub(data, 2)}) do frame[#frame + 1] = piece end
  if batch then
    batch.frames = (batch.frames or 0) + 1
  else
    redis.call(publish, channel, table.concat(frame))
  end
  return id
end

local function publish_batch(channel, publish, batch)
  if batch.frames == 1 then
    redis.call(publish, channel, table.concat(batch, '', 2))
  elseif batch.frames then
    redis.call(publish, channel, table.concat(batch))
  end
end

local function check_fence(fence_key, fence)
  if redis.call('GET', fence_key) ~= fence then
    return redis.error_reply('STALE_FENCE')
  end
  return nil
end

local function fill(data, message_id)
  return (string.gsub(data, '\1', message_id))
end

-- A message event's data from its parts (app.chat.timeline.message_event_parts)
-- and the ids this script decided, and its frame's body for emit: the
-- parts are joined once, and the tail (the text) is not copied again.
local function message_event(head, id, parent, tail)
  local middle = '","parent_id":null'
  if parent ~= '' then middle = '","parent_id":"' .. parent .. '"' end
  return head .. id .. middle .. tail, {string.sub(head, 2), id, middle, tail}
end
"""

# Tree helpers, prepended to the scripts that write or read the message tree.
#
# A thread's messages form a tree by their parent links; the history stream
# stays one append-only entry per message, its field `parent` the parent's id
# ('' for a root). Entries written before trees existed have no `parent`
# field: they read as one line, each following the entry before it, with no
# migration. The indexes live in one hash, chat:{T}:tree, written in the same
# script as the message, so they can never disagree with the history:
#   c:<P>   ids of P's children, oldest first, comma-separated ('c:' = roots)
#   k:<M>   the chain M belongs to (named by the chain's first message)
#   t:<C>   chain C's tip (its newest message)
#   N:<C>   the newest message under chain C (its own and its forks')
#   u:<C>   the chain C forked from (absent for a root chain)
#   f:<C>   the forks of C, 'F:D,...': chain D starts under C's message F
#   legacy  the first message of the pre-tree line, if the thread has one
#   v       set once the thread's first linked message was written
# A chain is a path whose every message is its parent's first child, so its
# ids increase along it and its tip is its newest message. The newest leaf
# under M (a `switch`) is then: the tip of M's chain, or the newest message
# under a fork of that chain at or after M, whichever is newer. Reads cost
# a few HGETs, whatever the thread's size; a commit also updates N: of the
# chains it forks from, one HSET per level of forks above it.
_TREE = r"""
local function field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end

local function entry(history, id)
  return redis.call('XRANGE', history, id, id)[1]
end

local function parent_of(history, id, fields)
  local p = field(fields, 'parent')
  if p then return p end
  local prev = redis.call('XREVRANGE', history, '(' .. id, '-', 'COUNT', 1)[1]
  if prev then return prev[1] end
  return ''
end

-- The ids of P's children, comma-separated, or nil when it has none. A
-- message of the pre-tree line has the entry after it as its only child.
local function children_of(tree, history, p)
  local listed = redis.call('HGET', tree, 'c:' .. p)
  if listed then return listed end
  local nxt
  if p == '' then
    nxt = redis.call('XRANGE', history, '-', '+', 'COUNT', 1)[1]
  else
    nxt = redis.call('XRANGE', history, '(' .. p, '+', 'COUNT', 1)[1]
  end
  if nxt and not field(nxt[2], 'parent') then return nxt[1] end
  return nil
end

-- Whether id is a message of the thread: in its history, or archived (the
-- tree index keeps the chain of every message written with trees, and the
-- archiver gives one to every message it moves).
local function known(tree, history, id)
  return entry(history, id) ~= nil or redis.call('HEXISTS', tree, 'k:' .. id) == 1
end

local function chain_of(tree, id)
  return redis.call('HGET', tree, 'k:' .. id) or redis.call('HGET', tree, 'legacy')
end

local function id_less(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, bms = tonumber(ams), tonumber(bms)
  if ams ~= bms then return ams < bms end
  return tonumber(aseq) < tonumber(bseq)
end

local function active_leaf(meta, history)
  local leaf = redis.call('HGET', meta, 'leaf')
  if leaf then return leaf end
  local last = redis.call('XREVRANGE', history, '+', '-', 'COUNT', 1)[1]
  if last then return last[1] end
  return ''
end

-- Index message M (about to be added to history) under parent P ('' = root).
local function link(tree, history, m, p)
  if redis.call('HSETNX', tree, 'v', '1') == 1 then
    local last = redis.call('XREVRANGE', history, '+', '-', 'COUNT', 1)[1]
    if last and not field(last[2], 'parent') then
      local head = redis.call('XRANGE', history, '-', '+', 'COUNT', 1)[1][1]
      redis.call('HSET', tree, 'legacy', head, 't:' .. head, last[1], 'N:' .. head, last[1])
    end
  end
  local siblings = children_of(tree, history, p)
  local chain = nil
  if siblings then
    redis.call('HSET', tree, 'c:' .. p, siblings .. ',' .. m)
  else
    redis.call('HSET', tree, 'c:' .. p, m)
    if p ~= '' then chain = chain_of(tree, p) end
  end
  if not chain then
    chain = m
    if p ~= '' then
      local up = chain_of(tree, p)
      local forks = redis.call('HGET', tree, 'f:' .. up)
      redis.call('HSET', tree, 'u:' .. m, up,
        'f:' .. up, (forks and (forks .. ',') or '') .. p .. ':' .. m)
    end
  end
  redis.call('HSET', tree, 'k:' .. m, chain, 't:' .. chain, m)
  local c = chain
  while c do
    redis.call('HSET', tree, 'N:' .. c, m)
    c = redis.call('HGET', tree, 'u:' .. c)
  end
end

-- The newest leaf under M (M itself when it has no children).
local function newest_leaf(tree, history, m)
  local chain = chain_of(tree, m)
  if not chain then  -- a thread still all one line
    return redis.call('XREVRANGE', history, '+', '-', 'COUNT', 1)[1][1]
  end
  local best = redis.call('HGET', tree, 't:' .. chain)
  local forks = redis.call('HGET', tree, 'f:' .. chain) or ''
  for at, fork in string.gmatch(forks, '([%d-]+):([%d-]+)') do
    if not id_less(at, m) then
      local newest = redis.call('HGET', tree, 'N:' .. fork)
      if id_less(best, newest) then best = newest end
    end
  end
  return best
end

"""


# Inbox helpers (the user socket: docs/protocol.md "The user socket"),
# prepended after _TREE to the scripts that change what a member's thread
# summary shows. A thread's read markers and unread counts live in
# chat:{T}:reads (m:<U> the marker, u:<U> the unread count), its viewers in
# chat:{T}:roles (U -> 'viewer'; any other member is a 'member', the owner
# 'owner'). Both are named from the meta key passed in (same hash tag, so
# the same Cluster slot); app.chat.keys defines the same names, and
# tests/test_inbox.py checks they agree.
#
# notice(meta, history, u, leaf): the raw summary of the thread for member u,
#   as JSON (app.chat.inbox builds the wire summary from it). `leaf`, when
#   the caller just wrote the active leaf, is its entry ({id, fields}), so
#   that a reply is not read back (and hashed again by Lua) for its preview.
# count_new(meta, history, author, mid, linear): a message `mid` written by
#   `author` was committed. When it continues the active branch (`linear`),
#   every other member has one more unread (one HINCRBY each); otherwise the
#   active branch changed shape (an edit, a regenerate) and every member's
#   count is recounted on the new branch. The author's own marker moves to
#   their message: sending reads the thread.
# tell_members(meta, history, publish, users, leaf): every member's summary
#   (or `users`'; `leaf` as notice takes it), published on their inbox
#   channel chat:user:{U}:inbox, in the same step as the change.
#   Only with PUBLISH (one Redis): on a Cluster a user's channel lives on
#   the user's slot, which a script of the thread's slot cannot SPUBLISH to;
#   there the caller publishes the summaries INBOX_NOTICES returns.
_INBOX = r"""
local RECOUNT_LIMIT = 1000

local function sibling(meta, suffix)
  return string.sub(meta, 1, -5) .. suffix
end

-- At most n bytes of s, cut before a UTF-8 continuation byte, never inside
-- a character.
local function cut(s, n)
  if #s <= n then return s end
  local i = n
  while i > 0 do
    local b = string.byte(s, i + 1)
    if b < 128 or b >= 192 then break end
    i = i - 1
  end
  return string.sub(s, 1, i)
end

-- The active branch from its leaf back: {id, author} pairs, newest first.
local function branch_authors(meta, history, limit)
  local out = {}
  local cur = active_leaf(meta, history)
  while cur ~= '' and #out < limit do
    local e = entry(history, cur)
    if not e then break end
    out[#out + 1] = {e[1], field(e[2], 'user_id') or ''}
    cur = parent_of(history, e[1], e[2])
  end
  return out
end

local function unread_on(path, marker, u)
  local n = 0
  for _, item in ipairs(path) do
    if marker and not id_less(marker, item[1]) then break end
    if item[2] ~= u then n = n + 1 end
  end
  return n
end

local function recount(meta, history, users)
  local reads = sibling(meta, 'reads')
  local path = branch_authors(meta, history, RECOUNT_LIMIT)
  for _, u in ipairs(users) do
    local marker = redis.call('HGET', reads, 'm:' .. u)
    redis.call('HSET', reads, 'u:' .. u, unread_on(path, marker, u))
  end
end

local function count_new(meta, history, author, mid, linear)
  local reads = sibling(meta, 'reads')
  if author ~= '' then redis.call('HSET', reads, 'm:' .. author, mid, 'u:' .. author, 0) end
  local members = redis.call('SMEMBERS', sibling(meta, 'members'))
  if not linear then return recount(meta, history, members) end
  for _, u in ipairs(members) do
    if u ~= author then redis.call('HINCRBY', reads, 'u:' .. u, 1) end
  end
end

local function notice(meta, history, u, leaf)
  local m = redis.call('HMGET', meta, 'title', 'owner', 'created_at', 'updated_at',
    'prompt_policy', 'rev', 'input_tokens', 'output_tokens')
  local role = redis.call('HGET', sibling(meta, 'roles'), u)
  if not role then role = (m[2] == u) and 'owner' or 'member' end
  local out = {
    id = string.match(meta, '{(.*)}'), title = m[1] or '', owner = m[2] or '',
    role = role, created_at = tonumber(m[3] or '0'), updated_at = tonumber(m[4] or m[3] or '0'),
    rev = tonumber(m[6] or '0'),
    generating = redis.call('EXISTS', sibling(meta, 'turn')) == 1,
    unread = tonumber(redis.call('HGET', sibling(meta, 'reads'), 'u:' .. u) or '0'),
    usage = {input_tokens = tonumber(m[7] or '0'), output_tokens = tonumber(m[8] or '0')},
  }
  if m[5] then out.prompt_policy = m[5] end
  local e = leaf
  if not e then
    local id = active_leaf(meta, history)
    e = id ~= '' and entry(history, id)
  end
  if e then
    -- 800 bytes hold the 200 characters of a preview, whatever they are.
    out.last_message = {
      id = e[1], role = field(e[2], 'role'), user_id = field(e[2], 'user_id'),
      preview = cut(field(e[2], 'content') or '', 800),
      created_at = tonumber(field(e[2], 'created_at') or '0'),
    }
  end
  return cjson.encode(out)
end

local function inbox_channel(u)
  return 'chat:user:{' .. u .. '}:inbox'
end

local function tell_members(meta, history, publish, users, leaf)
  redis.call('HINCRBY', meta, 'rev', 1)
  if publish ~= 'PUBLISH' then return end
  for _, u in ipairs(users or redis.call('SMEMBERS', sibling(meta, 'members'))) do
    redis.call('PUBLISH', inbox_channel(u), notice(meta, history, u, leaf))
  end
end

-- The thread is gone for these users ('deleted', 'revoked' or 'left').
local function tell_removed(meta, publish, users, reason)
  if publish ~= 'PUBLISH' then return end
  local gone = cjson.encode({id = string.match(meta, '{(.*)}'), removed = reason})
  for _, u in ipairs(users) do redis.call('PUBLISH', inbox_channel(u), gone) end
end
"""

# ACQUIRE_LOCK: take a thread's turn lock and a new fencing number.
# KEYS[1] lock, KEYS[2] fence
# ARGV[1] owner token, ARGV[2] lease in ms
# Returns the fencing number (integer), or nil when another turn holds the lock.
# Atomic so that a grant and its number can never be separated: every grant
# gets a number larger than any earlier grant's, even one whose lease expired.
ACQUIRE_LOCK = r"""
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return false
"""

# RENEW_LOCK: extend the lease, only if we still own it.
# KEYS[1] lock; ARGV[1] owner token, ARGV[2] lease in ms
# Returns 1 if renewed, 0 if the lock is gone or someone else's.
RENEW_LOCK = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# RELEASE_LOCK: compare-and-delete, so a turn whose lease expired cannot
# delete the lock of the turn that took over.
# KEYS[1] lock; ARGV[1] owner token. Returns 1 if released, else 0.
RELEASE_LOCK = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# BEGIN_TURN: commit the user's message (or pick the one to answer again) and
# open the assistant's turn.
# KEYS[1] fence, [2] meta, [3] events, [4] live channel, [5] history, [6] dedup,
#     [7] turn, [8] tree, [9] queue, [10] context start
# ARGV[1] fencing number, [2] publish command (PUBLISH or SPUBLISH),
#     [3] event retention, [4] and [5] the user `message` event's head and
#     tail (app.chat.timeline.message_event_parts; '' for a regenerate),
#     [6] `loading` event JSON, [7] client_msg_id or '', [8] dedup TTL
#     seconds, [9] generation id, [10] pod id, [11] kind: 'prompt', 'queued'
#     (a queued prompt starts) or 'regenerate', [12] for a prompt its parent:
#     '' (follow the active leaf), '-' (a new root) or a message id; for a
#     regenerate the message to answer again, [13] the queued prompt's queue
#     id (it must be the queue's head); for a regenerate, the user message
#     the pod found it answers reading both tiers (used only where Redis no
#     longer holds the messages: archived); or '', [14] '1' when only a
#     member's turn may begin (authentication on), [15...] history entry
#     fields (name, value)*
# The turn record also keeps the user its tokens are charged to (the
# `user_id` among the entry fields; a regenerate passes just that field):
# whoever ends the turn, the reaper included, charges them.
# Returns {'ok', user_message_id, loading_event_id, context start or '',
#     the committed message's parent ('' for a root, a regenerate or a
#     retry), history version, archive watermark or '', member*} (also for
#     a retry of the same generation after a lost reply: nothing is written
#     twice): where the last turn's context started and who the members are
#     come with it, so the pod reads neither again; the parent, the version
#     (epoch/erasures: ERASE_AUTHOR moves it in the step that redacts) and
#     the watermark tell whether the pod's cached context still holds
#     (app.chat.contexts),
#     {'dup', original_event_id} (a prompt's message, a regenerate's loading),
#     {'orphan'} when a turn whose pod died is still open (its lease ran
#     out before the reaper closed it: the caller closes it first),
#     {'gone'} when the thread no longer exists (deleted, or its data lost
#     under an open socket): writing would resurrect a thread without owner,
#     {'not_found'} when the parent or the message to regenerate is not one
#     of this thread's, {'not_user'} when a regenerated reply answers no user
#     message, {'queue_first'} when prompts wait in the queue (a new prompt
#     must not overtake them), {'moved'} when a queued prompt is no longer
#     the queue's head (cancelled meanwhile), {'forbidden'} when its user
#     (the `user_id` field) is no longer a member: removed, or being erased,
#     after the caller checked (a removal is final for every later commit);
#     error STALE_FENCE when the lock was lost before the commit.
# Atomic: the message, its tree links, the active leaf, its dedup entry, its
# event, and the turn record exist together or not at all, so a crash can
# neither lose a message the sender saw nor leave a turn without its user
# message, and a queued prompt leaves the queue in the step that starts it,
# so it runs exactly once. A refusal writes nothing. The timeline is trimmed
# here, before the turn starts, so a running turn's events are never trimmed.
BEGIN_TURN = (
    _PRELUDE
    + _TREE
    + _INBOX
    + r"""
local stale = check_fence(KEYS[1], ARGV[1])
if stale then return stale end
if redis.call('HEXISTS', KEYS[2], 'epoch') == 0 then return {'gone'} end
local running = redis.call('HMGET', KEYS[7], 'generation_id', 'user_message_id', 'start_id')
local function begun(answered, lid, parent)
  local version = redis.call('HMGET', KEYS[2], 'epoch', 'erasures', 'archived')
  return {'ok', answered, lid, redis.call('GET', KEYS[10]) or '', parent,
    version[1] .. '/' .. (version[2] or '0'), version[3] or '',
    unpack(redis.call('SMEMBERS', sibling(KEYS[2], 'members')))}
end
if running[1] == ARGV[9] then return begun(running[2], running[3], '') end
local queued = ARGV[11] == 'queued'
if ARGV[7] ~= '' and not queued then
  local seen = redis.call('HGET', KEYS[6], ARGV[7])
  if seen then return {'dup', seen} end
end
if running[1] then return {'orphan'} end
if ARGV[14] == '1' then
  local author = ''
  for i = 15, #ARGV, 2 do
    if ARGV[i] == 'user_id' then author = ARGV[i + 1] end
  end
  if redis.call('SISMEMBER', sibling(KEYS[2], 'members'), author) == 0 then
    return {'forbidden'}
  end
end
if queued then
  local head = redis.call('XRANGE', KEYS[9], '-', '+', 'COUNT', 1)[1]
  if not head or head[1] ~= ARGV[13] then return {'moved'} end
elseif ARGV[11] == 'prompt' and redis.call('XLEN', KEYS[9]) > 0 then
  return {'queue_first'}
end
local retention = tonumber(ARGV[3])
local batch = {}
local answered
local first
local written  -- the user message's entry ({id, fields}), for the cards
local parent = ''  -- the committed message's parent
if ARGV[11] == 'regenerate' then
  local target = entry(KEYS[5], ARGV[12])
  local cold = ARGV[13] ~= '' and redis.call('HEXISTS', KEYS[8], 'k:' .. ARGV[13]) == 1
  if target then
    answered = target[1]
    if field(target[2], 'role') ~= 'user' then
      answered = parent_of(KEYS[5], target[1], target[2])
      local asked = answered ~= '' and entry(KEYS[5], answered)
      if asked then
        if field(asked[2], 'role') ~= 'user' then return {'not_user'} end
      elseif not (cold and answered == ARGV[13]) then
        return {'not_user'}
      end
    end
  elseif cold then
    answered = ARGV[13]
  else
    return {'not_found'}
  end
  first = emit(KEYS[2], KEYS[3], KEYS[4], ARGV[2], next_event_id(KEYS[2]), ARGV[6], retention,
    batch)
else
  parent = ARGV[12]
  local before = active_leaf(KEYS[2], KEYS[5])
  if parent == '' then
    parent = before
  elseif parent == '-' then
    parent = ''
  elseif not known(KEYS[8], KEYS[5], parent) then
    return {'not_found'}
  end
  answered = next_event_id(KEYS[2])
  link(KEYS[8], KEYS[5], answered, parent)
  local fields = {'parent', parent}
  for i = 15, #ARGV do fields[#fields + 1] = ARGV[i] end
  if queued then
    redis.call('XDEL', KEYS[9], ARGV[13])
    -- An empty stream stays a key: drop it, as an empty list would be.
    if redis.call('XLEN', KEYS[9]) == 0 then redis.call('DEL', KEYS[9]) end
  end
  redis.call('XADD', KEYS[5], answered, unpack(fields))
  written = {answered, fields}
  redis.call('HSET', KEYS[2], 'leaf', answered)
  count_new(KEYS[2], KEYS[5], field(fields, 'user_id') or '', answered, parent == before)
  local data, frame = message_event(ARGV[4], answered, parent, ARGV[5])
  emit(KEYS[2], KEYS[3], KEYS[4], ARGV[2], answered, data, retention, batch, frame)
  first = answered
  redis.call('HINCRBY', KEYS[2], 'message_count', 1)
  redis.call('HSET', KEYS[2], 'updated_at', string.match(answered, '^(%d+)'))
end
if ARGV[7] ~= '' and not queued then
  redis.call('HSET', KEYS[6], ARGV[7], first)
  redis.call('EXPIRE', KEYS[6], ARGV[8])
end
local lid = first
if ARGV[11] ~= 'regenerate' then
  lid = emit(KEYS[2], KEYS[3], KEYS[4], ARGV[2], next_event_id(KEYS[2]), ARGV[6], 0, batch)
end
publish_batch(KEYS[4], ARGV[2], batch)
redis.call('HSET', KEYS[7], 'generation_id', ARGV[9], 'fence', ARGV[1], 'pod', ARGV[10],
  'start_id', lid, 'user_message_id', answered)
for i = 15, #ARGV, 2 do
  if ARGV[i] == 'user_id' then redis.call('HSET', KEYS[7], 'user_id', ARGV[i + 1]) end
end
tell_members(KEYS[2], KEYS[5], ARGV[2], nil, written)
return begun(answered, lid, parent)
"""
)

# ENQUEUE_PROMPT: a prompt waits for the running turn (prompt_policy queue
# or interrupt): timeline event `queued`, and an entry in the thread's queue.
# KEYS[1] meta, [2] events, [3] live channel, [4] queue, [5] dedup, [6] lock,
#     [7] history, [8] tree
# ARGV[1] publish command, [2] event retention, [3] `queued` event JSON
#     (\1 = queue id), [4] client_msg_id or '', [5] dedup TTL seconds,
#     [6] most prompts queued, [7] parent as BEGIN_TURN takes it ('', '-' or a
#     message id), [8] '1' when only a member may queue (authentication on),
#     [9...] the queue entry's fields (name, value)*
# Returns {'queued', queue_id, running}: running is 0 when the thread is free
#     (the caller starts the queue's head); {'idle'} when the thread is free
#     and nothing waits (the caller begins the turn itself); {'dup', event_id}
#     for a client_msg_id seen before; {'full'}; {'not_found'} for a parent
#     not of this thread; {'gone'} when the thread no longer exists;
#     {'forbidden'} when the sender is no longer a member (as BEGIN_TURN).
# Atomic with the lock check: a prompt is queued only while a turn holds the
# thread, or behind prompts already waiting, and every end of a turn looks
# at the queue after freeing it, so no queued prompt is left without a turn
# to start it. The queue id is the `queued` event's id.
ENQUEUE_PROMPT = (
    _PRELUDE
    + r"""
if redis.call('HEXISTS', KEYS[1], 'epoch') == 0 then return {'gone'} end
if ARGV[4] ~= '' then
  local seen = redis.call('HGET', KEYS[5], ARGV[4])
  if seen then return {'dup', seen} end
end
if ARGV[8] == '1' then
  local sender = ''
  for i = 9, #ARGV, 2 do
    if ARGV[i] == 'user_id' then sender = ARGV[i + 1] end
  end
  local members = string.sub(KEYS[1], 1, -5) .. 'members'
  if redis.call('SISMEMBER', members, sender) == 0 then return {'forbidden'} end
end
local parent = ARGV[7]
if parent ~= '' and parent ~= '-' and not redis.call('XRANGE', KEYS[7], parent, parent)[1]
    and redis.call('HEXISTS', KEYS[8], 'k:' .. parent) == 0 then
  return {'not_found'}  -- neither in Redis nor archived (see known())
end
local running = redis.call('EXISTS', KEYS[6])
local waiting = redis.call('XLEN', KEYS[4])
if running == 0 and waiting == 0 then return {'idle'} end
if waiting >= tonumber(ARGV[6]) then return {'full'} end
local qid = next_event_id(KEYS[1])
local fields = {}
for i = 9, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[4], qid, 'parent', parent, unpack(fields))
emit(KEYS[1], KEYS[2], KEYS[3], ARGV[1], qid, fill(ARGV[3], qid), tonumber(ARGV[2]))
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[5], ARGV[4], qid)
  redis.call('EXPIRE', KEYS[5], ARGV[5])
end
return {'queued', qid, running}
"""
)

# UNQUEUE_PROMPT: take a waiting prompt out of the queue (a cancel).
# KEYS[1] meta, [2] events, [3] live channel, [4] queue
# ARGV[1] publish command, [2] event retention, [3] `unqueued` event JSON,
#     [4] queue id, [5] caller, [6] '1' when only its sender or the owner may
# Returns 'ok', 'not_found' (not waiting: started, cancelled, or never
#     queued) or 'forbidden'.
# Atomic with BEGIN_TURN's take of the head: a prompt is either cancelled or
# started, never both.
UNQUEUE_PROMPT = (
    _PRELUDE
    + r"""
local entry = redis.call('XRANGE', KEYS[4], ARGV[4], ARGV[4])[1]
if not entry then return 'not_found' end
if ARGV[6] == '1' then
  local sender
  for i = 1, #entry[2], 2 do
    if entry[2][i] == 'user_id' then sender = entry[2][i + 1] end
  end
  if ARGV[5] ~= sender and ARGV[5] ~= redis.call('HGET', KEYS[1], 'owner') then
    return 'forbidden'
  end
end
redis.call('XDEL', KEYS[4], ARGV[4])
if redis.call('XLEN', KEYS[4]) == 0 then redis.call('DEL', KEYS[4]) end
emit(KEYS[1], KEYS[2], KEYS[3], ARGV[1], next_event_id(KEYS[1]), ARGV[3], tonumber(ARGV[2]))
return 'ok'
"""
)

# APPEND_DELTA: coalesced deltas of the running turn, one or more (a model
# faster than the round trip leaves several ready at once: each is its own
# event, as it would have been alone, and they go in one call).
# KEYS[1] fence, [2] meta, [3] events, [4] live channel, [5] turn
# ARGV[1] fencing number, [2] publish command, [3] the first delta's seq,
#     [4...] the deltas' event JSON, in seq order
# Returns the turn's `cancel` field (a cancel was asked for) or nil; error
# STALE_FENCE when the lock was lost. Returning the cancel flag here lets the
# turn notice a cancel without a round trip of its own. A seq already
# appended is not appended again: a retry after a lost reply is harmless.
APPEND_DELTA = (
    _PRELUDE
    + r"""
local stale = check_fence(KEYS[1], ARGV[1])
if stale then return stale end
local turn = redis.call('HMGET', KEYS[5], 'seq', 'cancel')
local seen = tonumber(turn[1] or '-1')
local first = tonumber(ARGV[3])
local batch = {}
for i = 4, #ARGV do
  if first + i - 4 > seen then
    emit(KEYS[2], KEYS[3], KEYS[4], ARGV[2], next_event_id(KEYS[2]), ARGV[i], 0, batch)
  end
end
if #batch > 0 then
  redis.call('HSET', KEYS[5], 'seq', first + #ARGV - 4)
  publish_batch(KEYS[4], ARGV[2], batch)
end
return turn[2]
"""
)

# APPEND_ONCE: one timeline event of the running turn that must appear once
# (a tool_call, a tool_result).
# KEYS[1] fence, [2] meta, [3] events, [4] live channel, [5] turn
# ARGV[1] fencing number, [2] publish command, [3] event JSON, [4] its once-key
# Returns the turn's `cancel` field or nil, like APPEND_DELTA; error
# STALE_FENCE when the lock was lost. The once-key (say `tc:<call_id>`) is
# remembered in the turn record, so a retry after a lost reply appends
# nothing twice, and a call is never announced (nor run) twice.
APPEND_ONCE = (
    _PRELUDE
    + r"""
local stale = check_fence(KEYS[1], ARGV[1])
if stale then return stale end
if redis.call('HSETNX', KEYS[5], ARGV[4], '1') == 1 then
  emit(KEYS[2], KEYS[3], KEYS[4], ARGV[2], next_event_id(KEYS[2]), ARGV[3], 0)
end
return redis.call('HGET', KEYS[5], 'cancel')
"""
)

# END_TURN: commit the assistant's message, publish `done`, free the thread.
# KEYS[1] fence, [2] meta, [3] events, [4] live channel, [5] history, [6] turn,
#     [7] lock, [8] tree, [9] usage outbox, [10] queue
# ARGV[1] fencing number, [2] publish command, [3] event retention,
#     [4] and [5] the assistant `message` event's head and tail
#     (app.chat.timeline.message_event_parts), [6] `done` event JSON (\1 =
#     message id), [7] lock owner token, [8] generation id, [9] input tokens,
#     [10] output tokens, [11] UTC day number, [12] the seq of the first of
#     the turn's last deltas, [13] how many (k), [14...13+k] their event
#     JSON, [14+k...] history entry fields (name, value)*
# The turn's last deltas (the text still buffered when it ended) are
# appended first, as APPEND_DELTA would, so a turn that ends with text to
# publish costs one call, and its last events reach pods as one message.
# Returns {message id, prompts waiting in the queue, 1 when the thread has no
# title and none is being made (else 0), the usage outbox's (generation,
# charge)* pairs}: what the pod does next, so that it reads none of it
# again (a turn's end costs no queue, title or outbox read). Or nil when
# that generation's turn is already closed (a retry after a lost reply:
# nothing is written twice); error STALE_FENCE when another grant came since.
# The reply's parent is the user message the turn answers (from the turn
# record), and it becomes the thread's active leaf.
# Atomic: the final message, its tree links, `done`, the end of the turn
# record and the lock release happen together, so no client ever sees a
# thread that is free but whose reply is missing, or a reply committed twice
# (by a turn and the reaper).
# Usage: the thread's totals (in meta) are added here, with the reply. The
# user's daily counter lives on another Cluster slot, so it cannot be
# written in this script: the charge goes into the thread's usage outbox
# (generation -> "user day input output") in the same step, and is moved to
# the user's counter afterwards by an idempotent script (APPLY_USAGE); a
# charge whose pod died before moving it is moved by the reaper.
END_TURN = (
    _PRELUDE
    + _TREE
    + _INBOX
    + r"""
local stale = check_fence(KEYS[1], ARGV[1])
if stale then return stale end
local turn = redis.call('HMGET', KEYS[6], 'generation_id', 'user_message_id', 'user_id', 'seq')
if turn[1] ~= ARGV[8] then return false end
local parent = turn[2] or ''
local retention = tonumber(ARGV[3])
local batch = {}
local seen = tonumber(turn[4] or '-1')
local first, last = tonumber(ARGV[12]), 13 + tonumber(ARGV[13])
for i = 14, last do
  if first + i - 14 > seen then
    emit(KEYS[2], KEYS[3], KEYS[4], ARGV[2], next_event_id(KEYS[2]), ARGV[i], 0, batch)
  end
end
local mid = next_event_id(KEYS[2])
local before = active_leaf(KEYS[2], KEYS[5])
link(KEYS[8], KEYS[5], mid, parent)
local fields = {'parent', parent}
for i = last + 1, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HINCRBY', KEYS[2], 'input_tokens', ARGV[9])
redis.call('HINCRBY', KEYS[2], 'output_tokens', ARGV[10])
if turn[3] then
  local charge = turn[3] .. ' ' .. ARGV[11] .. ' ' .. ARGV[9] .. ' ' .. ARGV[10]
  redis.call('HSET', KEYS[9], ARGV[8], charge)
end
redis.call('XADD', KEYS[5], mid, unpack(fields))
redis.call('HSET', KEYS[2], 'leaf', mid)
count_new(KEYS[2], KEYS[5], '', mid, parent == before)
local data, frame = message_event(ARGV[4], mid, parent, ARGV[5])
emit(KEYS[2], KEYS[3], KEYS[4], ARGV[2], mid, data, 0, batch, frame)
emit(KEYS[2], KEYS[3], KEYS[4], ARGV[2], next_event_id(KEYS[2]), fill(ARGV[6], mid), 0, batch)
publish_batch(KEYS[4], ARGV[2], batch)
redis.call('DEL', KEYS[6])
if redis.call('GET', KEYS[7]) == ARGV[7] then redis.call('DEL', KEYS[7]) end
redis.call('XTRIM', KEYS[3], 'MAXLEN', '~', retention)
redis.call('HINCRBY', KEYS[2], 'message_count', 1)
redis.call('HSET', KEYS[2], 'updated_at', string.match(mid, '^(%d+)'))
tell_members(KEYS[2], KEYS[5], ARGV[2], nil, {mid, fields})
local titled = redis.call('HMGET', KEYS[2], 'title', 'titling')
local untitled = ((titled[1] or '') == '' and not titled[2]) and 1 or 0
return {mid, redis.call('XLEN', KEYS[10]), untitled, unpack(redis.call('HGETALL', KEYS[9]))}
"""
)

# SWITCH_BRANCH: make the newest leaf under a message the active leaf.
# KEYS[1] fence, [2] meta, [3] events, [4] live channel, [5] history, [6] tree,
#     [7] turn
# ARGV[1] fencing number, [2] publish command, [3] event retention,
#     [4] `branch` event JSON (\1 = the new leaf id), [5] the message id
# Returns {'ok', leaf_id, event_id}, {'not_found'} when the message is not
# one of this thread's, or {'busy'} when a turn is still open (one whose pod
# died, before the reaper closed it); error STALE_FENCE when the lock was lost.
# Runs under the thread's lock (like a turn) so the leaf never moves under
# a running turn, and the leaf and its `branch` event change together.
SWITCH_BRANCH = (
    _PRELUDE
    + _TREE
    + _INBOX
    + r"""
local stale = check_fence(KEYS[1], ARGV[1])
if stale then return stale end
if not known(KEYS[6], KEYS[5], ARGV[5]) then return {'not_found'} end
if redis.call('EXISTS', KEYS[7]) == 1 then return {'busy'} end
local leaf = newest_leaf(KEYS[6], KEYS[5], ARGV[5])
redis.call('HSET', KEYS[2], 'leaf', leaf)
recount(KEYS[2], KEYS[5], redis.call('SMEMBERS', sibling(KEYS[2], 'members')))
tell_members(KEYS[2], KEYS[5], ARGV[2])
local id = emit(KEYS[2], KEYS[3], KEYS[4], ARGV[2], next_event_id(KEYS[2]),
  fill(ARGV[4], leaf), tonumber(ARGV[3]))
return {'ok', leaf, id}
"""
)

# HISTORY_PATH: one page of the path from a leaf back towards the root.
# KEYS[1] history, [2] tree, [3] meta
# ARGV[1] where to start: 'leaf' (ARGV[2] a message id, or '' for the active
#     leaf) or 'before' (ARGV[2] a message id: start at its parent),
#     ARGV[3] how many messages at most, ARGV[4] a message id to stop at (it
#     included; '' for none: a model's context stops where the last one
#     started, and reads nothing older it would not use)
# Returns {'ok', has_more, {id, parent, siblings, {field, value...}}...},
# newest first, or {'not_found'} when the start is not a message of the
# thread. Read-only; one script so a page costs one round trip and a few
# lookups per message, however many messages and branches the thread has.
HISTORY_PATH = (
    _TREE
    + r"""
local cur = ARGV[2]
if ARGV[1] == 'before' then
  local from = entry(KEYS[1], cur)
  if not from then return {'not_found'} end
  cur = parent_of(KEYS[1], from[1], from[2])
elseif cur == '' then
  cur = active_leaf(KEYS[3], KEYS[1])
elseif not entry(KEYS[1], cur) then
  return {'not_found'}
end
local out = {'ok', 0}
local limit = tonumber(ARGV[3])
while cur ~= '' and #out - 2 < limit do
  local e = entry(KEYS[1], cur)
  if not e then break end
  local p = parent_of(KEYS[1], e[1], e[2])
  out[#out + 1] = {e[1], p, children_of(KEYS[2], KEYS[1], p) or e[1], e[2]}
  cur = p
  if e[1] == ARGV[4] then break end
end
if cur ~= '' then out[2] = 1 end
return out
"""
)

# LINK_LEGACY: give a thread written before trees the links it would have
# had, so that it can be archived (a trim would take away the entry before
# its oldest kept message, which is that message's only parent link).
# KEYS[1] history, [2] tree
# Returns 'linked' (done, or nothing to do) or 'mixed' when entries without
# a parent follow linked ones (written by old pods during the upgrade to
# trees): left as they are, and not archived.
# Every entry without `parent` gets the one reads already gave it (the entry
# before it, '' for the first), and the tree index the links it implied
# (k: its chain, the pre-tree line's first message; c: of its parent, its
# first child; the line's tip when no linked message was ever written),
# without `legacy`: every read answers as before, from stored links now.
# The history is rebuilt under the same ids (explicit-id XADDs on the
# emptied key; its last id is still the newest entry's, as history is never
# trimmed at its end), in one script so no reader sees it half rebuilt: once
# per thread, O(messages).
LINK_LEGACY = (
    _TREE
    + r"""
local entries = redis.call('XRANGE', KEYS[1], '-', '+')
local n = 0
for i, e in ipairs(entries) do
  if not field(e[2], 'parent') then
    if n < i - 1 then return 'mixed' end
    n = i
  end
end
if n == 0 then return 'linked' end
local head = entries[1][1]
local prev = ''
for i = 1, n do
  local id = entries[i][1]
  redis.call('HSETNX', KEYS[2], 'k:' .. id, head)
  redis.call('HSETNX', KEYS[2], 'c:' .. prev, id)
  prev = id
end
if redis.call('HSETNX', KEYS[2], 'v', '1') == 1 then
  redis.call('HSET', KEYS[2], 't:' .. head, prev, 'N:' .. head, prev)
end
redis.call('HDEL', KEYS[2], 'legacy')
redis.call('DEL', KEYS[1])
prev = ''
for i, e in ipairs(entries) do
  if i <= n then
    redis.call('XADD', KEYS[1], e[1], 'parent', prev, unpack(e[2]))
    prev = e[1]
  else
    redis.call('XADD', KEYS[1], e[1], unpack(e[2]))
  end
end
return 'linked'
"""
)

# ARCHIVE_TRIM: the archiver's last step for one thread, once PostgreSQL
# holds (committed, read back) every message older than the oldest one kept.
# KEYS[1] history, [2] events, [3] meta, [4] tree
# ARGV[1] the oldest message kept in Redis
# Returns 1, or 0 when the thread no longer exists (deleted while it was
# copied: the caller removes its rows).
# Trims the history and the timeline below ARGV[1] (exact: every id below it
# was copied, and stream ids only grow) and moves the thread's archive
# watermark, meta field `archived`, to it in the same step: Redis then holds
# no message below the watermark, and PostgreSQL every one, so a reader that
# gets the watermark with a page of history (HISTORY_SLICE) knows which of
# the messages it has not seen yet only the archive has.
ARCHIVE_TRIM = (
    _TREE
    + r"""
if redis.call('EXISTS', KEYS[3]) == 0 then return 0 end
redis.call('XTRIM', KEYS[1], 'MINID', ARGV[1])
redis.call('XTRIM', KEYS[2], 'MINID', ARGV[1])
local mark = redis.call('HGET', KEYS[3], 'archived')
if not mark or id_less(mark, ARGV[1]) then redis.call('HSET', KEYS[3], 'archived', ARGV[1]) end
return 1
"""
)

# HISTORY_SLICE: history entries in id order, with the archive watermark.
# KEYS[1] history, [2] meta
# ARGV[1] the id to start after ('' = from the first), ARGV[2] how many at most
# Returns {watermark or '', {id, {field, value...}}...}. One step, so the
# watermark tells exactly what the entries cannot include (see ARCHIVE_TRIM).
HISTORY_SLICE = r"""
local from = '-'
if ARGV[1] ~= '' then from = '(' .. ARGV[1] end
local out = {redis.call('HGET', KEYS[2], 'archived') or ''}
for _, e in ipairs(redis.call('XRANGE', KEYS[1], from, '+', 'COUNT', ARGV[2])) do
  out[#out + 1] = e
end
return out
"""

# ERASE_AUTHOR: take what user U wrote out of one thread (erasing U's data).
# KEYS[1] history, [2] events, [3] reads, [4] presence, [5] roles, [6] meta,
#     [7] turn
# ARGV[1] U, ARGV[2] publish command, ARGV[3...] ids of U's messages in the
#     archive (the model's replies to them may still be here)
# Returns {'ok', messages redacted here, titles cleared (0 or 1)}, or
#     {'busy', generation id} when a turn of U's, or one answering a message
#     of U's, is running: nothing is changed; the caller stops it and calls
#     again once it has ended (its reply is then committed, and redacted).
# U's messages, and the model's replies to them, keep their place in the
# tree (id, parent, role, status, usage) but lose their content, author,
# client_msg_id and tool calls. Stream entries cannot be edited, so the
# history is rebuilt under the same ids (explicit-id XADDs on the emptied
# key, then XSETID back to the last id it had generated); in one script, so
# no reader sees it half rebuilt. The timeline up to the newest redacted
# message is trimmed (its frames carried the text; a resume from before it
# gets the history instead, as after any trim), and U's `queued` events
# still in it (prompts that never ran) lose their author and content in a
# rebuild of the timeline like the history's (same ids and numbers n, so it
# stays contiguous; a trim could cut a running turn of someone else's, which
# may surround them). An auto-title made from one of U's prompts is cleared (the
# thread goes untitled; it is not titled again). U's read marker, unread
# count, role and presence entries go too. The busy check is in the same
# step as the redaction, so no reply made from U's text can be committed
# after it. O(messages and events held in Redis).
ERASE_AUTHOR = (
    _TREE
    + _INBOX
    + r"""
local function last_generated(stream)
  local info = redis.call('XINFO', 'STREAM', stream)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then return info[i + 1] end
  end
end

-- Write the stream's entries again under their own ids, some of them
-- replaced (id -> new fields), and its last id back as it was.
local function rebuild(stream, entries, replaced)
  local last = last_generated(stream)
  redis.call('DEL', stream)
  for _, e in ipairs(entries) do
    redis.call('XADD', stream, e[1], unpack(replaced[e[1]] or e[2]))
  end
  redis.call('XSETID', stream, last)
end

local u = ARGV[1]
local theirs = {}
for i = 3, #ARGV do theirs[ARGV[i]] = true end
local entries = redis.call('XRANGE', KEYS[1], '-', '+')
local doomed, count, newest = {}, 0, nil
for _, e in ipairs(entries) do
  local f = e[2]
  local author = field(f, 'user_id')
  if author == u then theirs[e[1]] = true end
  if author == u or (field(f, 'role') == 'assistant' and theirs[field(f, 'parent') or '']) then
    doomed[e[1]] = true
    count = count + 1
    newest = e[1]
  end
end
local running = redis.call('HMGET', KEYS[7], 'generation_id', 'user_id', 'user_message_id')
if running[1] and (running[2] == u or theirs[running[3] or '']) then
  return {'busy', running[1]}
end
if count > 0 then
  local replaced = {}
  for _, e in ipairs(entries) do
    if doomed[e[1]] then
      local f, kept = e[2], {}
      for i = 1, #f, 2 do
        local name = f[i]
        if name == 'content' or name == 'user_id' then
          kept[#kept + 1] = name
          kept[#kept + 1] = ''
        elseif name ~= 'client_msg_id' and name ~= 'tool_calls' then
          kept[#kept + 1] = name
          kept[#kept + 1] = f[i + 1]
        end
      end
      replaced[e[1]] = kept
    end
  end
  rebuild(KEYS[1], entries, replaced)
  local ms = tonumber(string.match(newest, '^(%d+)'))
  redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d-0', ms + 1))
end
local events = redis.call('XRANGE', KEYS[2], '-', '+')
local queued = nil
for _, e in ipairs(events) do
  local data = field(e[2], 'data') or ''
  if string.sub(data, 1, 16) == '{"type":"queued"' and cjson.decode(data).user_id == u then
    queued = queued or {}
    queued[e[1]] = {'n', field(e[2], 'n'), 'data',
      string.match(data, '^(.-"queue_id":"[^"]*")') .. ',"user_id":"","content":""}'}
  end
end
if queued then rebuild(KEYS[2], events, queued) end
local titled = 0
local from = redis.call('HGET', KEYS[6], 'title_from')
if from and theirs[from] then
  redis.call('HDEL', KEYS[6], 'title', 'title_from')
  tell_members(KEYS[6], KEYS[1], ARGV[2])
  titled = 1
end
-- Pods keep the model contexts of their threads (app.chat.contexts): a new
-- history version, in the step that redacts, makes them read it again.
if redis.call('EXISTS', KEYS[6]) == 1 then redis.call('HINCRBY', KEYS[6], 'erasures', 1) end
redis.call('HDEL', KEYS[3], 'm:' .. u, 'u:' .. u)
redis.call('HDEL', KEYS[5], u)
for _, member in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
  if string.sub(member, 1, #u + 1) == u .. '|' then redis.call('ZREM', KEYS[4], member) end
end
return {'ok', count, titled}
"""
)

# REQUEST_CANCEL: ask the running turn to stop, wherever it runs.
# KEYS[1] turn, KEYS[2] live channel
# ARGV[1] generation id or '' (any), ARGV[2] publish command, ARGV[3] control frame
# Returns the cancelled generation id, or nil when no matching turn runs.
# The flag in the turn record is the durable signal (the turn also reads it
# with each delta and each lease renewal); the control frame on the channel
# is the fast one. Setting both in one step means a turn cannot miss both.
REQUEST_CANCEL = r"""
local gen = redis.call('HGET', KEYS[1], 'generation_id')
if not gen or (ARGV[1] ~= '' and ARGV[1] ~= gen) then return false end
redis.call('HSET', KEYS[1], 'cancel', '1')
redis.call(ARGV[2], KEYS[2], ARGV[3])
return gen
"""

# _ENSURE (prepended after _TREE and _INBOX): a thread's creation on first use.
# ensure(meta, members, fence, epoch, user, now, title, publish) creates the
#     thread's metadata, owned by `user`, if it has none; returns 1 (just
#     created), 0 (it existed) or -1 (it was deleted recently: its fence is a
#     tombstone, see DELETE_THREAD; nothing is created). A new thread's card
#     goes to its owner's inbox (`publish`: see tell_members).
# The epoch is set exactly once per life of the thread's data: if Redis loses
# the thread, the next use draws a new epoch, and resumes from the old one fail
# loudly instead of silently skipping what was lost. A live thread's fence
# never has a TTL, so a TTL on it can only be a delete's tombstone.
_ENSURE = r"""
local function ensure(meta, members, fence, epoch, user, now, title, publish)
  if redis.call('HEXISTS', meta, 'epoch') == 0 and redis.call('PTTL', fence) > 0 then
    return -1
  end
  local created = redis.call('HSETNX', meta, 'epoch', epoch)
  if created == 1 then
    redis.call('HSET', meta, 'owner', user, 'created_at', now, 'updated_at', now)
    if title ~= '' then redis.call('HSET', meta, 'title', title) end
    redis.call('SADD', members, user)
    tell_members(meta, sibling(meta, 'history'), publish)
  end
  return created
end
"""

# ENSURE_THREAD: create a thread's metadata on first use (_ENSURE).
# KEYS[1] meta, KEYS[2] members, KEYS[3] fence
# ARGV[1] new epoch, ARGV[2] owner user id, ARGV[3] now (ms), ARGV[4] title or '',
#     ARGV[5] publish command
# Returns {epoch, owner, created}: created as ensure's (-1: nothing created).
ENSURE_THREAD = (
    _TREE
    + _INBOX
    + _ENSURE
    + r"""
local created = ensure(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
if created < 0 then return {'', '', -1} end
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'owner')
return {meta[1], meta[2] or '', created}
"""
)

# DELETE_THREAD: remove a thread and everything it holds, for good.
# KEYS[1] meta, [2] members, [3] fence, [4] live channel, [5...] every key
#     the thread holds but its fence (keys.all_thread_keys)
# ARGV[1] caller, ARGV[2] '1' when only the owner may delete, ARGV[3] publish
#     command, ARGV[4] control frame telling sockets the thread is gone,
#     ARGV[5] tombstone TTL in seconds
# Returns {'ok', owner, member...}, {'not_found'} or {'forbidden'}.
# Why the fence is bumped and kept (with a TTL) instead of deleted: a turn of
# this thread may still be running on some pod, and every write of a turn is
# fenced. Deleting the fence would make its check fail only until the id is
# used again: a new thread's first grant INCRs a fresh fence to 1, and a
# zombie turn holding fence 1 would then pass the check and write into a
# stranger's thread. Bumping it makes every in-flight write fail STALE_FENCE
# now; keeping it as a tombstone (ENSURE_THREAD refuses to recreate the id
# while it lives, BEGIN_TURN refuses a thread without meta) means no later
# grant can ever hand out that number again while such a turn could live.
# The tombstone expires, so in the end no key of the thread remains. The
# control frame closes every socket of the thread on every pod; it is sent in
# the same step so no socket can see a later event of a thread that is gone.
DELETE_THREAD = (
    _TREE
    + _INBOX
    + r"""
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'owner')
if not meta[1] then return {'not_found'} end
if ARGV[2] == '1' and meta[2] ~= ARGV[1] then return {'forbidden'} end
local members = redis.call('SMEMBERS', KEYS[2])
tell_removed(KEYS[1], ARGV[3], members, 'deleted')
redis.call('DEL', unpack(KEYS, 5))
redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], ARGV[5])
redis.call(ARGV[3], KEYS[4], ARGV[4])
return {'ok', meta[2] or '', unpack(members)}
"""
)

# UPDATE_THREAD: the owner sets thread settings (title, prompt_policy), or
# the model titles an untitled thread.
# KEYS[1] meta, KEYS[2] history; ARGV[1] caller, ARGV[2] '1' when only the
#     owner may, ARGV[3] publish command, ARGV[4] '1' for an auto-title: set
#     only while the thread has no title, ARGV[5...] (field, value)*
# Returns 'ok', 'not_found', 'forbidden', 'titled' (an auto-title came
# after a title: the owner's rename wins) or 'erased' (an auto-title whose
# prompt was erased meanwhile: ERASE_AUTHOR). Members' inboxes hear it.
# An auto-title keeps the prompt it was made from (`title_from`, the claim's
# `titling`), so erasing that prompt's author clears it; a rename drops it.
# In Lua so that an update racing a delete cannot recreate a meta hash
# without epoch or owner (a plain HSET would), so that an auto-title can
# never overwrite a rename made meanwhile, and so that one made from a
# prompt erased while the model worked is never set.
UPDATE_THREAD = (
    _TREE
    + _INBOX
    + r"""
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'owner', 'title')
if not meta[1] then return 'not_found' end
if ARGV[2] == '1' and meta[2] ~= ARGV[1] then return 'forbidden' end
if ARGV[4] == '1' and (meta[3] or '') ~= '' then return 'titled' end
local values = {}
for i = 5, #ARGV do values[#values + 1] = ARGV[i] end
if ARGV[4] == '1' then
  local from = redis.call('HGET', KEYS[1], 'titling')
  local prompt = from and entry(KEYS[2], from)
  if prompt then
    if (field(prompt[2], 'user_id') or '') == '' then return 'erased' end
    values[#values + 1] = 'title_from'
    values[#values + 1] = from
  end
elseif field(values, 'title') then
  redis.call('HDEL', KEYS[1], 'title_from')
end
redis.call('HSET', KEYS[1], unpack(values))
tell_members(KEYS[1], KEYS[2], ARGV[3])
return 'ok'
"""
)

# CHANGE_MEMBER: the owner adds or removes a member; a member may leave.
# KEYS[1] meta, KEYS[2] members, KEYS[3] live channel, KEYS[4] history,
#     KEYS[5] roles
# ARGV[1] caller, ARGV[2] '1' when only the owner may, ARGV[3] 'add' or
#     'remove', ARGV[4] the member, ARGV[5] max members, ARGV[6] publish
#     command, ARGV[7] control frame for a removal (closes the member's
#     sockets), ARGV[8] the role of an added member: 'member' or 'viewer'
#     (adding a member again changes their role)
# Every member's inbox hears an addition (the thread's card), the removed
# member's a removal (thread_removed).
# Returns 'ok', 'not_found', 'forbidden', 'full', or 'owner' (the owner
#     cannot be removed: delete the thread instead).
# In Lua for the same reason as UPDATE_THREAD (no SADD on a deleted thread),
# and so that the member limit holds under concurrent adds.
CHANGE_MEMBER = (
    _TREE
    + _INBOX
    + r"""
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'owner')
if not meta[1] then return 'not_found' end
local leaving = ARGV[3] == 'remove' and ARGV[4] == ARGV[1]
if ARGV[2] == '1' and meta[2] ~= ARGV[1] and not leaving then return 'forbidden' end
if ARGV[3] == 'add' then
  local known = redis.call('SISMEMBER', KEYS[2], ARGV[4]) == 1
  if not known and redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[5]) then
    return 'full'
  end
  if ARGV[4] == meta[2] then return 'owner' end
  redis.call('SADD', KEYS[2], ARGV[4])
  if ARGV[8] == 'viewer' then
    redis.call('HSET', KEYS[5], ARGV[4], 'viewer')
  else
    redis.call('HDEL', KEYS[5], ARGV[4])
  end
  if not known then recount(KEYS[1], KEYS[4], {ARGV[4]}) end
  tell_members(KEYS[1], KEYS[4], ARGV[6])
  return 'ok'
end
if ARGV[4] == meta[2] then return 'owner' end
if redis.call('SREM', KEYS[2], ARGV[4]) == 1 then
  redis.call('HDEL', KEYS[5], ARGV[4])
  redis.call('HDEL', sibling(KEYS[1], 'reads'), 'm:' .. ARGV[4], 'u:' .. ARGV[4])
  redis.call(ARGV[6], KEYS[3], ARGV[7])
  tell_removed(KEYS[1], ARGV[6], {ARGV[4]}, leaving and 'left' or 'revoked')
end
return 'ok'
"""
)

# READ_MARKER: a member read the thread up to a message.
# KEYS[1] meta, KEYS[2] history, KEYS[3] members
# ARGV[1] the member, ARGV[2] message id, ARGV[3] publish command,
#     ARGV[4] '1' when anyone may (auth off)
# Returns 'ok', 'not_found' (no such message) or 'forbidden' (not a member,
# or no such thread: which thread ids exist is no one's business).
# A marker only moves forward (a stale tab cannot unread a thread); the
# member's unread count is recounted on the active branch and every socket
# of theirs hears it, in the same step.
READ_MARKER = (
    _TREE
    + _INBOX
    + r"""
if redis.call('HEXISTS', KEYS[1], 'epoch') == 0 then return 'forbidden' end
if ARGV[4] ~= '1' and redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 0 then
  return 'forbidden'
end
if not entry(KEYS[2], ARGV[2]) then return 'not_found' end
local reads = sibling(KEYS[1], 'reads')
local marker = redis.call('HGET', reads, 'm:' .. ARGV[1])
if marker and not id_less(marker, ARGV[2]) then return 'ok' end
redis.call('HSET', reads, 'm:' .. ARGV[1], ARGV[2])
recount(KEYS[1], KEYS[2], {ARGV[1]})
tell_members(KEYS[1], KEYS[2], ARGV[3], {ARGV[1]})
return 'ok'
"""
)

# INBOX_SUMMARIES: a thread's summaries, read-only.
# KEYS[1] meta, KEYS[2] history, KEYS[3] members
# ARGV[1...] the users to summarise; none: every member
# Returns {user, summary JSON}* for the users who are members (a user socket's
# snapshot asks for one user, pipelined over the page's threads; on a
# Cluster, a change's caller publishes every member's on their channels).
INBOX_SUMMARIES = (
    _TREE
    + _INBOX
    + r"""
local out = {}
if redis.call('HEXISTS', KEYS[1], 'epoch') == 0 then return out end
local users = ARGV
if #users == 0 then users = redis.call('SMEMBERS', KEYS[3]) end
for _, u in ipairs(users) do
  if redis.call('SISMEMBER', KEYS[3], u) == 1 then
    out[#out + 1] = u
    out[#out + 1] = notice(KEYS[1], KEYS[2], u)
  end
end
return out
"""
)

# _PRESENCE: who has a socket on a thread, across pods.
# present(key, channel, lease, publish, nudge, add, entries): the thread's
#     presence (Sorted set: '<user>|<socket>' -> lease expiry in ms) after
#     adding (`add`) or removing `entries`; `nudge`, when not '', is a control
#     frame published on the thread's channel as the set may have changed
#     (every pod then reads it again, coalesced). Returns the entries present.
# The clock is Redis's, as for the socket leases: a crashed pod renews
# nothing, so its entries expire, and the next read (any pod's heartbeat)
# drops them.
_PRESENCE = r"""
local function present(key, channel, lease, publish, nudge, add, entries)
  local now = redis.call('TIME')
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', ms)
  for _, e in ipairs(entries) do
    if add then
      redis.call('ZADD', key, ms + tonumber(lease), e)
    else
      redis.call('ZREM', key, e)
    end
  end
  if #entries > 0 then redis.call('PEXPIRE', key, lease) end
  if nudge ~= '' then redis.call(publish, channel, nudge) end
  return redis.call('ZRANGE', key, 0, -1)
end
"""

# PRESENCE: change or read a thread's presence (_PRESENCE).
# KEYS[1] the thread's presence, KEYS[2] live channel
# ARGV[1] lease in ms, ARGV[2] publish command, ARGV[3] nudge frame or '',
#     ARGV[4] 'add' or 'remove', ARGV[5...] entries
# Returns the entries present after the change.
PRESENCE = (
    _PRESENCE
    + r"""
local entries = {}
for i = 5, #ARGV do entries[#entries + 1] = ARGV[i] end
return present(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4] == 'add', entries)
"""
)

# RENEW_PRESENCE: renew a pod's entries of many threads and read their sets.
# KEYS[1...] the threads' presence
# ARGV[1] lease in ms, then for each key in order: how many of its entries
#     follow, then the entries
# Returns each thread's present entries, in the order of KEYS. Many threads in
# one call (a pod's heartbeat: one call per tick, not one per thread) only
# with one Redis: on a Cluster a call holds the keys of one slot.
RENEW_PRESENCE = (
    _PRESENCE
    + r"""
local at, out = 2, {}
for i, key in ipairs(KEYS) do
  local count = tonumber(ARGV[at])
  local entries = {}
  for j = at + 1, at + count do entries[#entries + 1] = ARGV[j] end
  out[i] = present(key, '', ARGV[1], '', '', true, entries)
  at = at + count + 1
end
return out
"""
)

# _ADMIT: admit(sockets, erasing, socket, max, lease), ADMIT_SOCKET's step (below).
_ADMIT = r"""
local function admit(sockets, erasing, socket, max, lease)
  if redis.call('EXISTS', erasing) == 1 then return {-1, 0} end
  local now = redis.call('TIME')
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  redis.call('ZREMRANGEBYSCORE', sockets, '-inf', ms)
  if not redis.call('ZSCORE', sockets, socket)
      and redis.call('ZCARD', sockets) >= tonumber(max) then
    local oldest = redis.call('ZRANGE', sockets, 0, 0, 'WITHSCORES')
    return {0, math.max(1000, tonumber(oldest[2]) - ms)}
  end
  redis.call('ZADD', sockets, ms + tonumber(lease), socket)
  redis.call('PEXPIRE', sockets, lease)
  return {1, 0}
end
"""

# JOIN_THREAD: a socket's start on a thread, in one step (one round trip,
#     app.chat.joins): the thread's creation (_ENSURE) or its existence, the
#     caller's membership, everything `ready` and the catch-up need, and the
#     socket's presence entry (_PRESENCE).
# KEYS[1] meta, [2] members, [3] fence, [4] turn, [5] queue, [6] history,
#     [7] events, [8] presence, [9] live channel, [10...] with one Redis
#     only: the creator's lists a new thread joins (their thread list, and
#     owned threads when counted)
# ARGV[1] new epoch, [2] user, [3] now (ms), [4] publish command, [5] '1'
#     to create the thread if it is new ('0': report it absent), [6] '1'
#     when only members may join, [7] `after` or '', [8] the client's epoch
#     or '', [9] presence lease (ms), [10] presence entry, [11] nudge frame,
#     [12] with one Redis and a per-user socket limit: the socket's id, to
#     admit first as ADMIT_SOCKET does (KEYS[10] and [11] are then the
#     user's sockets and erasing marker, before the creator's lists), or '',
#     [13] max sockets, [14] socket lease (ms)
# Returns {'refused', admitted, retry_after_ms} (ADMIT_SOCKET's reply),
#     {'deleted'}, {'absent'}, {'forbidden'}, or {'ok', epoch, owner, created,
#     event_n, last_event_id or '', active leaf or '', turn record (flat
#     HGETALL), queue (XRANGE), recovered ('1', '0', or '' without `after`),
#     replay (XRANGE of the events to send before the live ones), present}.
# Why the creator's lists only with one Redis: on a Cluster they live on the
# user's slot, which a script of the thread's slot cannot touch; there
# app.chat.threads adds them after, as for ENSURE_THREAD. The replay is what
# the client misses: with `after` (same epoch, and nothing after it trimmed:
# its event is the newest, or the oldest kept is at or before it) the events
# after it; without, a running turn's events so far (a new client joining
# mid-reply sees the reply so far).
JOIN_THREAD = (
    _TREE
    + _INBOX
    + _ENSURE
    + _PRESENCE
    + _ADMIT
    + r"""
local lists = 10
if ARGV[12] ~= '' then
  lists = 12
  local admitted = admit(KEYS[10], KEYS[11], ARGV[12], ARGV[13], ARGV[14])
  if admitted[1] ~= 1 then return {'refused', admitted[1], admitted[2]} end
end
local created = 0
if ARGV[5] == '1' then
  created = ensure(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], '', ARGV[4])
  if created < 0 then return {'deleted'} end
elseif redis.call('HEXISTS', KEYS[1], 'epoch') == 0 then
  return {'absent'}
end
if created == 1 then
  local thread = string.match(KEYS[1], '{(.*)}')
  for i = lists, #KEYS do redis.call('ZADD', KEYS[i], ARGV[3], thread) end
elseif ARGV[6] == '1' and redis.call('SISMEMBER', KEYS[2], ARGV[2]) == 0 then
  return {'forbidden'}
end
local m = redis.call('HMGET', KEYS[1], 'epoch', 'event_n', 'last_event_id', 'owner')
local last, after = m[3], ARGV[7]
local turn = redis.call('HGETALL', KEYS[4])
local recovered, replay = '', {}
if after ~= '' then
  recovered = '0'
  if (ARGV[8] == '' or ARGV[8] == m[1]) and last and not id_less(last, after) then
    local covered = not id_less(after, last)
    if not covered then
      local oldest = redis.call('XRANGE', KEYS[7], '-', '+', 'COUNT', 1)[1]
      covered = oldest ~= nil and not id_less(after, oldest[1])
    end
    if covered then
      recovered = '1'
      replay = redis.call('XRANGE', KEYS[7], '(' .. after, '+')
    end
  end
elseif field(turn, 'generation_id') then
  replay = redis.call('XRANGE', KEYS[7], field(turn, 'start_id') or '0-0', '+')
end
local users = present(KEYS[8], KEYS[9], ARGV[9], ARGV[4], ARGV[11], true, {ARGV[10]})
local leaf = active_leaf(KEYS[1], KEYS[6])
local queue = redis.call('XRANGE', KEYS[5], '-', '+')
return {'ok', m[1], m[4] or '', created, m[2] or '0', last or '', leaf, turn, queue, recovered,
  replay, users}
"""
)

# CLAIM_TITLE: may this pod title the thread (app.chat.titles)?
# KEYS[1] meta, KEYS[2] history
# Returns the thread's first prompt, once per thread and only while it has
# no title, or nil (titled, claimed before, gone, no message yet, or the
# first prompt was erased).
# Claimed in the thread's meta (`titling`: the id of the prompt the title is
# made from), so one pod titles it, once: a failed title is not tried again
# by the next turn. A script so that a claim racing a delete cannot recreate
# a meta hash without epoch or owner.
CLAIM_TITLE = (
    _TREE
    + r"""
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'title', 'titling')
if not meta[1] or (meta[2] or '') ~= '' or meta[3] then return false end
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
if not first or field(first[2], 'role') ~= 'user' then return false end
if (field(first[2], 'content') or '') == '' then return false end
redis.call('HSET', KEYS[1], 'titling', first[1])
return field(first[2], 'content')
"""
)

# TAKE_TOKEN: one request against a token bucket shared by every pod.
# KEYS[1] the bucket (Hash: tokens, ts)
# ARGV[1] capacity (the burst), ARGV[2] refill in tokens per ms, ARGV[3] cost
# Returns {1, 0} when the request may go ahead, or {0, retry_after_ms}: how
#     long until enough tokens are back.
# Atomic so that two pods taking the last token at once cannot both get it.
# The clock is Redis's (TIME), never a pod's: pods' clocks drift, and every
# pod must agree on how full the bucket is. The bucket expires once it would
# be full again, so an idle user leaves no key behind.
TAKE_TOKEN = r"""
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or capacity
local ts = tonumber(state[2]) or ms
if ms > ts then
  tokens = math.min(capacity, tokens + (ms - ts) * rate)
  ts = ms
end
local allowed = 0
local retry = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  retry = math.ceil((cost - tokens) / rate)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'ts', string.format('%d', ts))
redis.call('PEXPIRE', KEYS[1], string.format('%d', math.ceil((capacity - tokens) / rate) + 1000))
return {allowed, retry}
"""

# ADMIT_SOCKET: count a user's open sockets across pods; admit one more if allowed.
# KEYS[1] the user's sockets (Sorted set: socket id -> lease expiry in ms),
#     KEYS[2] the user's erasing marker (app.chat.keys.user_erasing)
# ARGV[1] socket id, ARGV[2] max sockets, ARGV[3] lease in ms
# Returns {1, 0} when admitted, {0, retry_after_ms}: when the oldest lease
#     runs out (a crashed pod's socket stops counting then), or {-1, 0} while
#     the user's data is being erased (checked in the same step, so no socket
#     admitted after the erase began escapes its closing of every socket).
# Pods renew their sockets' leases (heartbeat) and remove them on close; a
# crashed pod does neither, so its sockets expire here instead of counting
# forever. Pruning, counting and adding are one step so concurrent opens on
# several pods cannot together exceed the limit. A socket already counted (a
# join run again) is admitted again. The same step (_ADMIT, above
# JOIN_THREAD) starts JOIN_THREAD with one Redis, so that a connect is one
# round trip there with auth on too.
ADMIT_SOCKET = (
    _ADMIT
    + r"""
return admit(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
"""
)

# RENEW_SOCKETS: extend the leases of this pod's sockets, of any number of users.
# KEYS[1...] the users' sockets
# ARGV[1] lease in ms, then for each key in order: how many of its sockets
#     follow, then their ids
# Returns the number of leases renewed. Sockets still open are put back even
# if a stall of this pod let them expire: they are open, so they count.
# Many users in one call (app.chat.limits: one call per pod tick, not one per
# user) only with one Redis: on a Cluster each user's key has its own slot,
# and a call holds the keys of one slot.
RENEW_SOCKETS = r"""
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local until_ms = ms + tonumber(ARGV[1])
local at, renewed = 2, 0
for _, key in ipairs(KEYS) do
  local count = tonumber(ARGV[at])
  for i = at + 1, at + count do redis.call('ZADD', key, until_ms, ARGV[i]) end
  redis.call('PEXPIRE', key, ARGV[1])
  at, renewed = at + count + 1, renewed + count
end
return renewed
"""

# RESERVE_THREAD: count a new thread against its creator's quota, before it exists.
# KEYS[1] the user's owned threads (Sorted set: thread id -> created ms),
#     KEYS[2] the user's erasing marker (app.chat.keys.user_erasing)
# ARGV[1] thread id, ARGV[2] max threads, ARGV[3] now (ms)
# Returns 1 when reserved (or already counted), 0 when the user owns the
# maximum, -1 while the user's data is being erased (the erase deletes every
# thread counted here before it ends, so none may be added meanwhile).
# A separate step from ENSURE_THREAD because on a Redis Cluster the user's
# keys and the thread's live on different shards. Reserving first means
# concurrent creations cannot pass the quota together; a reservation whose
# thread was not created (someone else created the id first, or the pod died
# in between) is released, or pruned when the quota is next full (see
# Threads._prune_owned for the one narrow race that pruning allows).
RESERVE_THREAD = r"""
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""

# RESERVE_BUDGET: may a user start one more turn today? If so, hold room for it.
# KEYS[1] the user's usage of the day (Hash: input_tokens, output_tokens,
#     g:<generation> markers), KEYS[2] the user's turns in flight (Hash:
#     generation -> "expiry_ms reserved_tokens")
# ARGV[1] daily limit, ARGV[2] generation id, ARGV[3] tokens to reserve,
#     ARGV[4] reservation lifetime in ms
# Returns {1, 0} (admitted, room held), {0, 0} (over the limit), or {0, 1}
#     (under it, but turns in flight may use what is left).
# Atomic across pods: the check and the reservation are one step, so
# concurrent prompts on several pods cannot all pass on the same remaining
# room. A turn is admitted while the user is under the limit and either no
# other of their turns runs or the room held for those and this one fits;
# so only one turn can ever carry a user over the line. Reservations expire
# (a pod that died holding one) and are dropped when the turn's usage is applied.
RESERVE_BUDGET = r"""
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local counts = redis.call('HMGET', KEYS[1], 'input_tokens', 'output_tokens')
local used = (tonumber(counts[1]) or 0) + (tonumber(counts[2]) or 0)
local limit = tonumber(ARGV[1])
if used >= limit then return {0, 0} end
local held = 0
local flights = redis.call('HGETALL', KEYS[2])
for i = 1, #flights, 2 do
  local expiry, tokens = string.match(flights[i + 1], '^(%d+) (%d+)$')
  if tonumber(expiry) <= ms then
    redis.call('HDEL', KEYS[2], flights[i])
  else
    held = held + tonumber(tokens)
  end
end
if held > 0 and used + held + tonumber(ARGV[3]) > limit then return {0, 1} end
local hold = string.format('%d %d', ms + tonumber(ARGV[4]), tonumber(ARGV[3]))
redis.call('HSET', KEYS[2], ARGV[2], hold)
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {1, 0}
"""

# APPLY_USAGE: add one turn's tokens to its user's day, once.
# KEYS[1] the user's usage of that day, KEYS[2] the user's turns in flight
# ARGV[1] generation id, [2] input tokens, [3] output tokens, [4] TTL seconds
# Returns 1 when applied now, 0 when it had been already.
# Idempotent (the g:<generation> marker), because it runs after END_TURN in
# a separate step and may run again: by the reaper for a pod that died
# between the two, or on a retry after a lost reply.
APPLY_USAGE = r"""
redis.call('HDEL', KEYS[2], ARGV[1])
if redis.call('HSETNX', KEYS[1], 'g:' .. ARGV[1], '1') == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'input_tokens', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'output_tokens', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'turns', 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

# LEADER_LEASE: take or keep a lease (the in-pod reaper's leadership).
# KEYS[1] lease key; ARGV[1] holder id, ARGV[2] lease in ms
# Returns 1 if the caller holds the lease now, else 0.
LEADER_LEASE = r"""
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


class Scripts:
    """The scripts above, registered on one client (EVALSHA, loaded on demand)."""

    def __init__(self, redis: RedisClient) -> None:
        self.acquire_lock: AsyncScript = redis.register_script(ACQUIRE_LOCK)
        self.renew_lock: AsyncScript = redis.register_script(RENEW_LOCK)
        self.release_lock: AsyncScript = redis.register_script(RELEASE_LOCK)
        self.begin_turn: AsyncScript = redis.register_script(BEGIN_TURN)
        self.append_delta: AsyncScript = redis.register_script(APPEND_DELTA)
        self.append_once: AsyncScript = redis.register_script(APPEND_ONCE)
        self.end_turn: AsyncScript = redis.register_script(END_TURN)
        self.switch_branch: AsyncScript = redis.register_script(SWITCH_BRANCH)
        self.enqueue_prompt: AsyncScript = redis.register_script(ENQUEUE_PROMPT)
        self.unqueue_prompt: AsyncScript = redis.register_script(UNQUEUE_PROMPT)
        self.history_path: AsyncScript = redis.register_script(HISTORY_PATH)
        self.erase_author: AsyncScript = redis.register_script(ERASE_AUTHOR)
        self.archive_trim: AsyncScript = redis.register_script(ARCHIVE_TRIM)
        self.link_legacy: AsyncScript = redis.register_script(LINK_LEGACY)
        self.history_slice: AsyncScript = redis.register_script(HISTORY_SLICE)
        self.request_cancel: AsyncScript = redis.register_script(REQUEST_CANCEL)
        self.ensure_thread: AsyncScript = redis.register_script(ENSURE_THREAD)
        self.join_thread: AsyncScript = redis.register_script(JOIN_THREAD)
        self.delete_thread: AsyncScript = redis.register_script(DELETE_THREAD)
        self.update_thread: AsyncScript = redis.register_script(UPDATE_THREAD)
        self.change_member: AsyncScript = redis.register_script(CHANGE_MEMBER)
        self.read_marker: AsyncScript = redis.register_script(READ_MARKER)
        self.inbox_summaries: AsyncScript = redis.register_script(INBOX_SUMMARIES)
        self.presence: AsyncScript = redis.register_script(PRESENCE)
        self.renew_presence: AsyncScript = redis.register_script(RENEW_PRESENCE)
        self.claim_title: AsyncScript = redis.register_script(CLAIM_TITLE)
        self.take_token: AsyncScript = redis.register_script(TAKE_TOKEN)
        self.admit_socket: AsyncScript = redis.register_script(ADMIT_SOCKET)
        self.renew_sockets: AsyncScript = redis.register_script(RENEW_SOCKETS)
        self.reserve_thread: AsyncScript = redis.register_script(RESERVE_THREAD)
        self.leader_lease: AsyncScript = redis.register_script(LEADER_LEASE)
        self.reserve_budget: AsyncScript = redis.register_script(RESERVE_BUDGET)
        self.apply_usage: AsyncScript = redis.register_script(APPLY_USAGE)


# Members (sockets, presence entries) renewed by one call of RENEW_SOCKETS or
# RENEW_PRESENCE: a pod's heartbeat is a few calls however many users or
# threads it serves, and no call holds Redis for long (about a millisecond
# per 1,000 members).
RENEW_BATCH = 2000


def renewals(
    lease_ms: int, groups: Sequence[tuple[str, Sequence[str]]], one_redis: bool
) -> list[tuple[list[str], list[str | int]]]:
    """The (keys, args) of the RENEW_SOCKETS or RENEW_PRESENCE calls that
    renew ``groups`` (a key and its members): with one Redis, as many keys
    per call as RENEW_BATCH members allow; on a Cluster, one key per call."""
    calls: list[tuple[list[str], list[str | int]]] = []
    batch_keys: list[str] = []
    batch_args: list[str | int] = [lease_ms]
    held = 0
    for key, members in groups:
        batch_keys.append(key)
        batch_args += [len(members), *members]
        held += len(members)
        if not one_redis or held >= RENEW_BATCH:
            calls.append((batch_keys, batch_args))
            batch_keys, batch_args, held = [], [lease_ms], 0
    if batch_keys:
        calls.append((batch_keys, batch_args))
    return calls


async def run_many(
    redis: RedisClient, script: AsyncScript, calls: Sequence[tuple[list[str], list[Any]]]
) -> list[Any]:
    """One script over many (keys, args) in one round trip: a pipeline on one
    Redis (it loads the script first if need be); on a Cluster, concurrent
    calls, since its pipelines cannot load a script on every node."""
    if isinstance(redis, Redis):
        async with redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                await script(keys=keys, args=args, client=pipe)
            return list(await pipe.execute())
    return list(await asyncio.gather(*(script(keys=k, args=a) for k, a in calls)))
