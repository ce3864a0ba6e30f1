-- pick.lua: choose a node for one request and reserve a lease on it, atomically.
--
-- KEYS[1]  registry epoch (string int)
-- KEYS[2]  round-robin cursor (string int)
-- KEYS[3*i], KEYS[3*i+1], KEYS[3*i+2] for candidate i = 1..n:
--          node hash, lease sorted set, latency list
-- KEYS[3n+3..3n+5] the ticket sets (high, normal, low) of the fleet's queue for this model
--          and role (admission)
-- ARGV[1]  lease member "<replica>:<request-id>"
-- ARGV[2]  strategy name
-- ARGV[3]  lease time, ms
-- ARGV[4]  random seed, integer in [1, 2147483646] (randomness comes from the caller)
-- ARGV[5]  model name
-- ARGV[6]  role wanted (1 Hybrid, 2 Prefill, 3 Decode; 0 any)
-- ARGV[7]  latency prior for nodes without history, ms (0: the best mean of the others)
-- ARGV[8]  exploration probability for min_observed_latency, 0..1
-- ARGV[9]  age after which scraped cache usage is stale, ms
-- ARGV[10] default cache share of one request for min_cache_usage, 0..1
-- ARGV[11] session_affinity: allowed load above the mean, epsilon (0.25: 25% above);
--          the candidates then come in the session key's rendezvous order, best first
-- ARGV[12] the request's priority: 1 high, 2 normal, 3 low
-- ARGV[13] the share of a node's max_inflight kept for high priority, 0..1 (floor of the
--          product: slots a normal or low request may not take)
--
-- Returns {node_id, in_flight_after, score, epoch, eligible, reused, known, full}:
--   node_id ""       when no candidate could take the request;
--   full > 0         with node_id "": the fitting nodes are at their max_inflight, or requests
--                    wait in the queue (which this one must then join: enqueue.lua);
--   in_flight_after  leases on the winner after reserving;
--   score            the winner's score under the strategy, as a string;
--   reused 1         when the member already held a lease (a retried call), which is renewed
--                    instead of a second lease being taken.
--
-- Invariants: a member holds at most one lease in the whole registry; expired leases of every
-- candidate are pruned before counting, so a crashed replica's leases never count; no node
-- gets more leases than its max_inflight; no request takes a slot while others wait for one.
local member = ARGV[1]
local strategy = ARGV[2]
local lease_ms = tonumber(ARGV[3])
local seed = tonumber(ARGV[4])
local model = ARGV[5]
local role = tonumber(ARGV[6])
local prior_ms = tonumber(ARGV[7])
local explore = tonumber(ARGV[8])
local stale_ms = tonumber(ARGV[9])
local default_share = tonumber(ARGV[10])
local epsilon = tonumber(ARGV[11] or '0.25')
local priority = tonumber(ARGV[12] or '2')
local reserve = tonumber(ARGV[13] or '0')

local now = now_ms()
local epoch = tonumber(redis.call('GET', KEYS[1]) or '0')
local rnd = park_miller(seed)

local function reply(id, inflight, score, eligible, reused, known, full)
  return {id, inflight, tostring(score), epoch, eligible, reused, known, full or 0}
end

