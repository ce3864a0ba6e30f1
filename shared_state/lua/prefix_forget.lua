-- prefix_forget.lua: remove blocks from one node's prefix block set, or all of them.
--
-- KEYS[1]  prefix block set of the node
-- ARGV[1..] block hashes to remove; none: remove every block of the node (its engine
--           restarted, say, with an empty cache)
--
-- Returns the number of blocks removed.
--
-- Invariant: removing a chain's tail keeps the set prefix-closed; callers remove a request's
-- blocks from some k to its end, never from the middle alone.
if #ARGV == 0 then
  local held = redis.call('ZCARD', KEYS[1])
  redis.call('DEL', KEYS[1])
  return held
end
local removed = 0
-- In batches: a Lua call takes a bounded number of arguments.
for first = 1, #ARGV, 256 do
  removed = removed + redis.call('ZREM', KEYS[1], unpack(ARGV, first, math.min(first + 255, #ARGV)))
end
return removed
