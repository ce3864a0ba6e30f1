-- key_add.lua: add a client API key, stored only as its SHA-256 digest, and bump the epoch.
--
-- KEYS[1]  API key hash: hex digest -> JSON {"name", "created_ms"}
-- KEYS[2]  registry epoch (replicas refresh their key cache when it moves)
-- ARGV[1]  hex SHA-256 digest of the key
-- ARGV[2]  key name (unique)
--
-- Returns {status, epoch}: "added"; "exists" when this very key is already stored under this
-- name (adding is idempotent); "name_taken" when the name belongs to another key.
local digest, name = ARGV[1], ARGV[2]
local current = redis.call('HGET', KEYS[1], digest)
if current then
  if cjson.decode(current).name == name then
    return {'exists', tonumber(redis.call('GET', KEYS[2]) or '0')}
  end
  return {'name_taken', 0}
end
local all = redis.call('HVALS', KEYS[1])
for _, raw in ipairs(all) do
  if cjson.decode(raw).name == name then
    return {'name_taken', 0}
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], digest, cjson.encode({name = name, created_ms = now}))
return {'added', redis.call('INCR', KEYS[2])}
