-- key_limit_release.lua: free the concurrency slot a request of a client API key held.
--
-- KEYS[1]  concurrency leases of the key (sorted set): member scored by lease deadline, ms
-- ARGV[1]  lease member "<replica>:<request-id>:<nonce>", as given to key_limit.lua
--
-- Returns 1 when a live slot was freed; 0 when the lease had expired (the request had already
-- stopped counting) or was released before. Releasing is idempotent.
local member = ARGV[1]
local now = now_ms()
local deadline = redis.call('ZSCORE', KEYS[1], member)
if not deadline then
  return 0
end
redis.call('ZREM', KEYS[1], member)
if tonumber(deadline) < now then
  return 0
end
return 1
