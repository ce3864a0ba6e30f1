-- pd_open.lua: give a request a fleet-wide unique prefill session id and record the session.
--
-- KEYS[1]  session id counter
-- KEYS[2]  PD session records (hash: session id -> "prefill decode replica", space-separated)
-- KEYS[3]  PD session deadlines (sorted set: session id scored by deadline, ms)
-- ARGV[1]  prefill node id
-- ARGV[2]  replica id
-- ARGV[3]  lease time, ms
--
-- Returns the new session id. The decode field is "-" until a decode node takes the session.
local sid = redis.call('INCR', KEYS[1])
local now = now_ms()
redis.call('HSET', KEYS[2], sid, ARGV[1] .. ' - ' .. ARGV[2])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), sid)
return sid
