-- key_revoke.lua: remove the client API key with a given name, and bump the epoch.
--
-- KEYS[1]  API key hash: hex digest -> JSON {"name", "created_ms"}
-- KEYS[2]  registry epoch
-- ARGV[1]  key name
--
-- Returns the number of keys removed (0 or 1); revoking an unknown name changes nothing.
local digest = key_named(KEYS[1], ARGV[1])
if not digest then
  return 0
end
redis.call('HDEL', KEYS[1], digest)
redis.call('INCR', KEYS[2])
return 1
