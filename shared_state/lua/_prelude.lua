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

-- The slots of a node with capacity ``cap`` that a request of ``priority`` may use: all for
-- high priority, ``floor(cap x reserve)`` fewer for the others (at least one).
local function slots_for(cap, priority, reserve)
  if priority <= 1 then return cap end
  return math.max(1, cap - math.floor(cap * reserve))
end

-- The candidates of a pick (pick.lua, pick_prefix.lua): candidate i = 1..n has its node hash at
-- KEYS[3 * i] and its lease set at KEYS[3 * i + 1]. Keeps the nodes that exist, are active,
-- serve ``model`` and have ``role`` (0: any), pruning their expired leases; ejected ones only
-- when every fitting node is ("panic mode": routing to them beats refusing everything). A node
-- at its ``max_inflight`` is never kept: it counts in ``full``, and when every fitting node
-- that is not ejected is full, the request waits in the fleet's queue rather than go to an
-- ejected one.
-- Returns eligible, known, retried, full, capped: ``retried`` is {id, inflight} of the node
-- where ``member`` already holds a lease (a retried call; the lease is renewed and eligible
-- is nil); ``capped`` counts the fitting nodes that have a capacity.
local function pick_candidates(n, member, model, role, lease_ms, now, priority, reserve)
  local needle = '\n' .. model .. '\n'
  local eligible, ejected, known, full, capped, healthy = {}, {}, 0, 0, 0, 0
  for i = 1, n do
    local hkey, lkey = KEYS[3 * i], KEYS[3 * i + 1]
    local f = redis.call('HMGET', hkey, 'id', 'state', 'models', 'role', 'speed', 'weight',
      'ejected_until', 'kv_usage', 'kv_running', 'kv_ts', 'swrr', 'cache_blocks', 'max_inflight')
    if f[1] then
      known = known + 1
      if redis.call('ZSCORE', lkey, member) then
        -- The same request asked twice (a client-side retry): keep its one lease.
        redis.call('ZADD', lkey, now + lease_ms, member)
        return nil, known, {id = f[1], inflight = redis.call('ZCOUNT', lkey, now, '+inf')}, 0, 0
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
        local cap = tonumber(f[13])
        local is_ejected = (tonumber(f[7]) or 0) > now
        if cap and cap > 0 then capped = capped + 1 end
        if not is_ejected then healthy = healthy + 1 end
        if cap and cap > 0 and c.inflight >= slots_for(cap, priority, reserve) then
          full = full + 1
        elseif is_ejected then
          ejected[#ejected + 1] = c
        else
          eligible[#eligible + 1] = c
        end
      end
    end
  end
  if #eligible == 0 and healthy == 0 then
    eligible = ejected
  end
  return eligible, known, nil, full, capped
end

-- Whether requests of ``priority`` or above wait in the fleet's queue whose ticket sets (high,
-- normal, low) are KEYS[first .. first + 2]: a new request then queues too, behind them,
-- instead of taking a slot they wait for (requests of lower priority do not hold it back).
local function queue_waiting(first, priority)
  for p = 1, priority do
    if redis.call('ZCARD', KEYS[first + p - 1]) > 0 then return true end
  end
  return false
end

-- The fleet's queue of one (model, role) at KEYS[q .. q + 4]: ticket sets of priority high,
-- normal, low (ticket "<seq>|<lease member>" scored by its fair-share start tag), the tickets'
-- deadlines, and the fair-share state (hash: "v<p>" the virtual time of priority p, "<p>:<key>"
-- the finish tag of a client key's last ticket there).
local function queue_keys(q)
  return {sets = {KEYS[q], KEYS[q + 1], KEYS[q + 2]}, deadlines = KEYS[q + 3], fair = KEYS[q + 4]}
end

-- Drop the tickets whose deadline passed (their replica stopped renewing them: it died).
local function queue_prune(queue, now)
  local dead = redis.call('ZRANGEBYSCORE', queue.deadlines, '-inf', '(' .. now, 'LIMIT', 0, 1000)
  for _, ticket in ipairs(dead) do
    redis.call('ZREM', queue.deadlines, ticket)
    for p = 1, 3 do redis.call('ZREM', queue.sets[p], ticket) end
  end
  return #dead
end

local function queue_depth(queue)
  return redis.call('ZCARD', queue.sets[1]) + redis.call('ZCARD', queue.sets[2])
    + redis.call('ZCARD', queue.sets[3])
end

-- The lease member of a ticket "<seq>|<member>", and the replica that holds it.
local function ticket_member(ticket)
  local member = string.sub(ticket, string.find(ticket, '|', 1, true) + 1)
  return member, string.sub(member, 1, string.find(member, ':', 1, true) - 1)
end

-- The nodes of KEYS[first], KEYS[first + 1] (node hash, lease set), pairs up to KEYS[#KEYS],
-- that fit ``model`` and ``role`` and have room, each {id, lkey, cap, inflight}; ejected ones
-- only when no fitting node is healthy (as picks do). A node without a capacity has endless
-- room.
local function queue_rooms(first, model, role, now)
  local needle = '\n' .. model .. '\n'
  local open, ejected, healthy = {}, {}, 0
  for k = first, #KEYS - 1, 2 do
    local f = redis.call('HMGET', KEYS[k], 'id', 'state', 'models', 'role', 'max_inflight',
      'ejected_until')
    if f[1] and f[2] == 'active' and string.find(f[3] or '', needle, 1, true) ~= nil
        and (role == 0 or tonumber(f[4]) == role) then
      local lkey = KEYS[k + 1]
      redis.call('ZREMRANGEBYSCORE', lkey, '-inf', '(' .. now)
      local cap = tonumber(f[5])
      if not (cap and cap > 0) then cap = 1e9 end
      local inflight = redis.call('ZCARD', lkey)
      local is_ejected = (tonumber(f[6]) or 0) > now
      if not is_ejected then healthy = healthy + 1 end
      if inflight < cap then
        local entry = {id = f[1], lkey = lkey, cap = cap, inflight = inflight}
        if is_ejected then ejected[#ejected + 1] = entry else open[#open + 1] = entry end
      end
    end
  end
  if healthy == 0 then return ejected end
  return open
end

-- Admit the queue's head tickets while ``rooms`` (from queue_rooms) has room: strict priority,
-- then the lowest start tag, then arrival (the ticket's sequence number). Each admitted ticket
-- becomes a lease on the node with the most room for its priority (see slots_for), and its
-- replica hears at once on channel ``channel .. replica`` ("<member> <node id>"). Returns the
-- grants {member, node id, ...}.
local function queue_admit(queue, rooms, lease_ms, now, channel, reserve)
  local grants = {}
  local p = 1
  while p <= 3 do
    local head = redis.call('ZRANGE', queue.sets[p], 0, 0, 'WITHSCORES')
    local best, most = nil, 0
    if #head > 0 then
      for _, node in ipairs(rooms) do
        local room = slots_for(node.cap, p, reserve) - node.inflight
        if room > most then best, most = node, room end
      end
    end
    if #head == 0 then
      p = p + 1
    elseif best == nil then
      break -- no room for this priority, so none for the lower ones
    else
      local ticket, tag = head[1], tonumber(head[2])
      local member, replica = ticket_member(ticket)
      redis.call('ZREM', queue.sets[p], ticket)
      redis.call('ZREM', queue.deadlines, ticket)
      if tag > tonumber(redis.call('HGET', queue.fair, 'v' .. p) or '0') then
        redis.call('HSET', queue.fair, 'v' .. p, tag)
      end
      redis.call('ZADD', best.lkey, now + lease_ms, member)
      best.inflight = best.inflight + 1
      redis.call('PUBLISH', channel .. replica, member .. ' ' .. best.id)
      grants[#grants + 1] = member
      grants[#grants + 1] = best.id
    end
  end
  if #grants > 0 and queue_depth(queue) == 0 then
    -- Nobody waits: the fair-share clocks start again from zero (no credit, no debt).
    redis.call('DEL', queue.fair)
  end
  return grants
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
