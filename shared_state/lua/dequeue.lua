-- dequeue.lua: take a waiting request out of the fleet's queue (its client left, or its wait
-- timed out), unless it was admitted meanwhile.
--
-- KEYS[1..5] the queue (see queue_keys in the prelude)
-- KEYS[6..]  node hash, lease sorted set: pairs, for every node that may serve the queue
-- ARGV[1]  the ticket "<seq>|<member>"
--
-- Returns {status, node_id}: "removed" (it waited; now it is gone), "admitted" (its member
-- holds a lease on node_id: the caller uses or releases it) or "gone" (neither: its deadline
-- passed).
local ticket = ARGV[1]
local queue = queue_keys(1)
if redis.call('ZREM', queue.deadlines, ticket) == 1 then
  for p = 1, 3 do redis.call('ZREM', queue.sets[p], ticket) end
  if queue_depth(queue) == 0 then redis.call('DEL', queue.fair) end
  return {'removed', ''}
end
local member = ticket_member(ticket)
for k = 7, #KEYS, 2 do
  if redis.call('ZSCORE', KEYS[k], member) then
    return {'admitted', redis.call('HGET', KEYS[k - 1], 'id') or ''}
  end
end
return {'gone', ''}
