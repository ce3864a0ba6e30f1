-- node_upsert.lua: register a node or update its fields, and bump the registry epoch.
--
-- KEYS[1]  node id set
-- KEYS[2]  node hash
-- KEYS[3]  registry epoch
-- ARGV[1]  node id
-- ARGV[2]  1 to create the node if missing, 0 to fail with "unknown node"
-- ARGV[3..] field, value pairs to set (an empty value deletes the field)
--
-- Returns {created (0/1), epoch}. Runtime fields (failures, ejection, totals) are kept.
local id = ARGV[1]
local create = ARGV[2] == '1'
local exists = redis.call('EXISTS', KEYS[2]) == 1
if not exists and not create then
  return redis.error_reply('unknown node ' .. id)
end
local now = now_ms()
if not exists then
  redis.call('HSET', KEYS[2], 'id', id, 'added_ms', now, 'state', 'active', 'state_since_ms', now)
end
for i = 3, #ARGV, 2 do
  local field, value = ARGV[i], ARGV[i + 1]
  if value == '' then
    redis.call('HDEL', KEYS[2], field)
  else
    if field == 'state' and redis.call('HGET', KEYS[2], 'state') ~= value then
      redis.call('HSET', KEYS[2], 'state_since_ms', now)
    end
    redis.call('HSET', KEYS[2], field, value)
  end
end
redis.call('HSET', KEYS[2], 'updated_ms', now)
redis.call('SADD', KEYS[1], id)
local epoch = redis.call('INCR', KEYS[3])
if exists then return {0, epoch} end
return {1, epoch}
