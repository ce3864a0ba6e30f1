-- pd_shelve.lua: hand a prefill session to a decode node, and say whether the pair is connected.
--
-- KEYS[1]  PD session records (hash)
-- KEYS[2]  PD session deadlines (sorted set)
-- KEYS[3]  connected pairs (hash: "prefill decode" -> ms connected)
-- ARGV[1]  session id
-- ARGV[2]  decode node id
-- ARGV[3]  lease time, ms
--
-- Returns -1 when the session is gone (freed by a sweep or a node removal), else 1 when the
-- pair is connected and 0 when it is not.
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record then
  return -1
end
local prefill, _, replica = string.match(record, '^(%S+) (%S+) (%S+)$')
redis.call('HSET', KEYS[1], ARGV[1], prefill .. ' ' .. ARGV[2] .. ' ' .. replica)
local now = now_ms()
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
if redis.call('HEXISTS', KEYS[3], prefill .. ' ' .. ARGV[2]) == 1 then
  return 1
end
return 0
