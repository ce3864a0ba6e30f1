-- pd_expire.lua: take the prefill sessions whose owner stopped renewing them.
--
-- KEYS[1]  PD session records (hash)
-- KEYS[2]  PD session deadlines (sorted set)
-- ARGV[1]  at most this many sessions
--
-- Returns {session id, record, ...}: the caller now owns them and frees them on their
-- prefill nodes. A session is taken by one caller only.
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. now, 'LIMIT', 0, tonumber(ARGV[1]))
local out = {}
for i = 1, #due do
  local record = redis.call('HGET', KEYS[1], due[i])
  if record then
    take_session(KEYS[1], KEYS[2], due[i], record, out)
  else
    redis.call('ZREM', KEYS[2], due[i])
  end
end
return out
