--[[
  Periodic upkeep of a pool, run by every replica each tick but done by at most one per interval:
  evicts queued items whose TTL ran out in a past second, frees expired ticket leases, reclaims
  the slots and queued items of replicas whose lease ran out, expires idle workloads, re-ranks
  every queued workload-aware lane (request rates decay with time, so no score is older than one
  tick), then dispatches what fits.
  Input:
    KEYS[1] pool prefix 'as:{<pool>}:'
    ARGV[1] time override, absolute ms ('' = Redis TIME)
    ARGV[2] caller replica id
    ARGV[3] interval, ms: the work is skipped if another replica did it less than this ago
    ARGV[4] budget: at most this many items per kind of work in one call (bounds script time)
    ARGV[5] '1' to run regardless of the interval (tests, shutdown)
  Output:
    { 1, evicted, reclaimed, outcome... } when the work ran, { 0, 0, 0 } when skipped, { -1 } no config;
    each outcome 'id|status|wait_ms' is an item of the caller dispatched or evicted here.
]]
-- @include dispatch
if not load_cfg() then return { S_NO_CONFIG, foreign_layout() } end
local now = clock(ARGV[1])
local caller, interval, budget = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local due = tonumber(POOL.maint) or -math.huge
if ARGV[5] ~= '1' and now < due then return { 0, 0, 0 } end
pool_set('maint', int(now + interval))
local out, evicted, reclaimed = {}, 0, 0
-- Stale entries (ids dispatched or removed since) cost a lookup each: bound them as well.
local look_budget = math.max(budget * 16, 4096)

-- TTL eviction: the deadline buckets of past seconds, oldest first (their owner normally evicts
-- them on time; this covers the rest). With nothing queued, no bucket holds a live id.
local cur = math.floor(now / 1000)
local sec = tonumber(POOL.dl0) or 0
if ST.qn == 0 then sec = math.max(sec, cur) end
local looked = 0
while sec < cur and evicted < budget and looked < look_budget do
  local want = math.min(budget - evicted, look_budget - looked)
  local ids = rcall('LPOP', K_DEADLINES .. int(sec), want)
  if not ids then
    sec = sec + 1
  else
    for _, id in ipairs(ids) do
      local rec = drop_queued(id, now)
      if rec then
        notify(owner_id(rec.owner), id, S_EVICTED_TTL, now - rec.enq, caller, out)
        evicted = evicted + 1
      end
    end
    looked = looked + #ids
    if #ids < want then sec = sec + 1 end
  end
end
pool_set('dl0', int(sec))

-- Ticket leases that were neither released nor renewed.
for _, id in ipairs(rcall('ZRANGEBYSCORE', K_LEASES, '-inf', int(now), 'LIMIT', 0, budget)) do
  if not release_leased(id) then rcall('ZREM', K_LEASES, id) end
  reclaimed = reclaimed + 1
end

-- Replicas that stopped heartbeating: their clients were connected to them, so queued items go
-- and held slots come back. A replica is taken off at once (it gets a new number if it comes
-- back); what its number owns is reclaimed within the budget, the rest on the next ticks.
local top_bucket = item_bucket(ST.seq)
local lowest = tonumber(POOL.ilo) or top_bucket
for _, replica in ipairs(rcall('ZRANGEBYSCORE', K_REPLICAS, '-inf', int(now), 'LIMIT', 0, 10)) do
  rcall('ZREM', K_REPLICAS, replica)
  local num = owner_known(replica)
  if num then
    pool_del(REPLICA_NUMBER .. replica)
    pool_set(RECLAIM .. num, int(lowest))
    -- Its held hash goes once its last slot is released.
    rcall('HDEL', K_HELD .. num, POOL_LAYOUT)
  else
    rcall('DEL', K_INBOX .. replica)
  end
