--[[
  Lanes and their rankings. A lane is a FIFO group of a flow's items: one per (workload,
  criticality) under workload-aware ordering, one per flow otherwise (LANE_ID record). fcfs and
  workload-aware lanes are lists (they are in arrival order by construction); edf lanes are zsets
  by deadline. Each lane's head is a member of its ranking set (one per band, or per flow under
  round-robin), keyed by lane_key; queued items enter and leave their lane here, and the counters
  follow.
  A transition that re-ranks a workload anyway (rerank_workload, after its counters changed)
  passes `deferred`: a new best lane of that workload is then only recorded in its group, and
  ranked once, by the re-rank.
  Provides: lane_of(b, rec), rankset_of(b, band, flow), rank_lane(lane, b, old_head, now,
  deferred, head, in_lane, parts),
  rerank_workload(wid, now), queue_item(id, raw, rec, now, deferred), unqueue_item(id, rec, now,
  is_head, deferred).
  Needs: contract, config, items, registry, ordering, counters.
]]
-- @include contract
-- @include config
-- @include items
-- @include registry
-- @include ordering
-- @include counters

local function lane_of(b, rec)
  if b.order == ORDER_WA then return encode_lane(rec.band, rec.flow, rec.wid, rec.crit) end
  return encode_lane(rec.band, rec.flow)
end

local function rankset_of(b, band, flow)
  if b.fair == FAIR_RR then return K_RANK .. band .. RANK_FLOW_SEP .. flow end
  return K_RANK .. band
end

-- edf and slo-deadline lanes are zsets by their key; fcfs and workload-aware ones are lists.
local function keyed(b)
  return b.order == ORDER_EDF or b.order == ORDER_SLO
end

-- An item's key inside a keyed lane: its TTL deadline (edf), its SLO deadline (slo-deadline;
-- without an SLO, after every item with one, in arrival order).
local function key_in_lane(b, id, rec)
  if b.order == ORDER_EDF then return rec.enq + rec.ttl end
  if rec.slo > 0 then return rec.enq + rec.slo end
  return NO_SLO_KEY + tonumber(id)
end

-- The lane's head and its key inside the lane (its sequence, or its deadline for edf).
local function lane_head(lk, b)
  if keyed(b) then
    local hs = rcall('ZRANGE', lk, '0', '0', 'WITHSCORES')
    return hs[1] or false, tonumber(hs[2])
  end
  local head = rcall('LINDEX', lk, '0')
  if not head then return false, nil end
  return head, tonumber(head)
end

