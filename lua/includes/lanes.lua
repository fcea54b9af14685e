--[[
  Lanes and their rankings. A lane is a FIFO group of a flow's items: one per (workload,
  criticality) under workload-aware ordering, one per flow otherwise (LANE_ID record). Each lane's
  head is a member of its ranking set (one per band, or per flow under round-robin), keyed by
  lane_key; queued items enter and leave their lane here, and the counters follow.
  A transition that re-ranks a workload's lanes anyway (rerank_workload, after its counters
  changed) passes `deferred`: the changed lane of that workload is then only recorded in the
  workload's lane list, and ranked once, by the re-rank.
  Provides: lane_of(b, rec), wlanes_of(wid) -> { lane = rank member }, forget_lanes(wid) after
  the workload's lane list was deleted, rankset_of(b, band, flow),
  rank_lane(lane, b, old_head, now, deferred, head, in_lane), rerank_workload(wid, now, emptied),
  queue_item(id, raw, rec, now, deferred), unqueue_item(id, rec, now, is_head, deferred) ->
  whether a deferred call emptied a lane of the workload.
  Needs: contract, config, registry, ordering, counters.
]]
-- @include contract
-- @include config
-- @include registry
-- @include ordering
-- @include counters

local function lane_of(b, rec)
  if b.order == ORDER_WA then return encode_lane(rec.band, rec.flow, rec.wid, rec.crit) end
  return encode_lane(rec.band, rec.flow)
end

-- A workload's lane list (wlanes:<wid>, lane -> rank member), read at most once per call and
-- kept in step with every write, which still goes to Redis at once.
local WLANES = {}
local function wlanes_of(wid)
  local m = WLANES[wid]
  if not m then
    m = {}
    local v = rcall('HGETALL', K_WLANES .. wid)
    for i = 1, #v, 2 do m[v[i]] = v[i + 1] end
    WLANES[wid] = m
  end
  return m
end

local function wlanes_set(wid, lane, member)
  if member then
    rcall('HSET', K_WLANES .. wid, lane, member)
  else
    rcall('HDEL', K_WLANES .. wid, lane)
  end
  local m = WLANES[wid]
  if m then m[lane] = member end
end

local function forget_lanes(wid)
  WLANES[wid] = nil
end

local function rankset_of(b, band, flow)
  if b.fair == FAIR_RR then return K_RANK .. band .. RANK_FLOW_SEP .. flow end
  return K_RANK .. band
end

-- Puts the lane's current head into its ranking (removing the old head's entry if it changed).
-- A rank member is the head id followed by the lane id; ties go to the lower head id. `head` and
-- `in_lane` are the new head and its key in the lane when the caller knows them (else read).
-- Returns the head id, or false when the lane is empty.
local function rank_lane(lane, b, old_head, now, deferred, head, in_lane)
  local parts = parse_lane(lane)
  local rs = rankset_of(b, parts.band, parts.flow)
  if head == nil then
    local hs = rcall('ZRANGE', K_LANE .. lane, 0, 0, 'WITHSCORES')
    head, in_lane = hs[1] or false, tonumber(hs[2])
  end
  if old_head and old_head ~= head then rcall('ZREM', rs, old_head .. lane) end
  if head then
    -- A workload's lanes with their current rank members, so re-ranking needs no lane reads.
    local listed = b.order == ORDER_WA and parts.wid ~= ''
    if listed then wlanes_set(parts.wid, lane, head .. lane) end
    if not (listed and deferred) then
      rcall('ZADD', rs, fmt(lane_key(b, parts, head, in_lane, nil, now)), head .. lane)
    end
  end
  return head
end