local eligible, known, retried, full, capped = pick_candidates((#KEYS - 5) / 3, member, model,
  role, lease_ms, now, priority, reserve)
if retried then
  return reply(retried.id, retried.inflight, 0, 1, 1, known)
end
local n = #eligible
if n == 0 or (capped > 0 and queue_waiting(#KEYS - 2, priority)) then
  return reply('', 0, 0, 0, 0, known, math.max(full, n))
end

local function expected_latency()
  fill_speeds(eligible)
  for _, c in ipairs(eligible) do c.score = (c.inflight + 1) / c.speed end
  return argmin(eligible, rnd)
end

local winner
if strategy == 'least_connections' then
  for _, c in ipairs(eligible) do c.score = c.inflight end
  winner = argmin(eligible, rnd)
elseif strategy == 'min_expected_latency' then
  winner = expected_latency()
elseif strategy == 'random' then
  fill_speeds(eligible)
  local total = 0
  for _, c in ipairs(eligible) do
    c.score = c.speed * c.weight
    total = total + c.score
  end
  local r = rnd() * total
  winner = eligible[n]
  for _, c in ipairs(eligible) do
    r = r - c.score
    if r < 0 then
      winner = c
      break
    end
  end
elseif strategy == 'weighted_least_connections' then
  for _, c in ipairs(eligible) do c.score = c.inflight / c.weight end
  winner = argmin(eligible, rnd)
elseif strategy == 'weighted_round_robin' then
  -- Smooth weighted round robin (nginx's): the per-node current weights live in the node
  -- hashes, so all replicas together follow one sequence and give the weights exactly.
  local total = 0
  for _, c in ipairs(eligible) do
    c.swrr = c.swrr + c.weight
    total = total + c.weight
    if winner == nil or c.swrr > winner.swrr then winner = c end
  end
  winner.swrr = winner.swrr - total
  for _, c in ipairs(eligible) do
    redis.call('HSET', KEYS[3 * c.i], 'swrr', c.swrr)
  end
  winner.score = winner.swrr
elseif strategy == 'session_affinity' then
  -- Consistent hashing with bounded loads: the first node in the key's rendezvous order
  -- whose load stays within (1 + epsilon) of the mean takes it, so a heavy key cannot pin
  -- one node and removing a node moves only the keys that were on it.
  local total = 0
  for _, c in ipairs(eligible) do total = total + c.inflight end
  local bound = math.ceil((1 + epsilon) * (total + 1) / n)
  winner = eligible[n]
  for rank, c in ipairs(eligible) do
    if c.inflight + 1 <= bound then
      winner = c
      winner.score = rank
      break
    end
  end
  winner.score = winner.score or n
elseif strategy == 'round_robin' then
  local cursor = redis.call('INCR', KEYS[2])
  winner = eligible[(cursor - 1) % n + 1]
  winner.score = cursor
elseif strategy == 'min_observed_latency' then
  local best_mean
  for _, c in ipairs(eligible) do
    local samples = redis.call('LRANGE', KEYS[3 * c.i + 2], 0, -1)
    if #samples > 0 then
      local s = 0
      for _, v in ipairs(samples) do s = s + tonumber(v) end
      c.score = s / #samples
      if best_mean == nil or c.score < best_mean then best_mean = c.score end
    end
  end
  -- A node with no history gets a prior (by default the best mean of the others: optimism
  -- under uncertainty), so it is tried at once rather than starved; its first answers then
  -- give it a history of its own. At cold start all nodes tie and the pick is random.
  local prior = prior_ms
  if prior <= 0 then prior = best_mean or 0 end
  -- A request waits behind the node's requests in flight, counted across every replica: the
  -- mean is scaled by them, so a burst spreads instead of flooding the node that was fastest
  -- a moment ago.
  for _, c in ipairs(eligible) do
    if c.score == nil then c.score = prior end
    c.score = c.score * (c.inflight + 1)
  end
  if n > 1 and rnd() < explore then
    winner = eligible[math.floor(rnd() * n) + 1]
  else
    winner = argmin(eligible, rnd)
  end
elseif strategy == 'min_cache_usage' then
  local fresh = true
  for _, c in ipairs(eligible) do
    if not (c.kv and c.kv_ts and now - c.kv_ts <= stale_ms) then
      fresh = false
      break
    end
  end
  if fresh then
    -- Scraped usage plus the requests reserved since, each costing the node's own share of
    -- the cache, so a burst does not herd onto one node for a whole scrape interval.
    for _, c in ipairs(eligible) do
      local share = default_share
      if c.kv_running and c.kv_running > 0 and c.kv > 0 then share = c.kv / c.kv_running end
      local since = c.inflight - (c.kv_running or 0)
      if since < 0 then since = 0 end
      c.score = c.kv + share * since
    end
    winner = argmin(eligible, rnd)
  else
    winner = expected_latency()
  end
else
  return redis.error_reply('unknown strategy ' .. strategy)
end

local lkey = KEYS[3 * winner.i + 1]
redis.call('ZADD', lkey, now + lease_ms, member)
return reply(winner.id, winner.inflight + 1, winner.score, n, 0, known, 0)
