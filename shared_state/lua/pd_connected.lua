-- pd_connected.lua: record a pair as connected and give up its connect lock.
--
-- KEYS[1]  connected pairs (hash: "prefill decode" -> ms connected)
-- KEYS[2]  the pair's connect lock ("<token>")
-- ARGV[1]  "prefill decode"
-- ARGV[2]  lock token
--
-- Returns 1, or 0 when the lock is no longer this caller's (it expired and another process
-- took it): the pair is then left to that process, which connects it again.
if redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], now_ms())
redis.call('DEL', KEYS[2])
return 1