-- Ranking: lanes' heads into their ranking sets, through workload groups (private helpers in
-- the do block keep them off the library's main-chunk locals, scripts.py library()).
local rank_lane, rerank_workload
do
  -- A workload's workload-aware lanes in one ranking set form a group, by the head's part of the
  -- key; the ranking set holds only the group's best lane, keyed by the workload's part plus that
  -- head part. So a change of the workload's counters re-ranks one member per ranking set,
  -- however many lanes it has. The best, and how many lanes the group has, are kept in the
  -- workload's hash (includes/registry.lua), so re-ranking reads nothing more; only a group of
  -- two or more lanes has a zset ranking them (wrank:<suffix>|<wid>): most workloads queue in
  -- one lane per set, and their lanes come and go with no command for the group.
  local function rank_suffix(b, parts)
    if b.fair == FAIR_RR then return parts.band .. RANK_FLOW_SEP .. parts.flow end
    return parts.band
  end

  local function better(a, b)
    return a.key < b.key or (a.key == b.key and a.member < b.member)
  end

  -- Writes the group's best into its ranking set with the workload's current part of the key.
  -- Keys are whole numbers (includes/ordering.lua) and go to ZADD as text, like every number here:
  -- Redis would format a Lua number with snprintf('%.17g') each call.
  local function rank_group(b, suffix, best, ema, rate)
    -- (A score is rarely met again: formatted, not remembered by int.)
    local score = workload_key(ema, rate, b) + best.key
    rcall('ZADD', K_RANK .. suffix, TEXT_OF[score] or string.format('%d', score), best.member)
  end

  -- The group's best after the lane's head went from `old_head` to `head` (either false: the
  -- lane was empty, or is now), its count of lanes going from `was` to `n`, given the best
  -- before (`old`, nil when the group was empty), `gone` (the lane's old member) and `mine` (its
  -- new one).
  local function new_best(gk, old, gone, mine, was, n)
    if n == 0 then return nil end
    if n == 1 then
      if was <= 1 then return mine end
      -- Two lanes, and this one emptied: the other is the best, and the zset goes (both popped).
      local hs = rcall('ZPOPMIN', gk, '2')
      if old.member ~= gone then return old end
      if hs[1] == gone then return { key = tonumber(hs[4]), member = hs[3] } end
      return { key = tonumber(hs[2]), member = hs[1] }
    end
    if was == 1 then
      -- A second lane: the zset starts with both.
      rcall('ZADD', gk, int(old.key), old.member, int(mine.key), mine.member)
    else
      if gone and gone ~= (mine and mine.member) then rcall('ZREM', gk, gone) end
      if mine then rcall('ZADD', gk, int(mine.key), mine.member) end
    end
    if old and gone and old.member == gone then
      -- The best lane lost its head: the next best is whatever the group now ranks first.
      local hs = rcall('ZRANGE', gk, '0', '0', 'WITHSCORES')
      return { key = tonumber(hs[2]), member = hs[1] }
    end
    if mine and (not old or better(mine, old)) then return mine end
    return old
  end

  -- Returns whether the workload still has a lane in the ranking set (ranked there, or to be
  -- ranked by the deferred re-rank).
  local function rank_grouped(lane, parts, b, old_head, head, now, deferred)
    local suffix = rank_suffix(b, parts)
    local old = groups_of(parts.wid)[suffix]
    local was = old and old.n or 0
    local n = was
    if not old_head then n = n + 1 elseif not head then n = n - 1 end
    local mine = head and { key = head_key(b, parts.crit, head), member = head .. lane }
    local best = new_best(K_GROUP .. suffix .. GROUP_SEP .. parts.wid, old,
      old_head and old_head .. lane, mine, was, n)
    if best == old then
      -- The same best; only the group's count may have moved.
      if old and was ~= n then
        old.n = n
        group_set(parts.wid, suffix, old)
      end
      return n > 0
    end
    if old and (not best or old.member ~= best.member) then rcall('ZREM', K_RANK .. suffix, old.member) end
    if best then best.n = n end
    group_set(parts.wid, suffix, best)
    if best and not deferred then
      rank_group(b, suffix, best, workload_metrics(parts.wid, now))
    end
    return n > 0
  end

  -- Puts the lane's current head into its ranking (removing the old head's entry if it changed).
  -- A rank member is the head id followed by the lane id; ties go to the lower head id. `head` and
  -- `in_lane` are the new head and its key in the lane when the caller knows them (else read);
  -- `parts` the lane's fields (band, flow, wid, crit: a record of one of its items will do), else
  -- parsed from the lane id. Returns the head id, or false when the lane is empty; and, for a
  -- lane in a workload's group, whether the group keeps a lane in the ranking set.
  function rank_lane(lane, b, old_head, now, deferred, head, in_lane, parts)
    parts = parts or parse_lane(lane)
    if head == nil then head, in_lane = lane_head(K_LANE .. lane, b) end
    if b.order == ORDER_WA and parts.wid ~= '' then
      return head, rank_grouped(lane, parts, b, old_head, head, now, deferred)
    end
    local rs = rankset_of(b, parts.band, parts.flow)
    if old_head and old_head ~= head then rcall('ZREM', rs, old_head .. lane) end
    if head then rcall('ZADD', rs, lane_key(b, parts, head, in_lane, nil, now), head .. lane) end
    return head
  end

  -- Re-ranks every group of a workload: its counters just changed. One ZADD per ranking set.
  -- A ranking suffix's band is remembered between calls (a pattern match each time costs more
  -- than the rest of the loop); bounded, cleared past SUFFIXES_KEPT_MAX suffixes.
  local SUFFIX_BAND, SUFFIXES_KEPT, SUFFIXES_KEPT_MAX = {}, 0, 4096
  local band_pattern = '^[^' .. RANK_FLOW_SEP .. ']+'
  local function band_of(suffix)
    local band = SUFFIX_BAND[suffix]
    if band then return band end
    band = string.match(suffix, band_pattern)
    if SUFFIXES_KEPT >= SUFFIXES_KEPT_MAX then SUFFIX_BAND, SUFFIXES_KEPT = {}, 0 end
    SUFFIX_BAND[suffix], SUFFIXES_KEPT = band, SUFFIXES_KEPT + 1
    return band
  end
  function rerank_workload(wid, now)
    local ema, rate = workload_metrics(wid, now)
    for suffix, best in pairs(groups_of(wid)) do
      rank_group(band_cfg(band_of(suffix)), suffix, best, ema, rate)
    end
  end
