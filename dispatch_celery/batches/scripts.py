"""The Lua scripts of ``batches.state``, each with its KEYS / ARGV contract.

Every step of a batch's life that touches more than one key is one of these scripts, so
it is atomic in Redis (see ``state``'s docstring for the life of a batch). Kept apart from
the Python that calls them: ``state`` registers them on its client and passes the keys.
"""

from __future__ import annotations

# The inflight HASH value: "<compressed> <raw>" bytes; a plain number (earlier versions,
# uncompressed blobs) counts as both.
LUA_SIZES = """
local function sizes(v)
  local comp, raw = string.match(v, '^(%d+) (%d+)$')
  if comp then return tonumber(comp), tonumber(raw) end
  return tonumber(v) or 0, tonumber(v) or 0
end
local function release(inflight, bytes, raw_bytes, id)
  local v = redis.call('HGET', inflight, id)
  if not v then return 0 end
  redis.call('HDEL', inflight, id)
  local comp, raw = sizes(v)
  if redis.call('DECRBY', bytes, comp) < 0 then redis.call('SET', bytes, 0) end
  if redis.call('DECRBY', raw_bytes, raw) < 0 then redis.call('SET', raw_bytes, 0) end
  return 1
end
"""

# KEYS: 1 blob, 2 staged, 3 inflight, 4 bytes, 5 raw bytes, 6 done, 7 state, 8 lease, 9 due,
#       10 tickets, 11 parked, 12 stats, 13 stream (or '')
# ARGV: 1 batch id, 2 group (or ''), 3 xack-failed counter name, 4 enqueued counter name,
#       5.. entry ids
# Returns {was in flight (0/1), XACK error ('' when fine)}. Entries this XACK acknowledges
# were not yet counted as enqueued (the worker finished before the bridge confirmed the
# task it had published): they are counted here, so every published entry counts once.
FINISH = (
    LUA_SIZES
    + """
redis.call('DEL', KEYS[1], KEYS[6], KEYS[7], KEYS[8])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[10], ARGV[1])
redis.call('ZREM', KEYS[9], ARGV[1])
redis.call('ZREM', KEYS[11], ARGV[1])
local was = release(KEYS[3], KEYS[4], KEYS[5], ARGV[1])
local err = ''
if KEYS[13] ~= '' and ARGV[2] ~= '' and #ARGV > 4 then
  local ok, res = pcall(redis.call, 'XACK', KEYS[13], ARGV[2], unpack(ARGV, 5))
  if not ok then
    redis.call('HINCRBY', KEYS[12], ARGV[3], 1)
    err = type(res) == 'table' and tostring(res.err) or tostring(res)
  elseif res > 0 then
    redis.call('HINCRBY', KEYS[12], ARGV[4], res)
  end
end
return {was, err}
"""
)