-- Re-ranks every queued lane of a workload: its counters just changed. One read of its lanes'
-- rank members, and one ZADD per ranking set, however many lanes it has. `emptied` when the
-- caller just emptied one of its lanes: with none left, the workload leaves the rerank set.
local function rerank_workload(wid, now, emptied)
  local m = { workload_metrics(wid, now) }
  local lanes = wlanes_of(wid)
  local adds, any = {}, false
  for lane, member in pairs(lanes) do
    any = true
    local parts = parse_lane(lane)
    local b = band_cfg(parts.band)
    local rs = rankset_of(b, parts.band, parts.flow)
    local head = string.sub(member, 1, ID_WIDTH)
    local batch = adds[rs]
    if not batch then
      batch = {}
      adds[rs] = batch
    end
    batch[#batch + 1] = fmt(lane_key(b, parts, head, nil, m, now))
    batch[#batch + 1] = member
  end
  for rs, batch in pairs(adds) do rcall('ZADD', rs, unpack(batch)) end
  if emptied and not any then rcall('SREM', K_RERANK, wid) end
end

local function queue_item(id, raw, rec, now, deferred)
  local b = band_cfg(rec.band)
  local lane = lane_of(b, rec)
  local lk = K_LANE .. lane
  local hs, old_head
  if b.order == ORDER_WA and rec.wid ~= '' then
    -- The workload's lane list has the lane's head (its re-rank reads the list anyway).
    local member = wlanes_of(rec.wid)[lane]
    old_head = member and string.sub(member, 1, ID_WIDTH) or false
  else
    hs = rcall('ZRANGE', lk, 0, 0, 'WITHSCORES')
    old_head = hs[1] or false
  end
  rcall('HSET', K_ITEMS, id, raw)
  local in_lane
  if b.order == ORDER_EDF then
    in_lane = rec.deadline
    rcall('ZADD', lk, int(rec.deadline), id)
  else
    in_lane = tonumber(id)
    rcall('ZADD', lk, id, id)  -- the zero-padded id parses as its own sequence number
  end
  rcall('ZADD', K_DEADLINES, int(rec.deadline), id)
  if not old_head then
    if b.order == ORDER_WA and rec.wid ~= '' then rcall('SADD', K_RERANK, rec.wid) end
    if b.fair == FAIR_RR then rcall('ZADD', K_FLOWS .. rec.band, 0, rec.flow) end
    rank_lane(lane, b, false, now, deferred, id, in_lane)
  elseif b.order == ORDER_EDF and rec.deadline < tonumber(hs[2]) then
    -- An earlier deadline heads its lane; on a tie the lower id, the old head, stays in front.
    rank_lane(lane, b, old_head, now, deferred, id, in_lane)
  end
  adjust_counts(rec, 1)
end

-- Takes a queued item out of every queue structure (not out of its owner's set). `is_head` when
-- the caller knows the item heads its lane (it was picked from a ranking).
local function unqueue_item(id, rec, now, is_head, deferred)
  local b = band_cfg(rec.band)
  local lane = lane_of(b, rec)
  local lk = K_LANE .. lane
  if not is_head then is_head = rcall('ZRANGE', lk, 0, 0)[1] == id end
  local emptied = false
  rcall('ZREM', lk, id)
  rcall('ZREM', K_DEADLINES, id)
  rcall('HDEL', K_ITEMS, id)
  if is_head then
    local head = rank_lane(lane, b, id, now, deferred)
    if not head then
      if b.order == ORDER_WA and rec.wid ~= '' then
        wlanes_set(rec.wid, lane, nil)
        -- After a deferred call, the re-rank that follows sees whether any lane is left.
        if deferred then
          emptied = true
        elseif rcall('HLEN', K_WLANES .. rec.wid) == 0 then
          rcall('SREM', K_RERANK, rec.wid)
        end
      end
      if b.fair == FAIR_RR and rcall('EXISTS', rankset_of(b, rec.band, rec.flow)) == 0 then
        rcall('ZREM', K_FLOWS .. rec.band, rec.flow)
      end
    end
  end
  adjust_counts(rec, -1)
  return emptied
end
