-- release.lua: end a lease; record the request's outcome only if the lease was still held.
--
-- KEYS[1]  node hash
-- KEYS[2]  lease sorted set of the node
-- KEYS[3]  latency list of the node (newest first)
-- KEYS[4]  ejected sorted set (node id scored by ejected-until, ms)
-- KEYS[5]  prefix block set of the node (needed only when ARGV[10] > 0)
-- ARGV[1]  lease member "<replica>:<request-id>"
-- ARGV[2]  outcome: "ok", "fail" or "neutral" (client error, cancel: no sample)
-- ARGV[3]  latency, ms (of a good answer: divided by the requests in flight when it was picked)
-- ARGV[4]  latency window, samples kept
-- ARGV[5]  failure penalty, ms: a failure is recorded as at least this slow
-- ARGV[6]  consecutive failures that eject the node
-- ARGV[7]  first ejection time, ms (doubles per ejection)
-- ARGV[8]  longest ejection time, ms
-- ARGV[9]  pool size: active nodes sharing a model with this one, itself included
-- ARGV[10] k: blocks of the request's chain the node's answer said it did not hold (0: none)
-- ARGV[11..10+k] their hashes, removed from the node's prefix block set
-- ARGV[11+k..] ids of the other nodes of the pool (sent with failures only)
--
-- Returns {released, consecutive_failures, ejected_until_ms, ejected_now}: released 0 means
-- the lease had already expired or been released, and nothing was recorded (releases are
-- idempotent); ejected_now 1 means this failure ejected the node (ejected_until_ms > 0 alone
-- may be an ejection another failure already made, which must not be counted again).
--
-- Invariant: never more than half of a pool is ejected at once; a failure never lowers a
-- node's observed latency. Forgetting blocks is about the engine's cache, not the lease: it is
-- done even when the lease is gone, and is idempotent.
local member = ARGV[1]
local outcome = ARGV[2]
local latency_ms = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local penalty_ms = tonumber(ARGV[5])
local threshold = tonumber(ARGV[6])
local base_ms = tonumber(ARGV[7])
local max_ms = tonumber(ARGV[8])
local pool = tonumber(ARGV[9])
local forget = tonumber(ARGV[10] or '0')
local others = 11 + forget

if forget > 0 then
  -- In batches: a Lua call takes a bounded number of arguments.
  for first = 11, 10 + forget, 256 do
    redis.call('ZREM', KEYS[5], unpack(ARGV, first, math.min(first + 255, 10 + forget)))
  end
end

local now = now_ms()
local deadline = redis.call('ZSCORE', KEYS[2], member)
if not deadline then
  return {0, 0, 0, 0}
end
redis.call('ZREM', KEYS[2], member)
if tonumber(deadline) < now then
  -- Expired: the request already stopped counting, so its outcome is not recorded either.
  return {0, 0, 0, 0}
end
if outcome == 'neutral' or redis.call('EXISTS', KEYS[1]) == 0 then
  return {1, 0, 0, 0}
end

if outcome == 'ok' then
  redis.call('LPUSH', KEYS[3], latency_ms)
  redis.call('LTRIM', KEYS[3], 0, window - 1)
  redis.call('HINCRBY', KEYS[1], 'ok_total', 1)
  redis.call('HSET', KEYS[1], 'consecutive_failures', 0)
  return {1, 0, 0, 0}
end

if latency_ms < penalty_ms then latency_ms = penalty_ms end
redis.call('LPUSH', KEYS[3], latency_ms)
redis.call('LTRIM', KEYS[3], 0, window - 1)
redis.call('HINCRBY', KEYS[1], 'fail_total', 1)
local fails = redis.call('HINCRBY', KEYS[1], 'consecutive_failures', 1)
if fails < threshold then
  return {1, fails, 0, 0}
end

local f = redis.call('HMGET', KEYS[1], 'id', 'ejected_until', 'eject_count')
local until_ms = tonumber(f[2]) or 0
if until_ms > now then
  return {1, fails, until_ms, 0}
end
local ejected_now = 1
for i = others, #ARGV do
  local score = redis.call('ZSCORE', KEYS[4], ARGV[i])
  if score and tonumber(score) > now then ejected_now = ejected_now + 1 end
end
if ejected_now * 2 > pool then
  redis.call('HINCRBY', KEYS[1], 'eject_capped_total', 1)
  return {1, fails, 0, 0}
end
local count = tonumber(f[3]) or 0
-- The backoff forgets a node that stayed healthy for a whole longest-ejection time.
if until_ms > 0 and now - until_ms > max_ms then count = 0 end
local span = base_ms * 2 ^ count
if span > max_ms then span = max_ms end
until_ms = now + span
redis.call('HSET', KEYS[1], 'ejected_until', until_ms, 'eject_count', count + 1)
redis.call('HINCRBY', KEYS[1], 'eject_total', 1)
redis.call('ZADD', KEYS[4], until_ms, f[1])
-- After its backoff the node starts again from the prior instead of its failure samples.
redis.call('DEL', KEYS[3])
return {1, fails, until_ms, 1}
