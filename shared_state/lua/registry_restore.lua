-- registry_restore.lua: put a gateway replica's last registry back into a store that lost it
-- (emptied by FLUSHALL, restarted empty, a fail-over to a replica that lagged), once; or, on a
-- store whose registry carries no generation yet, give it one.
--
-- KEYS[1]  node id set
-- KEYS[2]  registry epoch
-- KEYS[3]  API key hash: hex digest -> JSON entry
-- KEYS[4]  keys-required marker
-- KEYS[5]  restore record hash (generation, by, at_ms, found_epoch, epoch, nodes, keys)
-- KEYS[5 + i] for snapshot node i = 1..n: its node hash
-- ARGV[1]  the snapshot's epoch (the registry epoch the replica cached)
-- ARGV[2]  the snapshot's generation ("" when it had none)
-- ARGV[3]  a new generation id, unique to this call
-- ARGV[4]  the calling replica's id
-- ARGV[5]  1 when the snapshot needed a client key (the keys-required marker was set), else 0
-- ARGV[6]  number k of client keys in the snapshot, then k pairs: hex digest, JSON entry
-- ARGV[7 + 2k .. 6 + 2k + n]  for node i, in KEYS order: a JSON object of its registry fields
--
-- Returns {status, epoch, nodes restored, keys restored}: "restored"; "stamped" when the store
-- was not behind but had no generation (it got ARGV[3]; nothing else written); "current"
-- when the store is not behind the snapshot (nothing written).
--
-- Behind means: the store's epoch (0 when missing) is below the snapshot's, or the snapshot
-- had a generation and the store has none (a reset store written past the old epoch since).
-- Invariant: only a behind store is written, so a healthy one (and a node deliberately removed
-- from it, which moved its epoch past every cache) is never merged into; a node or key present
-- in the store was written after the reset and is kept as it is; the epoch ends above both the
-- store's and the snapshot's, and the generation is new, so the epoch never goes backwards and
-- no replica mistakes the restored registry for the one it cached. The call is its own lock:
-- the first replica restores, the others then find the store current and re-read it.
local snap_epoch = tonumber(ARGV[1])
local snap_generation = ARGV[2]
local generation = ARGV[3]
local replica = ARGV[4]
local keys_required = ARGV[5] == '1'
local nkeys = tonumber(ARGV[6])

local found_epoch = tonumber(redis.call('GET', KEYS[2]) or '0')
local current_generation = redis.call('HGET', KEYS[5], 'generation')
local behind = found_epoch < snap_epoch or (snap_generation ~= '' and not current_generation)
local now = now_ms()

if not behind then
  if current_generation then
    return {'current', found_epoch, 0, 0}
  end
  redis.call('HSET', KEYS[5], 'generation', generation, 'by', replica, 'at_ms', now)
  return {'stamped', found_epoch, 0, 0}
end

local restored_keys = 0
for i = 1, nkeys do
  local digest, entry = ARGV[5 + 2 * i], ARGV[6 + 2 * i]
  if redis.call('HSETNX', KEYS[3], digest, entry) == 1 then
    restored_keys = restored_keys + 1
  end
end
if keys_required or redis.call('HLEN', KEYS[3]) > 0 then
  redis.call('SETNX', KEYS[4], now)
end

local restored_nodes = 0
local first_node = 7 + 2 * nkeys
for i = 6, #KEYS do
  local fields = cjson.decode(ARGV[first_node + i - 6])
  if redis.call('EXISTS', KEYS[i]) == 0 then
    for field, value in pairs(fields) do
      redis.call('HSET', KEYS[i], field, value)
    end
    restored_nodes = restored_nodes + 1
  end
  redis.call('SADD', KEYS[1], fields.id)
end

local epoch = math.max(found_epoch, snap_epoch) + 1
redis.call('SET', KEYS[2], epoch)
redis.call('DEL', KEYS[5])
redis.call('HSET', KEYS[5], 'generation', generation, 'by', replica, 'at_ms', now,
  'found_epoch', found_epoch, 'epoch', epoch, 'nodes', restored_nodes, 'keys', restored_keys)
return {'restored', epoch, restored_nodes, restored_keys}
