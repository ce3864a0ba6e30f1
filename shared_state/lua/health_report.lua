-- health_report.lua: record one node's probe results and apply the state they imply.
-- Every write is fenced: it happens only while the caller holds the leader lease.
--
-- KEYS[1]  leader key ("<checker-id> <token>")
-- KEYS[2]  node hash
-- KEYS[3]  node id set
-- KEYS[4]  registry epoch
-- KEYS[5]  lease sorted set of the node
-- KEYS[6]  latency list of the node
-- KEYS[7]  ejected sorted set
-- KEYS[8]  event list (newest first, capped)
-- KEYS[9]  prefix block set of the node
-- ARGV[1]  checker id
-- ARGV[2]  fencing token
-- ARGV[3]  node id
-- ARGV[4]  probe result: "ok", "fail", or "none" (no liveness probe this time)
-- ARGV[5]  fall: consecutive failures that make an active node unhealthy
-- ARGV[6]  rise: consecutive successes that make an unhealthy node active again
-- ARGV[7]  deregister after, ms unhealthy (0: never)
-- ARGV[8]  reason: what the probe saw
-- ARGV[9]  models, encoded "\nm1\nm2\n" ("" leaves them as they are)
-- ARGV[10] KV-cache use 0..1 ("" when not scraped)
-- ARGV[11] requests running on the node (scraped)
-- ARGV[12] requests waiting on the node (scraped)
-- ARGV[13] events kept
--
-- Returns {status, state, changed}: status "ok", "fenced" (the caller does not lead),
-- "gone" (no such node) or "removed" (deregistered now); changed 1 when the state moved.
--
-- Invariants: draining is left to operators (never changed here); a transition bumps the
-- epoch so every replica stops or resumes routing at once, and is logged with its reason. A
-- node back from unhealthy, or deregistered, has no prefix blocks left: an engine that failed
-- its probes that long has usually restarted, with an empty cache.
local id, token, node = ARGV[1], ARGV[2], ARGV[3]
local result = ARGV[4]
local fall, rise = tonumber(ARGV[5]), tonumber(ARGV[6])
local deregister_ms = tonumber(ARGV[7])
local reason = ARGV[8]
local keep = tonumber(ARGV[13])

if not leads(KEYS[1], id, token) then
  return {'fenced', '', 0}
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  return {'gone', '', 0}
end
local now = now_ms()
local state = redis.call('HGET', KEYS[2], 'state') or 'active'

local function log_event(from, to, why)
  redis.call('LPUSH', KEYS[8], cjson.encode({
    t_ms = now, node = node, from = from, to = to, reason = why, by = id,
  }))
  redis.call('LTRIM', KEYS[8], 0, keep - 1)
end

local function move(to, why)
  redis.call('HSET', KEYS[2], 'state', to, 'state_reason', why, 'state_since_ms', now)
  redis.call('INCR', KEYS[4])
  log_event(state, to, why)
  state = to
end

local changed = 0
if result == 'ok' then
  redis.call('HSET', KEYS[2], 'probe_failures', 0, 'last_probe_ms', now, 'probe_detail', reason)
  local oks = redis.call('HINCRBY', KEYS[2], 'probe_successes', 1)
  if state == 'unhealthy' and oks >= rise then
    move('active', 'recovered: ' .. oks .. ' probes passed')
    redis.call('DEL', KEYS[9])
    changed = 1
  end
elseif result == 'fail' then
  redis.call('HSET', KEYS[2], 'probe_successes', 0, 'last_probe_ms', now, 'probe_detail', reason)
  local fails = redis.call('HINCRBY', KEYS[2], 'probe_failures', 1)
  if state == 'active' and fails >= fall then
    move('unhealthy', reason)
    changed = 1
  end
end

if state == 'unhealthy' and deregister_ms > 0 then
  local since = tonumber(redis.call('HGET', KEYS[2], 'state_since_ms') or now)
  if now - since >= deregister_ms then
    redis.call('INCR', KEYS[4])  -- first: refused out of memory, the node stays whole
    redis.call('SREM', KEYS[3], node)
    redis.call('DEL', KEYS[2], KEYS[5], KEYS[6], KEYS[9])
    redis.call('ZREM', KEYS[7], node)
    log_event(state, 'removed', 'unhealthy for ' .. (now - since) .. ' ms')
    return {'removed', 'removed', 1}
  end
end

if ARGV[9] ~= '' and redis.call('HGET', KEYS[2], 'models') ~= ARGV[9] then
  redis.call('HSET', KEYS[2], 'models', ARGV[9])
  redis.call('INCR', KEYS[4])
  log_event(state, state, 'models changed')
end
if ARGV[10] ~= '' then
  redis.call('HSET', KEYS[2], 'kv_usage', ARGV[10], 'kv_running', ARGV[11],
    'kv_waiting', ARGV[12], 'kv_ts', now)
end
return {'ok', state, changed}
