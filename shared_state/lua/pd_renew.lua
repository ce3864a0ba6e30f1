-- pd_renew.lua: extend the deadlines of the prefill sessions one replica is working on.
--
-- KEYS[1]  PD session deadlines (sorted set)
-- ARGV[1]  lease time, ms
-- ARGV[2..] session ids
--
-- Returns the number of sessions renewed; a session already closed is not brought back.
local now = now_ms()
local deadline = now + tonumber(ARGV[1])
local renewed = 0
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], deadline, ARGV[i])
    renewed = renewed + 1
  end
end
return renewed