# KEYS: 1 blob, 2 due, 3 inflight, 4 bytes, 5 raw bytes, 6 staged, 7 tickets, 8 state,
#       9 done, 10 parked, 11 lease, 12 stats
# ARGV: 1 batch id, 2 blobs-lost counter name
# Drops a batch whose blob vanished while it is still indexed; 0 when it is not lost (it
# finished meanwhile, or the blob is there after all).
DROP_LOST = (
    LUA_SIZES
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[10], ARGV[1])
redis.call('HDEL', KEYS[6], ARGV[1])
redis.call('HDEL', KEYS[7], ARGV[1])
redis.call('DEL', KEYS[8], KEYS[9], KEYS[11])
release(KEYS[3], KEYS[4], KEYS[5], ARGV[1])
redis.call('HINCRBY', KEYS[12], ARGV[2], 1)
return 1
"""
)

# KEYS: 1 due, 2 tickets, 3 parked.  ARGV: 1 now, 2 lease (s), 3 limit, 4 token seed.
# Takes (re-stamps) up to ``limit`` due batches and gives each a new ticket: one claimer
# per batch. Returns {id1, token1, id2, token2, ...}.
CLAIM_DUE = """
local now = tonumber(ARGV[1])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for i, id in ipairs(ids) do
  local token = ARGV[4] .. '.' .. i
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id)
  redis.call('HSET', KEYS[2], id, token)
  redis.call('ZREM', KEYS[3], id)
  out[#out + 1] = id
  out[#out + 1] = token
end
return out
"""

# KEYS: 1 staged, 2 due, 3 stats, 4 stream (or ''), 5 tickets, 6 state.
# ARGV: 1 batch id, 2 due time, 3 group (or ''), 4 enqueued counter name, 5.. entry ids
# The broker accepted the batch's task: XACK (counting the entries acknowledged now, so a
# re-publish is not counted twice), unstage, and move the due time to the queue lease, but
# only while the batch is still in flight (ZADD XX: a finished batch stays finished) and
# no worker began this very task yet: a fast worker can begin it (and reschedule a retry,
# or park it at a closed gate) before the bridge confirms, and then the due time is the
# worker's (``begin`` marks the ticket it began as ``begun``); moving it to the queue lease
# delayed that retry by the whole lease (300 s by default).
CONFIRM = """
if KEYS[4] ~= '' and ARGV[3] ~= '' and #ARGV > 4 then
  local n = redis.call('XACK', KEYS[4], ARGV[3], unpack(ARGV, 5))
  if n > 0 then redis.call('HINCRBY', KEYS[3], ARGV[4], n) end
end
redis.call('HDEL', KEYS[1], ARGV[1])
local ticket = redis.call('HGET', KEYS[5], ARGV[1])
if not ticket or redis.call('HGET', KEYS[6], 'begun') ~= ticket then
  redis.call('ZADD', KEYS[2], 'XX', tonumber(ARGV[2]), ARGV[1])
end
return 1
"""

# KEYS: 1 blob, 2 tickets, 3 lease, 4 state, 5 due, 6 done, 7 gate, 8 gate probe,
#       9 pause, 10 pause probe, 11 parked
# ARGV: 1 batch id, 2 token ('' for a task of an earlier version), 3 now, 4 lease ms,
#       5 probe interval ms
# Returns {status, blob, done ids, state, gate-or-pause fields}; see ``BatchStore.begin``.
BEGIN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
local ticket = redis.call('HGET', KEYS[2], ARGV[1])
if ticket and ticket ~= ARGV[2] then return {'stale'} end
local now = tonumber(ARGV[3])
if not redis.call('SET', KEYS[3], ARGV[2] == '' and '-' or ARGV[2], 'NX', 'PX', ARGV[4]) then
  -- a copy runs; if it dies, the batch is due right after its lease (not a queue lease later)
  local left = redis.call('PTTL', KEYS[3])
  if left > 0 then redis.call('ZADD', KEYS[5], 'XX', now + left / 1000 + 1, ARGV[1]) end
  return {'busy'}
end
-- from here on the due time is this attempt's: a confirm still to come leaves it alone
if ARGV[2] ~= '' then redis.call('HSET', KEYS[4], 'begun', ARGV[2]) end
local mode = 'run'
if redis.call('EXISTS', KEYS[9]) == 1 then
  if redis.call('SET', KEYS[10], '1', 'NX', 'PX', ARGV[5]) then
    mode = 'probe-paused'
  else
    return {'paused', false, {}, redis.call('HGETALL', KEYS[4]), redis.call('HGETALL', KEYS[9])}
  end
else
  local gate = redis.call('HGETALL', KEYS[7])
  if #gate > 0 then
    local untilv = tonumber(redis.call('HGET', KEYS[7], 'until') or '0')
    if untilv > now or not redis.call('SET', KEYS[8], '1', 'NX', 'PX', ARGV[4]) then
      return {'gated', false, {}, redis.call('HGETALL', KEYS[4]), gate}
    end
    mode = 'probe'
  end
end
redis.call('ZREM', KEYS[11], ARGV[1])
local crashed = 0
if redis.call('HGET', KEYS[4], 'open') then
  redis.call('HINCRBY', KEYS[4], 'crashes', 1)
  crashed = 1
end
redis.call('HSET', KEYS[4], 'open', '1')
redis.call('HINCRBY', KEYS[4], 'attempts', 1)
redis.call('HINCRBY', KEYS[4], 'total', 1)
redis.call('ZADD', KEYS[5], now + tonumber(ARGV[4]) / 1000 + 1, ARGV[1])
return {mode, redis.call('GET', KEYS[1]), redis.call('SMEMBERS', KEYS[6]),
        redis.call('HGETALL', KEYS[4]), {}, crashed}
"""

# KEYS: 1 inflight, 2 due.  ARGV: 1 due time, 2.. batch ids.
# Indexes the ids that are in flight and not in the due index; returns how many.
INDEX = """
local n = 0
for i = 2, #ARGV do
  local id = ARGV[i]
  if redis.call('HEXISTS', KEYS[1], id) == 1 and not redis.call('ZSCORE', KEYS[2], id) then
    redis.call('ZADD', KEYS[2], tonumber(ARGV[1]), id)
    n = n + 1
  end
end
return n
"""

# KEYS: 1 due, 2 parked.  ARGV: 1 now, 2 spread (s), 3 limit.
# Wakes parked batches: due now .. now + spread, in parking order. Returns how many.
WAKE = """
local ids = redis.call('ZRANGE', KEYS[2], 0, tonumber(ARGV[3]) - 1)
local now, spread = tonumber(ARGV[1]), tonumber(ARGV[2])
for i, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], 'XX', now + spread * (i - 1) / #ids, id)
  redis.call('ZREM', KEYS[2], id)
end
return #ids
"""

# KEYS: 1 gate, 2 gate probe.  ARGV: 1 now, 2 delay (s), 3 reason, 4 force (probe failed)
# Closes the outage gate for ``delay`` unless another attempt closed it already (a
# closed gate is not extended by the attempts that were in flight when it closed).
# Returns {until, delay, 1 when this call closed it}.
CLOSE_GATE = """
local now = tonumber(ARGV[1])
local untilv = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
if untilv > now and ARGV[4] ~= '1' then
  return {tostring(untilv), redis.call('HGET', KEYS[1], 'delay') or '0', 0}
end
untilv = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'until', tostring(untilv), 'delay', ARGV[2], 'reason', ARGV[3],
           'since', redis.call('HGET', KEYS[1], 'since') or tostring(now))
redis.call('DEL', KEYS[2])
return {tostring(untilv), ARGV[2], 1}
"""
