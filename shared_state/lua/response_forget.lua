-- response_forget.lua: forget a stored response (its node deleted it).
--
-- KEYS[1]  response map hash (as response_record.lua)
-- KEYS[2]  response times sorted set
-- ARGV[1]  response id
--
-- Returns 1 when it was known, else 0.
redis.call('ZREM', KEYS[2], ARGV[1])
return redis.call('HDEL', KEYS[1], ARGV[1])