end
local reclaiming = {}
for field, cursor in pairs(pool_fields()) do
  if string.sub(field, 1, #RECLAIM) == RECLAIM then
    reclaiming[#reclaiming + 1] = { string.sub(field, #RECLAIM + 1), tonumber(cursor) }
  end
end
for _, r in ipairs(reclaiming) do
  local num, bucket = r[1], r[2]
  local held = rcall('HKEYS', K_HELD .. num)
  for i = 1, math.min(#held, budget) do
    if held[i] ~= POOL_LAYOUT and release_held(num, held[i]) then reclaimed = reclaimed + 1 end
  end
  local dropped, scanned = 0, 0
  while owner_queued(num) > 0 and bucket <= top_bucket and dropped < budget
    and scanned < math.max(budget, 64) do
    scanned = scanned + 1
    local v = rcall('HGETALL', K_ITEMS .. int(bucket))
    for i = 1, #v, 2 do
      if tonumber(parse_item(v[i + 1]).owner) == tonumber(num) then
        local id = item_id(bucket * ITEM_BUCKET + tonumber(v[i]))
        if drop_queued(id, now) then
          reclaimed = reclaimed + 1
          dropped = dropped + 1
        end
      end
    end
    if dropped < budget then bucket = bucket + 1 end
  end
  pool_set(RECLAIM .. num, int(bucket))
  if owner_queued(num) == 0 and rcall('EXISTS', K_HELD .. num) == 0 then
    local replica = owner_id(num)
    -- Its inbox goes with it: wake-ups sent to it are read by no one.
    if replica then rcall('DEL', K_INBOX .. replica) end
    pool_del(RECLAIM .. num)
    pool_del(OWNER_ID .. num)
    pool_del(OWNER_QUEUED .. num)
  end
end

-- The lowest item bucket that may still hold a queued item: buckets below the current one take
-- no new ids, so once empty they stay empty.
local steps = 0
while lowest < top_bucket and steps < budget
  and rcall('EXISTS', K_ITEMS .. int(lowest)) == 0 do
  lowest = lowest + 1
  steps = steps + 1
end
pool_set('ilo', int(lowest))

-- Idle workloads: no request for the idle timeout, and nothing queued or in flight.
local idle_before = now - CFG.idle
for _, wid in ipairs(rcall('ZRANGEBYSCORE', K_WORKLOADS, '-inf', int(idle_before),
  'LIMIT', 0, budget)) do
  local w = wstate(wid)
  if (w.active or 0) > 0 or next(groups_of(wid)) ~= nil then
    rcall('ZADD', K_WORKLOADS, int(now), wid)
  elseif w.exists and w.t and w.t > idle_before then
    rcall('ZADD', K_WORKLOADS, int(w.t), wid)
  else
    rcall('DEL', wkey(wid))
    rcall('ZREM', K_WORKLOADS, wid)
    forget_workload(wid)
  end
end

-- Every queued workload-aware lane, re-ranked by its workload's current counters.
local wids = {}
for field, n in pairs(pool_fields()) do
  if string.sub(field, 1, #BAND_QUEUED) == BAND_QUEUED and n ~= '0' then
    local band = string.sub(field, #BAND_QUEUED + 1)
    local b = band_cfg(band)
    if b.order == ORDER_WA then
      local sets = { K_RANK .. band }
      if b.fair == FAIR_RR then
        sets = {}
        for _, flow in ipairs(rcall('ZRANGE', K_FLOWS .. band, 0, -1)) do
          sets[#sets + 1] = rankset_of(b, band, flow)
        end
      end
      for _, rs in ipairs(sets) do
        for _, member in ipairs(rcall('ZRANGE', rs, 0, -1)) do
          local wid = parse_lane(string.sub(member, ID_WIDTH + 1)).wid
          if wid ~= '' then wids[wid] = true end
        end
      end
    end
  end
end
for wid in pairs(wids) do
  rerank_workload(wid, now)
  compact_workload(wid)
end

dispatch_ready(caller, now, out)
flush_state()
local r = { 1, evicted, reclaimed }
for i = 1, #out do r[#r + 1] = out[i] end
return r
