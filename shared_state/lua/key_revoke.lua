-- key_revoke.lua: remove the client API key with a given name, and bump the epoch.
--
-- KEYS[1]  API key hash: hex digest -> JSON {"name", "created_ms"}
-- KEYS[2]  registry epoch
-- KEYS[3]  keys-required marker (see key_add.lua)
-- ARGV[1]  key name
--
-- Returns the number of keys removed (0 or 1); revoking an unknown name changes nothing.
-- Invariant: a revocation leaves the marker set (also for keys stored before the marker
-- existed), so the OpenAI API stays closed when the last key goes. The writes that a Redis
-- out of memory refuses come before the deletion, so a refused revocation changed nothing.
local name = ARGV[1]
local digest = key_named(KEYS[1], name)
if not digest then
  return 0
end
redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[3], now_ms(), 'NX')
redis.call('HDEL', KEYS[1], digest)
return 1
