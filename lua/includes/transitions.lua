--[[
  The admission transitions as functions, so enqueue.lua and release.lua run one each and batch.lua
  runs several in one call (coalesced calls of concurrent requests) without a second copy.
  Each returns the reply table its script returns.
  Provides: op_enqueue(now, caller, band, flow, raw_wid, crit, bytes, ttl, lease),
  op_release(now, caller, id).
  Needs: contract, config, registry, lanes, dispatch.
]]
-- @include contract
-- @include config
-- @include registry
-- @include lanes
-- @include dispatch

-- Counts the request toward its workload's rate first, even if it is then rejected, so rejection
-- cannot be gamed. With nothing queued and a free slot it is dispatched at once; otherwise it is
-- checked against the queue caps, queued, and every dispatchable item is dispatched.
local function op_enqueue(now, caller, band, flow, raw_wid, crit, bytes, ttl, lease)
  local out = {}
  local wid = track(raw_wid, now)
  count_request(wid, now)
  if wid ~= '' then rerank_workload(wid, now) end

  local st = rcall('HMGET', K_STATS, 'qn', 'qbytes', 'inflight')
  local qn, qbytes, inflight = tonumber(st[1]) or 0, tonumber(st[2]) or 0, tonumber(st[3]) or 0

  if qn == 0 and inflight < CFG.limit and now >= CFG.hold then
    -- Fast path: nothing waits, so nothing better waits; no queue structure is touched.
    local id = item_id(rcall('HINCRBY', K_STATS, 'seq', 1))
    rcall('HSET', K_INFLIGHT, id, encode_inflight(caller, wid, now))
    rcall('HINCRBY', K_STATS, 'inflight', 1)
    rcall('HINCRBY', wkey(wid), 'active', 1)
    -- A leased slot (a ticket) is held by a gateway, not by this replica: only its lease ends it.
    if lease > 0 then
      rcall('ZADD', K_LEASES, int(now + lease), id)
    else
      rcall('SADD', K_OWN .. caller, id)
    end
    record_wait(wid, 0)
    return reply(S_DISPATCHED, id, '0', out)
  end

  local b = band_cfg(band)
  local bs = rcall('HMGET', K_BAND .. band, 'n', 'bytes')
  local bn, bbytes = tonumber(bs[1]) or 0, tonumber(bs[2]) or 0
  if (CFG.maxReq > 0 and qn >= CFG.maxReq) or (CFG.maxBytes > 0 and qbytes + bytes > CFG.maxBytes)
    or (b.maxReq > 0 and bn >= b.maxReq) or (b.maxBytes > 0 and bbytes + bytes > b.maxBytes) then
    return reply(S_REJECTED_CAPACITY, '', '', out)
  end

  local id = item_id(rcall('HINCRBY', K_STATS, 'seq', 1))
  local raw = encode_item(caller, band, flow, wid, crit, bytes, now, now + ttl, lease)
  queue_item(id, raw, parse_item(raw), now)
  rcall('HINCRBY', wkey(wid), 'active', 1)
  rcall('SADD', K_OWN .. caller, id)
  dispatch_ready(caller, now, out)

  for i, msg in ipairs(out) do
    local d = parse_delivery(msg)
    if d.id == id then
      table.remove(out, i)
      return reply(S_DISPATCHED, id, int(d.wait), out)
    end
  end
  return reply(S_QUEUED, id, '', out)
end

-- Frees an in-flight slot and dispatches whatever that frees. Idempotent.
local function op_release(now, caller, id)
  local out = {}
  if not release_item(id, now) then return reply(S_NOT_FOUND, id, '', out) end
  dispatch_ready(caller, now, out)
  return reply(S_DISPATCHED, id, '', out)
end
