-- pd_drop.lua: forget every pair and prefill session that involves one node.
--
-- KEYS[1]  connected pairs (hash)
-- KEYS[2]  PD session records (hash)
-- KEYS[3]  PD session deadlines (sorted set)
-- ARGV[1]  node id
--
-- Returns {pairs, sessions}: the "prefill decode" pairs dropped, and {session id, record, ...}
-- of the sessions taken (the caller frees them on their prefill nodes and disconnects the
-- pairs on both sides).
local node = ARGV[1]
local pairs_out = {}
local fields = redis.call('HKEYS', KEYS[1])
for i = 1, #fields do
  local p, d = string.match(fields[i], '^(%S+) (%S+)$')
  if p == node or d == node then
    redis.call('HDEL', KEYS[1], fields[i])
    pairs_out[#pairs_out + 1] = fields[i]
  end
end
local sessions_out = {}
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local p, d = string.match(all[i + 1], '^(%S+) (%S+) ')
  if p == node or d == node then
    take_session(KEYS[2], KEYS[3], all[i], all[i + 1], sessions_out)
  end
end
return {pairs_out, sessions_out}
