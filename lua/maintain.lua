--[[
  Periodic upkeep of a pool, run by every replica each tick but done by at most one per interval:
  evicts queued items past their TTL, frees expired ticket leases, reclaims the items of replicas
  whose lease ran out, expires idle workloads, re-ranks every queued workload-aware lane (request
  rates decay with time, so no score is older than one tick), then dispatches what fits.
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
if not load_cfg() then return { S_NO_CONFIG } end
local now = clock(ARGV[1])
local caller, interval, budget = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local due = tonumber(rcall('HGET', K_STATS, 'maint')) or -math.huge
if ARGV[5] ~= '1' and now < due then return { 0, 0, 0 } end
rcall('HSET', K_STATS, 'maint', int(now + interval))
local out, evicted, reclaimed = {}, 0, 0

-- TTL eviction of queued items (their owner normally evicts them first; this covers the rest).
for _, id in ipairs(rcall('ZRANGEBYSCORE', K_DEADLINES, '-inf', int(now), 'LIMIT', 0, budget)) do
  local rec = drop_queued(id, now)
  if rec then
    notify(rec.owner, id, S_EVICTED_TTL, now - rec.enq, caller, out)
    evicted = evicted + 1
  end
end

-- Ticket leases that were neither released nor renewed.
for _, id in ipairs(rcall('ZRANGEBYSCORE', K_LEASES, '-inf', int(now), 'LIMIT', 0, budget)) do
  if not release_item(id, now) then rcall('ZREM', K_LEASES, id) end
  reclaimed = reclaimed + 1
end

-- Replicas that stopped heartbeating: their clients were connected to them, so queued items go
-- and in-flight slots come back. Bounded per call; the rest is picked up on the next tick.
for _, replica in ipairs(rcall('ZRANGEBYSCORE', K_REPLICAS, '-inf', int(now), 'LIMIT', 0, 10)) do
  local own = K_OWN .. replica
  for _, id in ipairs(rcall('SPOP', own, budget)) do
    if drop_queued(id, now) or release_item(id, now) then reclaimed = reclaimed + 1 end
  end
  if rcall('SCARD', own) == 0 then
    rcall('ZREM', K_REPLICAS, replica)
    rcall('DEL', K_INBOX .. replica)
  end
end

-- Idle workloads: nothing queued or in flight for the idle timeout.
local idle_before = int(now - CFG.idle)
for _, wid in ipairs(rcall('ZRANGEBYSCORE', K_WORKLOADS, '-inf', idle_before, 'LIMIT', 0, budget)) do
  if idle_active(wid) > 0 then
    rcall('ZADD', K_WORKLOADS, int(now), wid)
  else
    rcall('DEL', wkey(wid), K_WLANES .. wid)
    rcall('ZREM', K_WORKLOADS, wid)
    forget_workload(wid)
    forget_lanes(wid)
  end
end

for _, wid in ipairs(rcall('SMEMBERS', K_RERANK)) do rerank_workload(wid, now) end

dispatch_ready(caller, now, out)
flush_state()
local r = { 1, evicted, reclaimed }
for i = 1, #out do r[#r + 1] = out[i] end
return r
