-- pd_close.lua: end prefill sessions; only the caller that removes a record may free it.
--
-- KEYS[1]  PD session records (hash)
-- KEYS[2]  PD session deadlines (sorted set)
-- ARGV[1..] session ids
--
-- Returns {session id, record, ...} for the sessions this call removed; a session already
-- closed by someone else (a sweep, a node removal, gc) is left out, so it is freed once.
local out = {}
for i = 1, #ARGV do
  local record = redis.call('HGET', KEYS[1], ARGV[i])
  if record then
    take_session(KEYS[1], KEYS[2], ARGV[i], record, out)
  end
end
return out
