-- enqueue.lua: put a request that found no room in the fleet's queue for its model and role,
-- then admit what the nodes have room for (it may be this request at once).
--
-- KEYS[1]  ticket sequence (string int)
-- KEYS[2..6] the queue (see queue_keys in the prelude): ticket sets high, normal, low,
--          deadline set, fair-share hash
-- KEYS[7..] node hash, lease sorted set: pairs, for every node that may serve the queue
-- ARGV[1]  lease member "<replica>:<request-id>" (it becomes the ticket "<seq>|<member>")
-- ARGV[2]  priority: 1 high, 2 normal, 3 low
-- ARGV[3]  fair-share key: the client key's name ("" for requests without a key)
-- ARGV[4]  the key's share, a whole number >= 1
-- ARGV[5]  lease time, ms: the ticket's deadline (renewed by its replica) and a grant's lease
-- ARGV[6]  most tickets waiting at once (0: no bound)
-- ARGV[7]  model
-- ARGV[8]  role wanted (1 Hybrid, 2 Prefill, 3 Decode; 0 any)
-- ARGV[9]  channel prefix of the replicas' admission messages (the replica id follows)
-- ARGV[10] the share of a node's max_inflight kept for high priority (see slots_for)
--
-- Returns {status, ticket, node_id, depth, grants...}: status "admitted" (this request holds
-- a lease on node_id now), "queued" (it waits as ticket; depth tickets wait in all) or "full"
-- (depth >= ARGV[6]: nothing was stored). grants: member, node id pairs of every admission
-- made, each told to its replica on its channel.
--
-- Invariants: a ticket is admitted at most once (taking it out of the queue and leasing it
-- are one step); start tags give weighted fair shares between keys (start-time fair queuing:
-- a key's ticket starts at the later of the queue's virtual time and its previous ticket's
-- finish, and finishes 1/share later).
local member = ARGV[1]
local priority = tonumber(ARGV[2])
local fair_key = ARGV[3]
local share = tonumber(ARGV[4])
local lease_ms = tonumber(ARGV[5])
local max_queue = tonumber(ARGV[6])
local model = ARGV[7]
local role = tonumber(ARGV[8])
local channel = ARGV[9]
local reserve = tonumber(ARGV[10])

local now = now_ms()
local queue = queue_keys(2)
queue_prune(queue, now)
local depth = queue_depth(queue)
if max_queue > 0 and depth >= max_queue then
  return {'full', '', '', depth}
end

local v = tonumber(redis.call('HGET', queue.fair, 'v' .. priority) or '0')
local last = tonumber(redis.call('HGET', queue.fair, priority .. ':' .. fair_key) or '0')
local start = math.max(v, last)
redis.call('HSET', queue.fair, priority .. ':' .. fair_key, start + 1 / share)
local ticket = string.format('%012d|%s', redis.call('INCR', KEYS[1]), member)
redis.call('ZADD', queue.sets[priority], start, ticket)
redis.call('ZADD', queue.deadlines, now + lease_ms, ticket)

local grants = queue_admit(queue, queue_rooms(7, model, role, now), lease_ms, now, channel,
  reserve)
for g = 1, #grants, 2 do
  if grants[g] == member then
    return {'admitted', ticket, grants[g + 1], queue_depth(queue), unpack(grants)}
  end
end
return {'queued', ticket, '', queue_depth(queue), unpack(grants)}
