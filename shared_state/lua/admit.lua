-- admit.lua: admit the fleet's queue of one model and role as far as its nodes have room, and
-- tell where some tickets stand. Run after a lease on a node with a capacity is released, and
-- by a replica whose requests wait (a safety net: capacity raised, a node added, leases of a
-- dead replica expired).
--
-- KEYS[1..5] the queue (see queue_keys in the prelude)
-- KEYS[6..]  node hash, lease sorted set: pairs, for every node that may serve the queue
-- ARGV[1]  lease time, ms (a grant's lease)
-- ARGV[2]  model
-- ARGV[3]  role wanted (0 any)
-- ARGV[4]  channel prefix of the replicas' admission messages
-- ARGV[5]  the share of a node's max_inflight kept for high priority (see slots_for)
-- ARGV[6..] tickets to tell about
--
-- Returns {depth, n, member, node_id, ... (n grants), status...}: one status per ticket asked
-- about, after the admissions: "queued", the id of the node where its member holds a lease
-- (admitted), or "" (neither: its deadline passed and it was dropped).
local lease_ms = tonumber(ARGV[1])
local model = ARGV[2]
local role = tonumber(ARGV[3])
local channel = ARGV[4]
local reserve = tonumber(ARGV[5])

local now = now_ms()
local queue = queue_keys(1)
queue_prune(queue, now)
local grants = {}
if queue_depth(queue) > 0 then
  grants = queue_admit(queue, queue_rooms(6, model, role, now), lease_ms, now, channel,
    reserve)
end
local out = {queue_depth(queue), #grants / 2}
for _, g in ipairs(grants) do out[#out + 1] = g end
for a = 6, #ARGV do
  local ticket = ARGV[a]
  local status = ''
  if redis.call('ZSCORE', queue.deadlines, ticket) then
    status = 'queued'
  else
    local member = ticket_member(ticket)
    for k = 7, #KEYS, 2 do
      if redis.call('ZSCORE', KEYS[k], member) then
        status = redis.call('HGET', KEYS[k - 1], 'id') or ''
        break
      end
    end
  end
  out[#out + 1] = status
end
return out
