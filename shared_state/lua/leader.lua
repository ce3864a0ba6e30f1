-- leader.lua: take, keep or give up the health-checker lease, with a fencing token.
--
-- KEYS[1]  leader key: "<checker-id> <token>", expiring after the lease time
-- KEYS[2]  fencing counter (string int): the last token handed out
-- ARGV[1]  checker id (no spaces)
-- ARGV[2]  lease time, ms
-- ARGV[3]  "1" to take or keep the lease, "0" to give it up
--
-- Returns {token, holder}: token > 0 when the caller leads, 0 otherwise; holder is the id of
-- the current leader ("" when none). A takeover always gets a new, larger token, so every
-- write a paused former leader makes with its old token is rejected.
local id = ARGV[1]
local lease_ms = tonumber(ARGV[2])
local current = redis.call('GET', KEYS[1])
local holder, token = '', 0
if current then
  local space = string.find(current, ' ', 1, true)
  holder = string.sub(current, 1, space - 1)
  token = tonumber(string.sub(current, space + 1))
end
if ARGV[3] == '0' then
  if holder == id then
    redis.call('DEL', KEYS[1])
    return {0, ''}
  end
  return {0, holder}
end
if holder == id then
  redis.call('PEXPIRE', KEYS[1], lease_ms)
  return {token, id}
end
if current then
  return {0, holder}
end
token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], id .. ' ' .. token, 'PX', lease_ms)
return {token, id}
