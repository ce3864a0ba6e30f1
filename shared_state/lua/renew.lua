-- renew.lua: extend every live lease of one replica, and record that the replica is alive.
--
-- KEYS[1]  replica heartbeat sorted set (replica id scored by last renewal, ms)
-- KEYS[2..] lease sorted sets, one per node the replica holds leases on
-- ARGV[1]  replica id
-- ARGV[2]  lease time, ms
-- ARGV[3..] for each KEYS[i] (i >= 2) in order: the number of members, then the members
--
-- Returns the number of leases renewed. A lease that already expired and was pruned is not
-- brought back: its request stopped counting, and releasing it later records nothing.
local replica = ARGV[1]
local lease_ms = tonumber(ARGV[2])
local now = now_ms()
redis.call('ZADD', KEYS[1], now, replica)
local renewed = 0
local a = 3
for k = 2, #KEYS do
  local count = tonumber(ARGV[a])
  for j = 1, count do
    local member = ARGV[a + j]
    local score = redis.call('ZSCORE', KEYS[k], member)
    if score and tonumber(score) >= now then
      redis.call('ZADD', KEYS[k], now + lease_ms, member)
      renewed = renewed + 1
    end
  end
  a = a + count + 1
end
return renewed
