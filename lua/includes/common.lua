--[[
  Shared helpers, pulled into every script by the loader (sidecar/store/scripts.py).
  KEYS[1] of every script is the pool prefix 'as:{<pool>}:'; all keys below derive from it, so a
  script touches exactly one cluster slot. Key layout: sidecar/keys.py (KEY_SUFFIXES).

  Status codes (first element of every reply), mirrored by sidecar/outcome.py ScriptStatus:
    0 queued, 1 dispatched, 2 rejected_capacity, 3 evicted_ttl, 4 evicted_cancelled,
    5 evicted_other, 6 rejected_other, 7 not found (idempotent no-op), -1 no config.

  Records ('|'-separated; ids are escaped by the caller and never contain '|'):
    queued item   owner|band|flow|workload|criticality|bytes|enqueued_ms|deadline_ms|lease_ms
    in-flight     owner|workload|dispatched_ms
  Times are milliseconds relative to the pool's epoch (cfg.epoch), read from Redis TIME.
]]
local rcall = redis.call
local P = KEYS[1]
local S_QUEUED, S_DISPATCHED, S_REJECTED_CAPACITY = 0, 1, 2
local S_EVICTED_TTL, S_EVICTED_CANCELLED, S_EVICTED_OTHER = 3, 4, 5
local S_NOT_FOUND, S_NO_CONFIG = 7, -1
local K_CFG, K_STATS, K_ITEMS, K_INFLIGHT = P .. 'cfg', P .. 'stats', P .. 'items', P .. 'inflight'
local K_DEADLINES, K_LEASES, K_BANDS = P .. 'deadlines', P .. 'leases', P .. 'bands'
local K_WORKLOADS, K_RERANK, K_FLOWLEN = P .. 'workloads', P .. 'rerank', P .. 'flowlen'
local K_REPLICAS, K_RRCURSOR = P .. 'replicas', P .. 'rrcursor'
-- Item ids are zero-padded sequence numbers: fixed width makes lexicographic order numeric order.
local ID_WIDTH = 16
local function item_id(seq) return string.format('%016d', seq) end

local function fmt(x) return string.format('%.17g', x) end
-- Numbers go to Redis formatted by us: Lua prints large ones with %.14g and -0 as '-0'.
local function int(x) return string.format('%d', x) end

