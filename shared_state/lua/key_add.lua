-- key_add.lua: add a client API key, stored only as its SHA-256 digest, and bump the epoch;
-- also sets the per-key limits and admission settings of a new or stored key.
--
-- KEYS[1]  API key hash: hex digest -> JSON {"name", "created_ms", "rpm"?, "concurrency"?,
--          "priority"?, "max_priority"?, "share"?} (an absent limit means unlimited; an
--          absent priority "normal", max_priority uncapped, share 1)
-- KEYS[2]  registry epoch (replicas refresh their key cache when it moves)
-- KEYS[3]  keys-required marker: set (ms) once any key is stored, so that revoking the last
--          key never opens the OpenAI API; only key_open.lua removes it
-- ARGV[1]  hex SHA-256 digest of the key ("set" mode: "" finds the key by its name)
-- ARGV[2]  key name (unique)
-- ARGV[3]  requests per minute: "" (or absent) leaves it as it is, "0" removes it, N sets it
-- ARGV[4]  concurrent requests: the same
-- ARGV[5]  "add" (default) or "set": only change the settings of the stored key, never add one
-- ARGV[6]  priority of its requests that ask for none: "" (or absent) leaves it as it is,
--          "high" or "low" sets it, "normal" (the default) removes it
-- ARGV[7]  highest priority its requests may ask for: "" leaves it, "high", "normal" or
--          "low" sets it, "any" removes the cap
-- ARGV[8]  its weight in the fair share, a whole number: "" leaves it, "1" (the default)
--          removes it, N sets it
--
-- The caller validates the values; a setting equal to its default is stored as absent.
--
-- Returns {status, epoch, digest, entry}, entry being the stored JSON after the call ("" when
-- nothing is stored for this call): "added"; "exists" when this very key is already stored
-- under this name with these settings (adding is idempotent); "updated" when its limits or
-- admission settings changed; "name_taken" when the name belongs to another key; "unknown"
-- ("set" only) when no such key is stored under this name. The epoch moves only when
-- something changed. Whenever a key is stored after the call, the keys-required marker is set.
local digest, name = ARGV[1], ARGV[2]
local mode = ARGV[5] or 'add'
-- field -> {requested text, the value stored as absent (a number for a numeric field)}
local settings = {
  rpm = {ARGV[3] or '', 0},
  concurrency = {ARGV[4] or '', 0},
  priority = {ARGV[6] or '', 'normal'},
  max_priority = {ARGV[7] or '', 'any'},
  share = {ARGV[8] or '', 1},
}

-- Applies the requested settings to a decoded entry; returns whether anything changed.
local function apply(meta)
  local changed = false
  for field, setting in pairs(settings) do
    local text, absent = setting[1], setting[2]
    if text ~= '' then
      local value = text
      if type(absent) == 'number' then value = tonumber(text) end
      if value == absent then value = nil end
      if meta[field] ~= value then
        meta[field] = value
        changed = true
      end
    end
  end
  return changed
end

if digest == '' and mode == 'set' then
  digest = key_named(KEYS[1], name) or ''
end

local current = digest ~= '' and redis.call('HGET', KEYS[1], digest)
if current then
  local meta = cjson.decode(current)
  if meta.name == name then
    redis.call('SET', KEYS[3], now_ms(), 'NX')
    if apply(meta) then
      local entry = cjson.encode(meta)
      redis.call('HSET', KEYS[1], digest, entry)
      return {'updated', redis.call('INCR', KEYS[2]), digest, entry}
    end
    return {'exists', tonumber(redis.call('GET', KEYS[2]) or '0'), digest, current}
  end
  return {mode == 'set' and 'unknown' or 'name_taken', 0, digest, ''}
end
if mode == 'set' then
  return {'unknown', 0, digest, ''}
end
if key_named(KEYS[1], name) then
  return {'name_taken', 0, digest, ''}
end
local now = now_ms()
local meta = {name = name, created_ms = now}
apply(meta)
local entry = cjson.encode(meta)
redis.call('HSET', KEYS[1], digest, entry)
redis.call('SET', KEYS[3], now, 'NX')
return {'added', redis.call('INCR', KEYS[2]), digest, entry}
