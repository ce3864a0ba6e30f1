-- key_open.lua: open the OpenAI API to callers without a key, on purpose: remove the
-- keys-required marker, only when no client key is stored, and bump the epoch.
--
-- KEYS[1]  API key hash: hex digest -> JSON {"name", "created_ms", ...}
-- KEYS[2]  registry epoch
-- KEYS[3]  keys-required marker (see key_add.lua)
--
-- Returns {status, stored keys}: "opened" (the marker was removed), "already_open" (there
-- was none), "keys_stored" (keys are stored: nothing changed, revoke them first).
local stored = redis.call('HLEN', KEYS[1])
if stored > 0 then
  return {'keys_stored', stored}
end
if redis.call('EXISTS', KEYS[3]) == 0 then
  return {'already_open', 0}
end
-- The epoch first: out of memory it is refused, and the marker must then stay.
redis.call('INCR', KEYS[2])
redis.call('DEL', KEYS[3])
return {'opened', 0}
