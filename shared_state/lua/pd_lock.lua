-- pd_lock.lua: take a pair's connect lock, unless the pair is connected already.
--
-- KEYS[1]  connected pairs (hash)
-- KEYS[2]  the pair's connect lock
-- ARGV[1]  "prefill decode"
-- ARGV[2]  lock token
-- ARGV[3]  lock time, ms
--
-- Returns 1 when the pair is connected, 2 when this caller now holds the lock and must connect
-- it, 0 when another process holds the lock (wait for it). One script, so a pair marked
-- connected between a check and a lock can never be connected twice.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  return 1
end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', tonumber(ARGV[3])) then
  return 2
end
return 0
