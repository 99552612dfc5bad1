-- The Redis side of jobs/state.py: one script per transition, each atomic. Every script gets
-- ARGV[1] = the job's key prefix, ARGV[2] = the lease in seconds, then its own arguments.
-- jobs/state.py prepends the `lib` section to each script; sections start with "-- @name".
-- Keys (prefix P): P.meta (hash: state, epoch, tiers, batch, seq:K, ...), P.units (hash: id ->
-- JSON record), P.stats (hash: counters), P.leases / P.retry / P.queued (sorted sets scored by
-- a deadline, a due time, a send time), P.wait:K (sorted set: sources in arrival order) with
-- P.waitn:K (hash: source -> rows) and P.wseq:K (arrival counter).
-- @lib
local P = ARGV[1]
local LEASE = tonumber(ARGV[2])
local FINALIZE = '__finalize__'

local function count(u, sign)
  redis.call('HINCRBY', P .. 'stats', u.tier .. ':' .. u.state .. ':u', sign)
  redis.call('HINCRBY', P .. 'stats', u.tier .. ':' .. u.state .. ':r', sign * u.rows)
  if u.state ~= 'done' then
    redis.call('HINCRBY', P .. 'stats', 'active:' .. u.tier, sign)
  end
end

local function move(u, state)
  count(u, -1)
  u.state = state
  count(u, 1)
end

local function get(uid)
  local raw = redis.call('HGET', P .. 'units', uid)
  if not raw then return nil end
  return cjson.decode(raw)
end

local function put(u)
  redis.call('HSET', P .. 'units', u.id, cjson.encode(u))
end

local function requeue(u, now, out)
  move(u, 'queued')
  put(u)
  redis.call('ZADD', P .. 'queued', now, u.id)
  table.insert(out.requeued, u)
end

local function take_finalize(now, out)
  out.finalize = true
  redis.call('ZADD', P .. 'leases', now + LEASE, FINALIZE)
end

local function stat(name)
  return tonumber(redis.call('HGET', P .. 'stats', name) or '0') or 0
end

-- Cut units lowest tier first where enough rows wait, or where nothing more can arrive; move the
-- job to finalizing when nothing is active or waiting on any tier.
local function advance(now, status)
  local out = {status = status, cuts = {}, finalize = false}
  if redis.call('HGET', P .. 'meta', 'state') ~= 'running' then return cjson.encode(out) end
  local tiers = tonumber(redis.call('HGET', P .. 'meta', 'tiers'))
  local batch = tonumber(redis.call('HGET', P .. 'meta', 'batch'))
  local epoch = redis.call('HGET', P .. 'meta', 'epoch')
  local open = false
  for k = 0, tiers - 1 do
    local w = stat('waitrows:' .. k)
    while w > 0 and (w >= batch or not open) do
      local sources, rows = {}, 0
      while rows < batch do
        local first = redis.call('ZRANGE', P .. 'wait:' .. k, 0, 0)
        if #first == 0 then break end
        local n = tonumber(redis.call('HGET', P .. 'waitn:' .. k, first[1]))
        redis.call('ZREM', P .. 'wait:' .. k, first[1])
        redis.call('HDEL', P .. 'waitn:' .. k, first[1])
        table.insert(sources, first[1])
        rows = rows + n
      end
      if rows == 0 then w = 0 break end
      w = w - rows
      local seq = redis.call('HINCRBY', P .. 'meta', 'seq:' .. k, 1)
      local uid = string.format('t%d-%s-%05d', k, epoch, seq)
      local u = {id = uid, tier = k, file = 'work/t' .. k .. '/' .. uid .. '.arrow', rows = rows,
                 state = 'cutting', sources = sources, attempts = 0, error = cjson.null,
                 worker = cjson.null}
      count(u, 1)
      put(u)
      redis.call('ZADD', P .. 'leases', now + LEASE, uid)
      table.insert(out.cuts, u)
    end
    redis.call('HSET', P .. 'stats', 'waitrows:' .. k, w)
    if w > 0 or stat('active:' .. k) > 0 then open = true end
  end
  if not open then
    redis.call('HSET', P .. 'meta', 'state', 'finalizing')
    redis.call('ZADD', P .. 'leases', now + LEASE, FINALIZE)
    out.finalize = true
  end
  return cjson.encode(out)
end
-- @start
-- ARGV: uid, worker, now
local uid, worker, now = ARGV[3], ARGV[4], tonumber(ARGV[5])
if redis.call('HGET', P .. 'meta', 'state') == 'cancelled' then
  return cjson.encode({verdict = 'cancelled'})
end
local u = get(uid)
if not u then return cjson.encode({verdict = 'unknown'}) end
if u.state == 'done' then return cjson.encode({verdict = 'done'}) end
if u.state == 'cutting' then return cjson.encode({verdict = 'busy'}) end
if u.state == 'running' then
  local deadline = tonumber(redis.call('ZSCORE', P .. 'leases', uid) or '0')
  if deadline > now then return cjson.encode({verdict = 'busy'}) end