local function split(s)
  local out, i = {}, 1
  while true do
    local j = string.find(s, '|', i, true)
    if not j then
      out[#out + 1] = string.sub(s, i)
      return out
    end
    out[#out + 1] = string.sub(s, i, j - 1)
    i = j + 1
  end
end

-- Configuration ------------------------------------------------------------------------------
local CFG = {}
local function load_cfg()
  local v = rcall('HMGET', K_CFG, 'epoch', 'limit', 'maxReq', 'maxBytes', 'win', 'alpha', 'idle',
    'maxTracked', 'hold')
  if not v[1] then return false end
  -- After the pool's data was lost (Redis restarted empty), nothing is dispatched before this
  -- pool time, so every live replica can re-register what it still holds first (configure.lua).
  CFG.hold = tonumber(v[9]) or 0
  CFG.epoch, CFG.limit = tonumber(v[1]), tonumber(v[2])
  CFG.maxReq, CFG.maxBytes = tonumber(v[3]), tonumber(v[4])
  CFG.win, CFG.alpha, CFG.idle, CFG.maxTracked = tonumber(v[5]), tonumber(v[6]), tonumber(v[7]),
    tonumber(v[8])
  return true
end

local BANDS = {}
local function band_cfg(band)
  local b = BANDS[band]
  if b then return b end
  local raw = rcall('HGET', K_CFG, 'band:' .. band)
  -- An unlisted negative band takes defaultNegativePriorityBand ('band:-*') when one is configured.
  if not raw and (tonumber(band) or 0) < 0 then raw = rcall('HGET', K_CFG, 'band:-*') end
  if not raw then raw = rcall('HGET', K_CFG, 'band:*') end
  local f = split(raw)
  b = { fair = f[1], order = f[2], maxReq = tonumber(f[3]), maxBytes = tonumber(f[4]),
    wW = tonumber(f[5]), cW = tonumber(f[6]), rW = tonumber(f[7]), maxWait = tonumber(f[8]),
    maxRate = tonumber(f[9]), aging = tonumber(f[10]) }
  BANDS[band] = b
  return b
end

-- The one clock: Redis TIME, unless a test passes an override (absolute ms).
local function clock(override)
  local abs
  if override and override ~= '' then
    abs = tonumber(override)
  else
    local t = rcall('TIME')
    abs = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return abs - CFG.epoch
end

-- Workload registry ----------------------------------------------------------------------------
local function wkey(wid)
  if wid == '' then return P .. 'anon' end
  return P .. 'w:' .. wid
end

-- Two-bucket sliding window: the previous bucket's count weighted by how much of it still lies
-- inside the window, plus the current bucket. A first request reads as 1/window, not 1/age.
local function rate_from(bi, c, p, now)
  if not bi then return 0 end
  local W = CFG.win
  local idx = math.floor(now / W)
  local f = (now - idx * W) / W
  local est
  if bi == idx then
    est = p * (1 - f) + c
  elseif bi == idx - 1 then
    est = c * (1 - f)
  else
    est = 0
  end
  return est / (W / 1000)
end

local function count_request(wid, now)
  local k = wkey(wid)
  local v = rcall('HMGET', k, 'bi', 'c')
  local idx = math.floor(now / CFG.win)
  local bi = tonumber(v[1])
  if bi == idx then
    rcall('HINCRBY', k, 'c', 1)
  elseif bi == idx - 1 then
    rcall('HSET', k, 'bi', int(idx), 'p', v[2], 'c', 1)
  else
    rcall('HSET', k, 'bi', int(idx), 'p', 0, 'c', 1)
  end
end

-- Tracked workloads: a known id, or a new one while under the cap. Others score as anonymous.
local function track(wid, now)
  if wid == '' then return '' end
  if rcall('ZSCORE', K_WORKLOADS, wid) == false and CFG.maxTracked > 0
    and rcall('ZCARD', K_WORKLOADS) >= CFG.maxTracked then
    return ''
  end
  rcall('ZADD', K_WORKLOADS, int(now), wid)
  return wid
end

local function record_wait(wid, wait_s)
  local k = wkey(wid)
  local v = rcall('HMGET', k, 'ema', 'n')
  local n = tonumber(v[2]) or 0
  local ema
  if n == 0 then
    ema = wait_s
  else
    ema = CFG.alpha * wait_s + (1 - CFG.alpha) * tonumber(v[1])
  end
  rcall('HSET', k, 'ema', fmt(ema), 'n', int(n + 1))
end

local function workload_done(wid, now)
  local k = wkey(wid)
  -- An expired or never-tracked workload has no counters to decrement; do not resurrect it.
  if wid ~= '' and rcall('EXISTS', k) == 0 then return end
  if rcall('HINCRBY', k, 'active', -1) < 0 then rcall('HSET', k, 'active', 0) end
  if wid ~= '' then rcall('ZADD', K_WORKLOADS, 'XX', int(now), wid) end
end

-- A workload's average wait (s) and request rate (req/s) at `now`; zero for anonymous traffic,
-- which is scored as a workload with no history.
local function workload_metrics(wid, now)
  if wid == '' then return 0, 0 end
  local v = rcall('HMGET', wkey(wid), 'bi', 'c', 'p', 'ema', 'n')
  local ema = 0
  if (tonumber(v[5]) or 0) > 0 then ema = tonumber(v[4]) end
  return ema, rate_from(tonumber(v[1]), tonumber(v[2]) or 0, tonumber(v[3]) or 0, now)
end

-- The workload-aware score; Python twin: WorkloadAwareOrdering.score (same operations, same order).
local function wa_score(ema, rate, crit, b)
  local wait_part = math.min(ema / b.maxWait, 1.0) * b.wW
  local crit_part = (crit / 5.0) * b.cW
  local rate_part = math.min(rate / b.maxRate, 1.0) * b.rW
  return wait_part + crit_part - rate_part
end

-- Items, lanes and rankings ----------------------------------------------------------------------
local function parse_item(raw)
  local f = split(raw)
  return { owner = f[1], band = f[2], flow = f[3], wid = f[4], crit = tonumber(f[5]),
    bytes = tonumber(f[6]), enq = tonumber(f[7]), deadline = tonumber(f[8]), lease = tonumber(f[9]) }
end

-- Lanes: FIFO groups inside a flow. Workload-aware: one per (workload, criticality); others: one per flow.
local function lane_of(b, rec)
  if b.order == 'wa' then return rec.band .. '|' .. rec.flow .. '|' .. rec.wid .. '|' .. rec.crit end
  return rec.band .. '|' .. rec.flow
end

local function rankset_of(b, band, flow)
  if b.fair == 'rr' then return P .. 'rank:' .. band .. ':' .. flow end
  return P .. 'rank:' .. band
end

-- Lane ids are 'band|flow' (fcfs, edf) or 'band|flow|workload|criticality' (workload-aware).
-- Lower key dispatches first; ties go to the lower head id (the rank member starts with it).
-- `in_lane` is the head's key inside its lane (seq, or the deadline for edf); `m` optionally holds
-- the workload's metrics {ema, rate} when the caller already read them.
local function lane_key(b, parts, head, in_lane, m, now)
  if b.order ~= 'wa' then return in_lane end
  local ema, rate
  if m then
    ema, rate = m[1], m[2]
  else
    ema, rate = workload_metrics(parts[3], now)
  end
  local score = wa_score(ema, rate, tonumber(parts[4]), b)
  -- With agingWeight 0 (the default) the age term is exactly 0: skip reading the head's record.
  if b.aging == 0 then return -score end
  local enq = parse_item(rcall('HGET', K_ITEMS, head)).enq
  local age_part = b.aging * (enq / 1000.0) / b.maxWait
  return -(score - age_part)
end

-- Puts the lane's current head into its ranking (removing the old head's entry if it changed).
-- Returns the head id, or false when the lane is empty.
local function rank_lane(lane, b, old_head, now, m)
  local parts = split(lane)
  local rs = rankset_of(b, parts[1], parts[2])
  local hs = rcall('ZRANGE', P .. 'lane:' .. lane, 0, 0, 'WITHSCORES')
  local head = hs[1] or false
  if old_head and old_head ~= head then rcall('ZREM', rs, old_head .. lane) end
  if head then
    rcall('ZADD', rs, fmt(lane_key(b, parts, head, tonumber(hs[2]), m, now)), head .. lane)
    -- A workload's lanes with their current rank members, so re-ranking needs no lane reads.
    if b.order == 'wa' and parts[3] ~= '' then
      rcall('HSET', P .. 'wlanes:' .. parts[3], lane, head .. lane)
    end
  end
  return head
end

-- Re-ranks every queued lane of a workload: its counters just changed. One read of its metrics,
-- one of its lanes' rank members, and one ZADD per ranking set, however many lanes it has.
local function rerank_workload(wid, now)
  local m = { workload_metrics(wid, now) }
  local lanes = rcall('HGETALL', P .. 'wlanes:' .. wid)
  local adds = {}
  for i = 1, #lanes, 2 do
    local lane, member = lanes[i], lanes[i + 1]
    local parts = split(lane)
    local b = band_cfg(parts[1])
    local rs = rankset_of(b, parts[1], parts[2])
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

local function adjust_counts(rec, sign)
  local bk = P .. 'band:' .. rec.band
  rcall('HINCRBY', K_STATS, 'qn', sign)
  rcall('HINCRBY', K_STATS, 'qbytes', int(sign * rec.bytes))
  rcall('HINCRBY', bk, 'bytes', int(sign * rec.bytes))
  local fk = rec.band .. '|' .. rec.flow
  if rcall('HINCRBY', K_FLOWLEN, fk, sign) <= 0 then rcall('HDEL', K_FLOWLEN, fk) end
  local n = rcall('HINCRBY', bk, 'n', sign)
  if n > 0 then
    rcall('ZADD', K_BANDS, rec.band, rec.band)
  else
    rcall('ZREM', K_BANDS, rec.band)
    rcall('DEL', bk)
  end
end

local function queue_item(id, raw, rec, now)
  local b = band_cfg(rec.band)
  local lane = lane_of(b, rec)
  local lk = P .. 'lane:' .. lane
  local old_head = rcall('ZRANGE', lk, 0, 0)[1] or false
  rcall('HSET', K_ITEMS, id, raw)
  if b.order == 'edf' then
    rcall('ZADD', lk, int(rec.deadline), id)
  else
    rcall('ZADD', lk, id, id)  -- the zero-padded id parses as its own sequence number
  end
  rcall('ZADD', K_DEADLINES, int(rec.deadline), id)
  if not old_head then
    if b.order == 'wa' and rec.wid ~= '' then rcall('SADD', K_RERANK, rec.wid) end
    if b.fair == 'rr' then rcall('ZADD', P .. 'flows:' .. rec.band, 0, rec.flow) end
  end
  -- A new item becomes the head only of a new lane, or of an EDF lane with an earlier deadline.
  if not old_head or b.order == 'edf' then rank_lane(lane, b, old_head, now, nil) end
  adjust_counts(rec, 1)
end

-- Takes a queued item out of every queue structure (not out of its owner's set).
local function unqueue_item(id, rec, now)
  local b = band_cfg(rec.band)
  local lane = lane_of(b, rec)
  local lk = P .. 'lane:' .. lane
  local old_head = rcall('ZRANGE', lk, 0, 0)[1]
  rcall('ZREM', lk, id)
  rcall('ZREM', K_DEADLINES, id)
  if old_head == id then
    rcall('HDEL', K_ITEMS, id)
    local head = rank_lane(lane, b, id, now, nil)
    if not head then
      if b.order == 'wa' and rec.wid ~= '' then
        local wl = P .. 'wlanes:' .. rec.wid
        rcall('HDEL', wl, lane)
        if rcall('HLEN', wl) == 0 then rcall('SREM', K_RERANK, rec.wid) end
      end
      if b.fair == 'rr' and rcall('EXISTS', rankset_of(b, rec.band, rec.flow)) == 0 then
        rcall('ZREM', P .. 'flows:' .. rec.band, rec.flow)
      end
    end
  else
    rcall('HDEL', K_ITEMS, id)
  end
  adjust_counts(rec, -1)
end

-- Outcomes reach the waiting request: directly in the reply when the caller owns it, otherwise
-- through the owner's inbox (a list it blocks on), so no polling decides dispatch latency.
local INBOX_TTL_MS = 600000
local function notify(owner, id, status, wait, caller, out)
  local msg = id .. '|' .. status .. '|' .. int(wait)
  if owner == caller then
    out[#out + 1] = msg
  else
    local ik = P .. 'inbox:' .. owner
    rcall('RPUSH', ik, msg)
    rcall('PEXPIRE', ik, INBOX_TTL_MS)
  end
end

local function dispatch_item(id, caller, now, out)
  local rec = parse_item(rcall('HGET', K_ITEMS, id))
  unqueue_item(id, rec, now)
  rcall('HSET', K_INFLIGHT, id, rec.owner .. '|' .. rec.wid .. '|' .. int(now))
  rcall('HINCRBY', K_STATS, 'inflight', 1)
  if rec.lease > 0 then
    -- From now on a gateway holds the slot, not the replica: its lease alone ends it, so a
    -- replica that stops or dies does not take back tickets that are still in use.
    rcall('ZADD', K_LEASES, int(now + rec.lease), id)
    rcall('SREM', P .. 'own:' .. rec.owner, id)
  end
  local wait = math.max(now - rec.enq, 0)
  record_wait(rec.wid, wait / 1000.0)
  if rec.wid ~= '' then rerank_workload(rec.wid, now) end
  notify(rec.owner, id, S_DISPATCHED, wait, caller, out)
end

-- The next item by strict band priority, then the band's fairness policy, then lane ranking.
local function pick_next()
  local band = rcall('ZREVRANGE', K_BANDS, 0, 0)[1]
  if not band then return nil end
  local b = band_cfg(band)
  local rs
  if b.fair == 'rr' then
    local fk = P .. 'flows:' .. band
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
  local inflight = tonumber(rcall('HGET', K_STATS, 'inflight')) or 0
  while inflight < CFG.limit do
    local id = pick_next()
    if not id then break end
    dispatch_item(id, caller, now, out)
    inflight = inflight + 1
  end
end

-- Frees an in-flight slot. Idempotent: returns false when the item is not in flight.
local function release_item(id, now)
  local raw = rcall('HGET', K_INFLIGHT, id)
  if not raw then return false end
  local f = split(raw)
  rcall('HDEL', K_INFLIGHT, id)
  rcall('HINCRBY', K_STATS, 'inflight', -1)
  rcall('SREM', P .. 'own:' .. f[1], id)
  rcall('ZREM', K_LEASES, id)
  workload_done(f[2], now)
  return true
end

-- Removes a queued item for good (cancelled, expired, reclaimed). Returns its record or false.
local function drop_queued(id, now)
  local raw = rcall('HGET', K_ITEMS, id)
  if not raw then return false end
  local rec = parse_item(raw)
  unqueue_item(id, rec, now)
  rcall('SREM', P .. 'own:' .. rec.owner, id)
  workload_done(rec.wid, now)
  return rec
end

local function reply(status, a, b, out)
  local r = { status, a or '', b or '' }
  for i = 1, #out do r[#r + 1] = out[i] end
  return r
end
