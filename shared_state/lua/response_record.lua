-- response_record.lua: remember which node holds a stored response (OpenAI's Responses API), so
-- that every replica sends the calls naming it to that node.
--
-- KEYS[1]  response map hash: response id -> "<node id>\n<model>"
-- KEYS[2]  response times sorted set: response id scored by when it was recorded (ms)
-- ARGV[1]  response id
-- ARGV[2]  node id
-- ARGV[3]  model
-- ARGV[4]  lifetime, ms: older entries are dropped
-- ARGV[5]  most entries kept: past it the oldest are dropped
--
-- Returns the entries kept after the call. Invariant: the hash and the set hold the same ids.
local now = now_ms()
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '\n' .. ARGV[3])
redis.call('ZADD', KEYS[2], now, ARGV[1])
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. (now - tonumber(ARGV[4])),
  'LIMIT', 0, 256)
local count = redis.call('ZCARD', KEYS[2]) - #old
local over = count - tonumber(ARGV[5])
if over > 0 then
  for _, entry in ipairs(redis.call('ZRANGE', KEYS[2], #old, #old + over - 1)) do
    old[#old + 1] = entry
  end
end
for first = 1, #old, 256 do
  local batch = {unpack(old, first, math.min(first + 255, #old))}
  redis.call('HDEL', KEYS[1], unpack(batch))
  redis.call('ZREM', KEYS[2], unpack(batch))
end
return redis.call('ZCARD', KEYS[2])