end

local function queue_item(id, raw, rec, now, deferred)
  local b = band_cfg(rec.band)
  local lane = lane_of(b, rec)
  local lk = K_LANE .. lane
  item_put(id, raw)
  local deadline = rec.enq + rec.ttl
  -- Deadline buckets are swept by maintain.lua; each expires once no sweep can need it.
  -- The expiry is relative to the pool clock (tests run it on their own time).
  local sec = math.floor(deadline / 1000)
  local dk = K_DEADLINES .. int(sec)
  if rcall('RPUSH', dk, id) == 1 then
    rcall('PEXPIRE', dk, int((sec + 1) * 1000 - now + DEADLINE_KEEP_MS))
  end
  local new_lane, in_lane, old_head
  if keyed(b) then
    local hs = rcall('ZRANGE', lk, '0', '0', 'WITHSCORES')
    old_head = hs[1] or false
    in_lane = key_in_lane(b, id, rec)
    rcall('ZADD', lk, int(in_lane), id)
    new_lane = not old_head
    if old_head and in_lane < tonumber(hs[2]) then
      -- An earlier deadline heads its lane; on a tie the lower id, the old head, stays in front.
      rank_lane(lane, b, old_head, now, deferred, id, in_lane, rec)
    end
  else
    in_lane = NUMBER_OF[id] or tonum(id)
    new_lane = rcall('RPUSH', lk, id) == 1
  end
  if new_lane then
    if b.fair == FAIR_RR then rcall('ZADD', K_FLOWS .. rec.band, '0', rec.flow) end
    rank_lane(lane, b, false, now, deferred, id, in_lane, rec)
  end
  adjust_counts(rec, 1)
end

-- Takes a queued item out of every queue structure (its deadline bucket entry goes stale and is
-- skipped by the sweep). `is_head` when the caller knows the item heads its lane (it was picked
-- from a ranking).
local function unqueue_item(id, rec, now, is_head, deferred)
  local b = band_cfg(rec.band)
  local lane = lane_of(b, rec)
  local lk = K_LANE .. lane
  if keyed(b) then
    if not is_head then is_head = rcall('ZRANGE', lk, '0', '0')[1] == id end
    rcall('ZREM', lk, id)
  elseif is_head then
    rcall('LPOP', lk)
  else
    is_head = rcall('LINDEX', lk, '0') == id
    if is_head then rcall('LPOP', lk) else rcall('LREM', lk, '1', id) end
  end
  item_del(id)
  if is_head then
    local head, grouped = rank_lane(lane, b, id, now, deferred, nil, nil, rec)
    -- The flow leaves the band's round when its ranking set empties. A workload's other lane
    -- there keeps it in, even when a deferred re-rank has not ranked that lane yet (the set
    -- is empty until it does).
    if not head and not grouped and b.fair == FAIR_RR
      and rcall('EXISTS', rankset_of(b, rec.band, rec.flow)) == 0 then
      rcall('ZREM', K_FLOWS .. rec.band, rec.flow)
    end
  end
  adjust_counts(rec, -1)
end
