-- key_revoke.lua: remove the client API key with a given name, and bump the epoch.
--
-- KEYS[1]  API key hash: hex digest -> JSON {"name", "created_ms"}
-- KEYS[2]  registry epoch
-- ARGV[1]  key name
--
-- Returns the number of keys removed (0 or 1); revoking an unknown name changes nothing.
local name = ARGV[1]
local entries = redis.call('HGETALL', KEYS[1])
local removed = 0
for i = 1, #entries, 2 do
  if cjson.decode(entries[i + 1]).name == name then
    redis.call('HDEL', KEYS[1], entries[i])
    removed = removed + 1
  end
end
if removed > 0 then
  redis.call('INCR', KEYS[2])
end
return removed
