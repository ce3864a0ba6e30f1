-- sweep.lua: drop expired leases everywhere and list the gateway replicas still alive.
--
-- KEYS[1]  leader key ("<checker-id> <token>"): the sweep is fenced like every checker write
-- KEYS[2]  replica heartbeat sorted set (replica id scored by last renewal, ms)
-- KEYS[3..] lease sorted sets of every node
-- ARGV[1]  checker id
-- ARGV[2]  fencing token
-- ARGV[3]  a replica is alive if it renewed within this many ms
-- ARGV[4]  heartbeats older than this many ms are forgotten
--
-- Returns {pruned, replica, last_ms, replica, last_ms, ...}: the number of expired leases
-- removed, then each live replica with its last renewal time; {-1} when fenced.
if not leads(KEYS[1], ARGV[1], ARGV[2]) then
  return {-1}
end
local alive_ms, forget_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
local pruned = 0
for i = 3, #KEYS do
  pruned = pruned + redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', '(' .. now)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. (now - forget_ms))
local out = {pruned}
local live = redis.call('ZRANGEBYSCORE', KEYS[2], now - alive_ms, '+inf', 'WITHSCORES')
for i = 1, #live do out[#out + 1] = live[i] end
return out
