-- node_remove.lua: remove a node with its leases, history, ejection and prefix blocks, and bump
-- the epoch.
--
-- KEYS[1]  node id set
-- KEYS[2]  node hash
-- KEYS[3]  lease sorted set of the node
-- KEYS[4]  latency list of the node
-- KEYS[5]  ejected sorted set
-- KEYS[6]  registry epoch
-- KEYS[7]  prefix block set of the node
-- ARGV[1]  node id
--
-- Returns {removed (0/1), epoch}; removing an unknown node changes nothing.
-- Invariant: the epoch is bumped first. A Redis out of memory refuses INCR but not the
-- deletions, so a refusal then leaves the node in place rather than removed behind the
-- replicas' cached views with an error said to the caller.
local id = ARGV[1]
if redis.call('EXISTS', KEYS[2]) == 0 and redis.call('SISMEMBER', KEYS[1], id) == 0 then
  return {0, tonumber(redis.call('GET', KEYS[6]) or '0')}
end
local epoch = redis.call('INCR', KEYS[6])
redis.call('SREM', KEYS[1], id)
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[7])
redis.call('ZREM', KEYS[5], id)
return {1, epoch}
