-- response_lookup.lua: the node that holds a stored response, if it was recorded within its
-- lifetime.
--
-- KEYS[1]  response map hash (as response_record.lua)
-- KEYS[2]  response times sorted set
-- ARGV[1]  response id
-- ARGV[2]  lifetime, ms
--
-- Returns "<node id>\n<model>", or "" when unknown or older than the lifetime.
local at = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not at or tonumber(at) < now_ms() - tonumber(ARGV[2]) then
  return ''
end
return redis.call('HGET', KEYS[1], ARGV[1]) or ''
