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
