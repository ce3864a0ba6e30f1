-- pick_prefix.lua: the cache_aware pick. Choose the node with the lowest expected time to first
-- token for a prompt given as a chain of block hashes, reserve a lease on it and record the
-- chain as held by it, atomically.
--
-- KEYS[1]  registry epoch (string int)
-- KEYS[2]  round-robin cursor (unused: every pick script shares one key layout)
-- KEYS[3*i], KEYS[3*i+1], KEYS[3*i+2] for candidate i = 1..n:
--          node hash, lease sorted set, prefix block set (block hash scored by last use, ms)
-- KEYS[3n+3..3n+5] the ticket sets of the fleet's queue for this model and role (as pick.lua)
-- ARGV[1..13] as pick.lua (ARGV[2] "cache_aware"; ARGV[7..11] unused)
-- ARGV[14] capacity in blocks of a node whose hash has no `cache_blocks`
-- ARGV[15] load bound, balance >= 0: a node takes the request only while its requests in
--          flight, this one included, stay within ceil((1 + balance) x the candidates' mean)
--          or within the mean + slack (ARGV[19]), rounded down, whichever is more
-- ARGV[16] cost of one request in flight, in blocks of prefill
-- ARGV[17] cost of evicting one block another prompt may need, in blocks of prefill (1: it
--          will be prefilled again)
-- ARGV[18] touch interval, ms: blocks the winner held that were used more recently than this
--          keep their scores (a hot prefix costs O(new blocks) per pick, not O(all blocks))
-- ARGV[19] load bound's slack, requests >= 0: what a node may carry above the mean however
--          low the load (at a mean of 0.5, a bound of ceil(1.5 x 0.5) = 1 would send the next
--          turn of a chat away from its busy node to prefill its whole prompt elsewhere)
-- ARGV[20] "prompts": the nodes' caches hold whole prompts (llama.cpp's llama-server: every
--          prompt saved whole, each with its own copy of a shared system prompt, the oldest
--          dropped first, a saved prompt moved out into the slot that resumes from it), see
--          "Whole prompts" below; else "blocks" (vLLM, SGLang: distinct blocks, LRU)
-- ARGV[21..] the prompt's chain of block hashes, first block first (the first 2048 are used)
--
-- Returns {node_id, in_flight_after, score, epoch, eligible, reused, known, full, matched,
--   total}: the first eight as pick.lua; score = the winner's expected time to first token in blocks
--   of prefill at the candidates' mean speed, (requests in flight x ARGV[16] + blocks it
--   lacks) x mean speed / its speed, plus ARGV[17] x the blocks that recording the chain there
--   would evict (a full node's cache is worth keeping: with ARGV[17] = 1, a partial hit on a
--   full node beats an empty node only when it covers more than half the prompt); matched =
--   blocks of the chain the winner held before this pick, total = blocks in the chain.
--
-- Invariants: a member holds at most one lease (as pick.lua). A block set is prefix-closed:
-- the blocks of one pick are scored now + (total - k) / 2048 for k = 1..total (or, when the
-- held ones were used within the touch interval, only the new blocks, each 1/2048 below the
-- block before it), so a block is always more recent than the blocks after it in its chain,
-- and eviction (lowest score first, down to the node's capacity) takes a chain's tail first,
-- as engines evict; the longest held prefix is then found by binary search, O(log total)
-- lookups per node. Scores stay exact: doubles hold ms + k/2048 exactly while TIME in ms is
-- below 2^42 (the year 2109).
--
-- Whole prompts (ARGV[20] "prompts"). A node's set holds, besides the blocks, one marker per
-- prompt recorded there, "~<seq>:<blocks>" scored <seq> (an integer, increasing per node: the
-- pick's ms, or one past the node's newest), and "~occ" scored -1 - (the blocks of all its
-- prompts, each charged whole). Every pick scores all its blocks <seq>, so a block's score
-- names the newest prompt holding it. The prompt a pick's held prefix ends in (its last held
-- block's score) is then gone from the node's cache: superseded when the new prompt contains
-- it all, moved out into the slot when it is not the node's newest (the engine resumes from
-- it and overwrites the rest; the newest is the slot's own and stays saved), so its marker
-- and the blocks still scored as it go. Past the capacity the oldest prompts go, each with
-- every block scored at or below it (no newer prompt holds those). Markers sort after the
-- hex block hashes of the same score. Such a removal can leave an older prompt that shared
-- more with the removed one than the new prompt does without a middle part; its blocks past
-- the gap may then be predicted held, and the engine's feedback removes them.
local member = ARGV[1]
local lease_ms = tonumber(ARGV[3])
local seed = tonumber(ARGV[4])
local model = ARGV[5]
local role = tonumber(ARGV[6])
local priority = tonumber(ARGV[12])
local reserve = tonumber(ARGV[13])
local default_capacity = tonumber(ARGV[14])
local balance = tonumber(ARGV[15])
local request_blocks = tonumber(ARGV[16])
local evict_cost = tonumber(ARGV[17])
local touch_ms = tonumber(ARGV[18])
local slack = tonumber(ARGV[19])
local whole = ARGV[20] == 'prompts'
local FIRST = 20 -- ARGV[FIRST + k] is block k
local MAX_BLOCKS = 2048
local total = math.min(#ARGV - FIRST, MAX_BLOCKS)

local now = now_ms()
local epoch = tonumber(redis.call('GET', KEYS[1]) or '0')
local rnd = park_miller(seed)

local function reply(id, inflight, score, eligible, reused, known, matched, full)
  return {id, inflight, tostring(score), epoch, eligible, reused, known, full or 0, matched,
    total}
end

local eligible, known, retried, full, capped = pick_candidates((#KEYS - 5) / 3, member, model,
  role, lease_ms, now, priority, reserve)
if retried then
  return reply(retried.id, retried.inflight, 0, 1, 1, known, 0)
end
local n = #eligible
if n == 0 or (capped > 0 and queue_waiting(#KEYS - 2, priority)) then
  return reply('', 0, 0, 0, 0, known, 0, math.max(full, n))
end

local function block(k)
  return ARGV[FIRST + k]
end

-- The longest prefix of the chain held in set ``key``, and the score of its last block: the
-- set is prefix-closed, so "block k is held" is true up to some k and false after it. A node
-- without the first block costs one look.
local function held_prefix(key)
  local at = total > 0 and redis.call('ZSCORE', key, block(1))
  if not at then
    return 0, 0
  end
  local lo, hi = 1, total -- block lo is held, scored at; the answer lies in [lo, hi]
  while lo < hi do
    local mid = math.floor((lo + hi + 1) / 2)
    local score = redis.call('ZSCORE', key, block(mid))
    if score then lo, at = mid, score else hi = mid - 1 end
  end
  return lo, tonumber(at)
end

-- Blocks ``from``..total of the chain added to set ``key``, block k scored ``score(k)``; in
-- batches, as a Lua call takes a bounded number of arguments.
local function record(key, from, score)
  for first = from, total, 256 do
    local args = {}
    for k = first, math.min(first + 255, total) do
      args[#args + 1] = score(k)
      args[#args + 1] = block(k)
    end
    redis.call('ZADD', key, unpack(args))
  end
end

-- Whole prompts: the blocks of the prompt whose marker is ``marker`` (nil: not a marker).
local function prompt_size(marker)
  return marker and tonumber(string.match(marker, '^~%d+:(%d+)$'))
end

-- Whole prompts: the node's occupancy, its newest prompt's seq, and what a pick whose held
-- prefix of ``held`` blocks ends in a block scored ``at`` does to the prompt it resumes from:
-- ``freed`` its blocks, ``lost`` its blocks past this prompt's, ``gone`` its seq (or nil).
local function prompts_of(key, held, at)
  local occ = redis.call('ZSCORE', key, '~occ')
  local p = {occ = occ and (-tonumber(occ) - 1) or 0, freed = 0, lost = 0, newest = 0}
  local top = redis.call('ZREVRANGE', key, 0, 0, 'WITHSCORES')
  if top[2] and tonumber(top[2]) > 0 then p.newest = tonumber(top[2]) end
  if held > 0 then
    local size = prompt_size(redis.call('ZREVRANGEBYSCORE', key, at, at, 'LIMIT', 0, 1)[1])
    if size and (size <= held or at ~= p.newest) then
      p.freed, p.gone = size, at
      if size > held then p.lost = size - held end
    end
  end
  return p
end

fill_speeds(eligible)
local load, speeds = 0, 0
for _, c in ipairs(eligible) do
  load = load + c.inflight
  speeds = speeds + c.speed
end
local mean_speed = speeds / n -- speeds are relative: their scale must not weigh against evictions
-- A node far above the mean passes the request on, so a popular prefix spreads instead of
-- pinning its first node; the least loaded node always stays within the bound.
local mean = (load + 1) / n
local bound = math.max(math.ceil((1 + balance) * mean), math.floor(mean + slack))
local within = {}
for _, c in ipairs(eligible) do
  if c.inflight + 1 <= bound then
    local key = KEYS[3 * c.i + 2]
    if not c.capacity or c.capacity < 1 then c.capacity = default_capacity end
    c.held, c.held_at = held_prefix(key)
    local new = total - c.held
    local evicted
    if whole then
      c.prompts = prompts_of(key, c.held, c.held_at)
      local p = c.prompts
      -- The whole prompt is charged; the prompt it resumes from frees its own blocks, and
      -- when that prompt is not contained in this one, its tail is lost too.
      evicted = math.max(0, p.occ - p.freed + total - c.capacity) + p.lost
    else
      evicted = math.max(0, new - (c.capacity - redis.call('ZCARD', key)))
    end
    c.score = (c.inflight * request_blocks + new) * mean_speed / c.speed + evict_cost * evicted
    within[#within + 1] = c
  end
end
local winner = argmin(within, rnd)

local lkey, bkey = KEYS[3 * winner.i + 1], KEYS[3 * winner.i + 2]
redis.call('ZADD', lkey, now + lease_ms, member)
if whole and total > 0 then
  local p = winner.prompts
  local seq = math.max(math.floor(now), p.newest + 1)
  record(bkey, 1, function() return seq end)
  if p.gone then
    -- Its blocks this prompt holds too are now scored seq: the rest were its alone.
    redis.call('ZREMRANGEBYSCORE', bkey, p.gone, p.gone)
  end
  local occ = p.occ - p.freed + total
  redis.call('ZADD', bkey, seq, '~' .. seq .. ':' .. total)
  while occ > winner.capacity do
    local oldest = redis.call('ZRANGEBYSCORE', bkey, 0, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    local at = tonumber(oldest[2])
    if not at or at >= seq then break end -- the new prompt stays, alone if it must
    local marker = redis.call('ZREVRANGEBYSCORE', bkey, at, at, 'LIMIT', 0, 1)[1]
    occ = occ - (prompt_size(marker) or 0)
    redis.call('ZREMRANGEBYSCORE', bkey, 0, at)
  end
  redis.call('ZADD', bkey, -1 - occ, '~occ')
elseif total > winner.held or winner.held_at < now - touch_ms then
  -- The held blocks were used a while ago: all are touched now. Else only the new ones are
  -- added, just below the last held block, as recent as it.
  local from, top = 1, now + total / 2048
  if winner.held > 0 and winner.held_at >= now - touch_ms then
    from, top = winner.held + 1, winner.held_at + winner.held / 2048
  end
  record(bkey, from, function(k) return top - k / 2048 end)
  local over = redis.call('ZCARD', bkey) - winner.capacity
  if over > 0 then
    redis.call('ZREMRANGEBYRANK', bkey, 0, over - 1)
  end
end
return reply(winner.id, winner.inflight + 1, winner.score, n, 0, known, winner.held)
