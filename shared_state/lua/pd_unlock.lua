-- pd_unlock.lua: give up a pair's connect lock after a failed connect, if still held.
--
-- KEYS[1]  the pair's connect lock
-- ARGV[1]  lock token
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
