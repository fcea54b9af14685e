--[[
  Dispatch and the other ends of an item's life. Picks the next item by strict band priority,
  then the band's fairness policy, then lane ranking; moves it in flight while the concurrency
  detector reports capacity; tells its owner (in the reply, or through the owner's inbox); frees
  in-flight slots; removes queued items for good; builds replies.
  Provides: notify(owner, id, status, wait, caller, out), dispatch_item(id, caller, now, out),
  pick_next(), dispatch_ready(caller, now, out), release_item(id, now), drop_queued(id, now),
  reply(status, a, b, out), flush_state() (writes the counters kept during the call: every
  script that changes them calls it before it returns).
  Needs: contract, config, registry, counters, lanes.
]]
-- @include contract
-- @include config
-- @include registry
-- @include counters
-- @include lanes

-- Outcomes reach the waiting request: directly in the reply when the caller owns it, otherwise
-- through the owner's inbox (a list it blocks on), so no polling decides dispatch latency.
local INBOX_TTL_MS = 600000
local function notify(owner, id, status, wait, caller, out)
  local msg = encode_delivery(id, status, wait)
  if owner == caller then
    out[#out + 1] = msg
  else
    local ik = K_INBOX .. owner
    rcall('RPUSH', ik, msg)
    rcall('PEXPIRE', ik, INBOX_TTL_MS)
  end
end

-- `id` heads its lane (it was picked from a ranking).
local function dispatch_item(id, caller, now, out)
  local rec = parse_item(rcall('HGET', K_ITEMS, id))
  local wait = math.max(now - rec.enq, 0)
  -- The wait changes the workload's score first, so its lanes, the one this item leaves
  -- included, are ranked once, by the re-rank below.
  record_wait(rec.wid, wait / 1000.0)
  local rerank = rec.wid ~= ''
  local emptied = unqueue_item(id, rec, now, true, rerank)
  stat_add('inflight', 1)
  if rec.lease == 0 then
    rcall('HSET', K_INFLIGHT, id, encode_inflight(rec.owner, rec.wid, now))
  else
    rcall('HSET', K_INFLIGHT, id, encode_inflight(rec.owner, rec.wid, now, 1))
    -- From now on a gateway holds the slot, not the replica: its lease alone ends it, so a
    -- replica that stops or dies does not take back tickets that are still in use.
    rcall('ZADD', K_LEASES, int(now + rec.lease), id)
    rcall('SREM', K_OWN .. rec.owner, id)
  end
  if rerank then rerank_workload(rec.wid, now, emptied) end
  notify(rec.owner, id, S_DISPATCHED, wait, caller, out)
end

-- The next item by strict band priority, then the band's fairness policy, then lane ranking.
local function pick_next()
  local band = rcall('ZREVRANGE', K_BANDS, 0, 0)[1]
  if not band then return nil end
  local b = band_cfg(band)
  local rs
  if b.fair == FAIR_RR then
    local fk = K_FLOWS .. band
    -- The cursor outlives the band's queue, so a band that empties and refills keeps its turn.
    local cur = rcall('HGET', K_RRCURSOR, band)
    local flow = false
    if cur then flow = rcall('ZRANGEBYLEX', fk, '(' .. cur, '+', 'LIMIT', 0, 1)[1] end
    if not flow then flow = rcall('ZRANGE', fk, 0, 0)[1] end
    rcall('HSET', K_RRCURSOR, band, flow)
    rs = rankset_of(b, band, flow)
  else
    rs = rankset_of(b, band, nil)
  end
  return string.sub(rcall('ZRANGE', rs, 0, 0)[1], 1, ID_WIDTH)
end

-- Dispatches while the concurrency detector reports capacity. Capacity is checked and taken in
-- the same atomic script, so replicas can never overshoot the global limit.
local function dispatch_ready(caller, now, out)
  if now < CFG.hold then return end
  local st = stats()
  -- With nothing queued there is no band to pick from: no need to look.
  while st.qn > 0 and st.inflight < CFG.limit do
    local id = pick_next()
    if not id then break end
    dispatch_item(id, caller, now, out)
  end
end

-- Frees an in-flight slot. Idempotent: returns false when the item is not in flight.
local function release_item(id, now)
  local raw = rcall('HGET', K_INFLIGHT, id)
  if not raw then return false end
  local f = parse_inflight(raw)
  rcall('HDEL', K_INFLIGHT, id)
  stat_add('inflight', -1)
  -- Only a leased slot can have a lease entry; any may be in its owner's set (reregister.lua
  -- adds a slot the replica says it holds itself).
  rcall('SREM', K_OWN .. f.owner, id)
  if f.leased then rcall('ZREM', K_LEASES, id) end
  workload_done(f.wid, now)
  return true
end

-- Removes a queued item for good (cancelled, expired, reclaimed). Returns its record or false.
local function drop_queued(id, now)
  local raw = rcall('HGET', K_ITEMS, id)
  if not raw then return false end
  local rec = parse_item(raw)
  unqueue_item(id, rec, now)
  rcall('SREM', K_OWN .. rec.owner, id)
  workload_done(rec.wid, now)
  return rec
end

local function reply(status, a, b, out)
  local r = { status, a or '', b or '' }
  for i = 1, #out do r[#r + 1] = out[i] end
  return r
end

local function flush_state()
  flush_counts()
  flush_workloads()
end
