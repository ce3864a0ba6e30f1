-- _prelude.lua: helpers put in front of every script by shared_state/scripts.py.

-- The Redis server's clock in ms: the one every deadline in the state is written in.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Whether checker ``id`` holds the leader lease (key "<checker-id> <token>") under ``token``:
-- every checker write is fenced by it, so a paused former leader cannot write.
local function leads(leader_key, id, token)
  return redis.call('GET', leader_key) == id .. ' ' .. token
end

-- Take PD session ``id`` out of the records hash and the deadlines set, appending its id and
-- ``record`` to ``out``: whoever takes a record frees the session, so it is freed once.
local function take_session(records, deadlines, id, record, out)
  redis.call('HDEL', records, id)
  redis.call('ZREM', deadlines, id)
  out[#out + 1] = id
  out[#out + 1] = record
end

-- The digest of the client API key named ``name`` in the key hash, or nil (names are unique).
local function key_named(keys_hash, name)
  local entries = redis.call('HGETALL', keys_hash)
  for i = 1, #entries, 2 do
    if cjson.decode(entries[i + 1]).name == name then
      return entries[i]
    end
  end
  return nil
end
