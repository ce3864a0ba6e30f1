-- key_limit.lua: admit one request of a client API key under its per-key limits, atomically.
--
-- KEYS[1]  rate state of the key (string): GCRA theoretical arrival time, ms (float)
-- KEYS[2]  concurrency leases of the key (sorted set): member scored by lease deadline, ms
-- ARGV[1]  lease member "<replica>:<request-id>:<nonce>"
-- ARGV[2]  requests per minute (0: no rate limit; KEYS[1] is then not touched)
-- ARGV[3]  concurrent requests (0: no concurrency limit; KEYS[2] is then not touched)
-- ARGV[4]  lease time, ms (a lease is never renewed: a longer request stops counting)
--
-- Returns {allowed, limit, retry_after_ms, in_flight, leased}:
--   allowed         1 admitted (counted against both limits), 0 refused (nothing counted);
--   limit           "" when admitted, else the limit that refused: "rpm" or "concurrency"
--                   (rpm when both refuse: it is the longer wait);
--   retry_after_ms  when a retry may succeed, ms (0 when admitted);
--   in_flight       unexpired leases of the key after the call (0 without a concurrency limit);
--   leased          1 when ARGV[1] now holds a concurrency slot, to be freed by
--                   key_limit_release.lua when the request ends.
--
-- Rate: GCRA, a bucket of `rpm` requests refilled continuously at `rpm` per minute. Each
-- admitted request moves the arrival time by 60000/rpm ms; a request is admitted while the
-- arrival time stays within 60 s of now. So a key may burst `rpm` requests, then one every
-- 60/rpm s; `retry_after_ms` is when the next one fits. The state is one number whose key
-- expires once the bucket is full again.
--
-- Invariant: a member holds at most one slot (a retried call renews it and is not counted
-- again); expired leases are pruned before counting, so a crashed replica's requests stop
-- counting after the lease time. Time comes from TIME only.
local member = ARGV[1]
local rpm = tonumber(ARGV[2])
local concurrency = tonumber(ARGV[3])
local lease_ms = tonumber(ARGV[4])

local now = now_ms()
local period = 60000

local in_flight = 0
local conc_wait = 0
if concurrency > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. now)
  if redis.call('ZSCORE', KEYS[2], member) then
    -- The same request asked twice: keep its one slot, count nothing again.
    redis.call('ZADD', KEYS[2], now + lease_ms, member)
    redis.call('PEXPIRE', KEYS[2], lease_ms)
    return {1, '', 0, redis.call('ZCARD', KEYS[2]), 1}
  end
  in_flight = redis.call('ZCARD', KEYS[2])
  if in_flight >= concurrency then
    -- A slot frees whenever one of the key's requests ends, which cannot be foreseen: a
    -- second, or sooner if the earliest lease expires before that.
    local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    conc_wait = math.min(1000, math.max(1, tonumber(first[2]) - now + 1))
  end
end

local tat = nil
local rate_wait = 0
if rpm > 0 then
  local interval = period / rpm
  tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
  if tat < now then tat = now end
  tat = tat + interval
  -- The small tolerance keeps float rounding from refusing the rpm-th request of a burst.
  if tat - now > period + 0.001 then
    rate_wait = math.max(1, math.ceil(tat - now - period))
  end
end

if rate_wait > 0 then
  return {0, 'rpm', math.max(rate_wait, conc_wait), in_flight, 0}
end
if conc_wait > 0 then
  return {0, 'concurrency', conc_wait, in_flight, 0}
end

if tat then
  redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1)
end
local leased = 0
if concurrency > 0 then
  redis.call('ZADD', KEYS[2], now + lease_ms, member)
  redis.call('PEXPIRE', KEYS[2], lease_ms)
  in_flight = in_flight + 1
  leased = 1
end
return {1, '', 0, in_flight, leased}
