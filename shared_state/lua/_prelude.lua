-- _prelude.lua: helpers put in front of every script by shared_state/scripts.py.

-- The Redis server's clock in ms: the one every deadline in the state is written in.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

