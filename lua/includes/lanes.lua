--[[
  Lanes and their rankings. A lane is a FIFO group of a flow's items: one per (workload,
  criticality) under workload-aware ordering, one per flow otherwise (LANE_ID record). Each lane's
  head is a member of its ranking set (one per band, or per flow under round-robin), keyed by
  lane_key; queued items enter and leave their lane here, and the counters follow.
  Provides: lane_of(b, rec), rankset_of(b, band, flow), rank_lane(lane, b, old_head, now, m),
  rerank_workload(wid, now), queue_item(id, raw, rec, now), unqueue_item(id, rec, now).
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

local function rankset_of(b, band, flow)
  if b.fair == FAIR_RR then return K_RANK .. band .. RANK_FLOW_SEP .. flow end
  return K_RANK .. band
end

-- Puts the lane's current head into its ranking (removing the old head's entry if it changed).
-- A rank member is the head id followed by the lane id; ties go to the lower head id.
-- Returns the head id, or false when the lane is empty.
local function rank_lane(lane, b, old_head, now, m)
  local parts = parse_lane(lane)
  local rs = rankset_of(b, parts.band, parts.flow)
  local hs = rcall('ZRANGE', K_LANE .. lane, 0, 0, 'WITHSCORES')
  local head = hs[1] or false
  if old_head and old_head ~= head then rcall('ZREM', rs, old_head .. lane) end
  if head then
    rcall('ZADD', rs, fmt(lane_key(b, parts, head, tonumber(hs[2]), m, now)), head .. lane)
    -- A workload's lanes with their current rank members, so re-ranking needs no lane reads.
    if b.order == ORDER_WA and parts.wid ~= '' then
      rcall('HSET', K_WLANES .. parts.wid, lane, head .. lane)
    end
  end
  return head
end

-- Re-ranks every queued lane of a workload: its counters just changed. One read of its metrics,
-- one of its lanes' rank members, and one ZADD per ranking set, however many lanes it has.
local function rerank_workload(wid, now)
  local m = { workload_metrics(wid, now) }
  local lanes = rcall('HGETALL', K_WLANES .. wid)
  local adds = {}
  for i = 1, #lanes, 2 do
    local lane, member = lanes[i], lanes[i + 1]
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
end

local function queue_item(id, raw, rec, now)
  local b = band_cfg(rec.band)
  local lane = lane_of(b, rec)
  local lk = K_LANE .. lane
  local old_head = rcall('ZRANGE', lk, 0, 0)[1] or false
  rcall('HSET', K_ITEMS, id, raw)
  if b.order == ORDER_EDF then
    rcall('ZADD', lk, int(rec.deadline), id)
  else
    rcall('ZADD', lk, id, id)  -- the zero-padded id parses as its own sequence number
  end
  rcall('ZADD', K_DEADLINES, int(rec.deadline), id)
  if not old_head then
    if b.order == ORDER_WA and rec.wid ~= '' then rcall('SADD', K_RERANK, rec.wid) end
    if b.fair == FAIR_RR then rcall('ZADD', K_FLOWS .. rec.band, 0, rec.flow) end
  end
  -- A new item becomes the head only of a new lane, or of an EDF lane with an earlier deadline.
  if not old_head or b.order == ORDER_EDF then rank_lane(lane, b, old_head, now, nil) end
  adjust_counts(rec, 1)
end

-- Takes a queued item out of every queue structure (not out of its owner's set).
local function unqueue_item(id, rec, now)
  local b = band_cfg(rec.band)
  local lane = lane_of(b, rec)
  local lk = K_LANE .. lane
  local old_head = rcall('ZRANGE', lk, 0, 0)[1]
  rcall('ZREM', lk, id)
  rcall('ZREM', K_DEADLINES, id)
  if old_head == id then
    rcall('HDEL', K_ITEMS, id)
    local head = rank_lane(lane, b, id, now, nil)
    if not head then
      if b.order == ORDER_WA and rec.wid ~= '' then
        local wl = K_WLANES .. rec.wid
        rcall('HDEL', wl, lane)
        if rcall('HLEN', wl) == 0 then rcall('SREM', K_RERANK, rec.wid) end
      end
      if b.fair == FAIR_RR and rcall('EXISTS', rankset_of(b, rec.band, rec.flow)) == 0 then
        rcall('ZREM', K_FLOWS .. rec.band, rec.flow)
      end
    end
  else
    rcall('HDEL', K_ITEMS, id)
  end
  adjust_counts(rec, -1)
end
