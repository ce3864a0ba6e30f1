-- _prelude.lua: helpers put in front of every script by shared_state/scripts.py.

-- The Redis server's clock in ms: the one every deadline in the state is written in.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Whether checker ``id`` holds the leader lease (key "<checker-id> <token>") under ``token``:
-- every checker write is fenced by it, so a paused former leader cannot write.
local function leads(leader_key, id, token)
  return redis.call('GET', leader_key) == id .. ' ' .. token
end

-- Take PD session ``id`` out of the records hash and the deadlines set, appending its id and
-- ``record`` to ``out``: whoever takes a record frees the session, so it is freed once.
local function take_session(records, deadlines, id, record, out)
  redis.call('HDEL', records, id)
  redis.call('ZREM', deadlines, id)
  out[#out + 1] = id
  out[#out + 1] = record
end

-- The digest of the client API key named ``name`` in the key hash, or nil (names are unique).
local function key_named(keys_hash, name)
  local entries = redis.call('HGETALL', keys_hash)
  for i = 1, #entries, 2 do
    if cjson.decode(entries[i + 1]).name == name then
      return entries[i]
    end
  end
  return nil
end

-- A Park-Miller generator on the caller's seed (an integer in [1, 2147483646]): the scripts'
-- only randomness, so a pick is reproducible from its arguments. Products stay below 2^53,
-- so doubles keep it exact.
local function park_miller(seed)
  return function()
    seed = (seed * 16807) % 2147483647
    return seed / 2147483647
  end
end

-- The candidates of a pick (pick.lua, pick_prefix.lua): candidate i = 1..n has its node hash at
-- KEYS[3 * i] and its lease set at KEYS[3 * i + 1]. Keeps the nodes that exist, are active,
-- serve ``model`` and have ``role`` (0: any), pruning their expired leases; ejected ones only
-- when every fitting node is ("panic mode": routing to them beats refusing everything).
-- Returns eligible, known, retried: ``retried`` is {id, inflight} of the node where ``member``
-- already holds a lease (a retried call; the lease is renewed and eligible is nil).
local function pick_candidates(n, member, model, role, lease_ms, now)
  local needle = '\n' .. model .. '\n'
  local eligible, ejected, known = {}, {}, 0
  for i = 1, n do
    local hkey, lkey = KEYS[3 * i], KEYS[3 * i + 1]
    local f = redis.call('HMGET', hkey, 'id', 'state', 'models', 'role', 'speed', 'weight',
      'ejected_until', 'kv_usage', 'kv_running', 'kv_ts', 'swrr', 'cache_blocks')
    if f[1] then
      known = known + 1
      if redis.call('ZSCORE', lkey, member) then
        -- The same request asked twice (a client-side retry): keep its one lease.
        redis.call('ZADD', lkey, now + lease_ms, member)
        return nil, known, {id = f[1], inflight = redis.call('ZCOUNT', lkey, now, '+inf')}
      end
      local fits = f[2] == 'active'
        and string.find(f[3] or '', needle, 1, true) ~= nil
        and (role == 0 or tonumber(f[4]) == role)
      if fits then
        redis.call('ZREMRANGEBYSCORE', lkey, '-inf', '(' .. now)
        local c = {
          i = i, id = f[1], inflight = redis.call('ZCARD', lkey),
          speed = tonumber(f[5]), weight = tonumber(f[6]) or 1,
          kv = tonumber(f[8]), kv_running = tonumber(f[9]), kv_ts = tonumber(f[10]),
          swrr = tonumber(f[11]) or 0, capacity = tonumber(f[12]),
        }
        if (tonumber(f[7]) or 0) > now then
          ejected[#ejected + 1] = c
        else
          eligible[#eligible + 1] = c
        end
      end
    end
  end
  if #eligible == 0 then
    eligible = ejected
  end
  return eligible, known, nil
end

-- Nodes without a speed count as the mean of those with one (1 when none has one).
local function fill_speeds(list)
  local sum, cnt = 0, 0
  for _, c in ipairs(list) do
    if c.speed and c.speed > 0 then
      sum = sum + c.speed
      cnt = cnt + 1
    end
  end
  local mean = 1
  if cnt > 0 then mean = sum / cnt end
  for _, c in ipairs(list) do
    if not (c.speed and c.speed > 0) then c.speed = mean end
  end
end

-- Lowest score wins; equal scores are broken uniformly at random (``rnd`` from park_miller).
local function argmin(list, rnd)
  local best, ties = nil, 0
  for _, c in ipairs(list) do
    if best == nil or c.score < best.score - 1e-12 then
      best, ties = c, 1
    elseif math.abs(c.score - best.score) <= 1e-12 then
      ties = ties + 1
      if rnd() * ties < 1 then best = c end
    end
  end
  return best
end