end
move(u, 'running')
u.attempts = u.attempts + 1
u.worker = worker
put(u)
redis.call('ZADD', P .. 'leases', now + LEASE, uid)
redis.call('ZREM', P .. 'queued', uid)
redis.call('ZREM', P .. 'retry', uid)
return cjson.encode({verdict = 'run', unit = u})
-- @heartbeat
-- ARGV: uid, now
redis.call('ZADD', P .. 'leases', 'XX', tonumber(ARGV[4]) + LEASE, ARGV[3])
return nil
-- @fail
-- ARGV: uid, error, due
local u = get(ARGV[3])
if u and u.state == 'running' then
  move(u, 'retry')
  u.error = ARGV[4]
  put(u)
  redis.call('ZREM', P .. 'leases', u.id)
  redis.call('ZADD', P .. 'retry', tonumber(ARGV[5]), u.id)
end
return nil
-- @done
-- ARGV: uid, targets (JSON {tier: rows}), now
local uid, now = ARGV[3], tonumber(ARGV[5])
local u = get(uid)
if not u then return cjson.encode({status = 'unknown', cuts = {}, finalize = false}) end
if u.state == 'done' then return advance(now, 'duplicate') end
move(u, 'done')
u.error = cjson.null
put(u)
redis.call('ZREM', P .. 'leases', uid)
redis.call('ZREM', P .. 'retry', uid)
redis.call('ZREM', P .. 'queued', uid)
for k, n in pairs(cjson.decode(ARGV[4])) do
  n = tonumber(n)
  if n > 0 then
    local seq = redis.call('INCR', P .. 'wseq:' .. k)
    redis.call('ZADD', P .. 'wait:' .. k, seq, uid)
    redis.call('HSET', P .. 'waitn:' .. k, uid, n)
    redis.call('HINCRBY', P .. 'stats', 'waitrows:' .. k, n)
    redis.call('HINCRBY', P .. 'stats', 'escalated:' .. u.tier, n)
  end
end
return advance(now, 'done')
-- @advance
-- ARGV: now
return advance(tonumber(ARGV[3]), 'done')
-- @queued
-- ARGV: now, uid...
local now = tonumber(ARGV[3])
for i = 4, #ARGV do
  local u = get(ARGV[i])
  if u and u.state == 'cutting' then
    move(u, 'queued')
    put(u)
    redis.call('ZREM', P .. 'leases', u.id)
  end
  if u and u.state == 'queued' then
    redis.call('ZADD', P .. 'queued', now, u.id)
  end
end
return nil
-- @reap
-- ARGV: now, stale_after
local now, stale_after = tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {requeued = {}, cuts = {}, stale = {}, finalize = false}
for _, uid in ipairs(redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', now)) do
  if uid == FINALIZE then
    take_finalize(now, out)
  else
    local u = get(uid)
    if u and u.state == 'running' then
      redis.call('ZREM', P .. 'leases', uid)
      requeue(u, now, out)
    elseif u and u.state == 'cutting' then
      redis.call('ZADD', P .. 'leases', now + LEASE, uid)
      table.insert(out.cuts, u)
    else
      redis.call('ZREM', P .. 'leases', uid)
    end
  end
end
for _, uid in ipairs(redis.call('ZRANGEBYSCORE', P .. 'retry', '-inf', now)) do
  redis.call('ZREM', P .. 'retry', uid)
  if uid == FINALIZE then
    take_finalize(now, out)
  else
    local u = get(uid)
    if u and u.state == 'retry' then requeue(u, now, out) end
  end
end
for _, uid in ipairs(redis.call('ZRANGEBYSCORE', P .. 'queued', '-inf', now - stale_after, 'LIMIT', 0, 10000)) do
  local u = get(uid)
  if u then table.insert(out.stale, u) end
end
return cjson.encode(out)
-- @finalized
if redis.call('HEXISTS', P .. 'meta', 'job_id') == 0 then return nil end   -- state gone: the files say
redis.call('HSET', P .. 'meta', 'state', 'done')
redis.call('ZREM', P .. 'leases', FINALIZE)
return nil
-- @finalize_failed
-- ARGV: error, due
if redis.call('HEXISTS', P .. 'meta', 'job_id') == 0 then   -- state gone (Redis restarted):
  return cjson.encode({state = 'running'})                  -- the rebuild finalizes again
end
local attempts = redis.call('HINCRBY', P .. 'meta', 'finalize_attempts', 1)
redis.call('HSET', P .. 'meta', 'finalize_error', ARGV[3])
redis.call('ZREM', P .. 'leases', FINALIZE)
if attempts >= tonumber(redis.call('HGET', P .. 'meta', 'max_attempts')) then
  redis.call('HSET', P .. 'meta', 'state', 'failed')
else
  redis.call('ZADD', P .. 'retry', tonumber(ARGV[4]), FINALIZE)
end
return cjson.encode({state = redis.call('HGET', P .. 'meta', 'state')})
