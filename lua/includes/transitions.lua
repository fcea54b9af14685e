--[[
  The admission transitions as functions, so enqueue.lua and release.lua run one each and batch.lua
  runs several in one call (coalesced calls of concurrent requests) without a second copy.
  Each returns its reply's parts: status, two fields, and the outcomes of other items of the
  caller (a list): reply(...) makes them the script's reply table; batch.lua sends a reply with
  no outcomes as one string instead.
  They keep counters in memory (includes/counters.lua, includes/registry.lua): the script that
  runs them calls flush_state() before it returns.
  Provides: op_enqueue(now, caller, band, flow, raw_wid, crit, bytes, ttl, lease, tok, slo, out),
  op_release(override, caller, id, out, wid, tok), where `out` is an empty list the outcomes go
  into (the caller's, so a coalesced call makes a new one only after one was used) and `wid`,
  `tok` the caller's account of its slot, or nil; op_out() -> the emptied list a call of one
  transition passes as `out`.
  Needs: contract, config, registry, counters, lanes, dispatch.
]]
-- @include contract
-- @include config
-- @include registry
-- @include counters
-- @include lanes
-- @include dispatch

-- The outcome list of a call that runs one transition (enqueue.lua, release.lua), kept between
-- calls and emptied here (reply copies what it holds into the script's reply).
local op_out
do
  local OUT = {}
  function op_out()
    for i = #OUT, 1, -1 do OUT[i] = nil end
    return OUT
  end
end

-- Counts the request toward its workload's rate first, even if it is then rejected, so rejection
-- cannot be gamed. With nothing queued and a free slot it is dispatched at once; otherwise it is
-- checked against the queue caps, queued, and every dispatchable item is dispatched.
local function op_enqueue(now, caller, band, flow, raw_wid, crit, bytes, ttl, lease, tok, slo, out)
  local st = ST
  -- Nothing is queued: no workload has a lane to re-rank, so its groups need not be read.
  local idle = st.qn == 0
  local fast = idle and now >= CFG.hold and has_capacity(now, tok)
  local wid = track(raw_wid, now, idle)
  -- Anonymous (or past the cap): track did not read its state.
  if not WS[wid] then wstate(wid, idle) end
  count_request(wid, now)
  local num = owner_num(caller)

  if fast then
    -- Fast path: nothing waits, so nothing better waits; no queue structure is touched, and no
    -- lane of the workload exists to re-rank.
    took_capacity()
    local id = item_id(stat_add('seq', 1))
    grant_slot(num, caller, id, wid, now, lease, tok)
    -- Waited 0, and active from now (one call for both: a Lua call costs more than either).
    record_wait(wid, 0, 1)
    return S_DISPATCHED, id, '0', out
  end

  -- What the caps and the queue need, in one read.
  pool_prefetch_these(5, 'qbytes', QUEUED_BANDS, BAND_QUEUED .. band, BAND_BYTES .. band,
    OWNER_QUEUED .. num)
  local b = band_cfg(band)
  local band_n, band_bytes = band_counts(band)
  if (CFG.maxReq > 0 and st.qn >= CFG.maxReq)
    or (CFG.maxBytes > 0 and st.qbytes + bytes > CFG.maxBytes)
    or (b.maxReq > 0 and band_n >= b.maxReq)
    or (b.maxBytes > 0 and band_bytes + bytes > b.maxBytes) then
    -- The request still counted toward its workload's rate: its queued lanes move.
    if wid ~= '' then rerank_workload(wid, now) end
    return S_REJECTED_CAPACITY, '', '', out
  end

  local id = item_id(stat_add('seq', 1))
  local raw = encode_item(num, band, flow, wid, crit, bytes, now, ttl, lease, tok, slo)
  -- The record as parse_item(raw) would return it, without parsing it. Its lane, if new, is
  -- ranked with the workload's others, by the re-rank that follows.
  local rec = { owner = num, band = band, flow = flow, wid = wid, crit = crit, bytes = bytes,
    enq = now, ttl = ttl, lease = lease, tok = tok, slo = slo }
  queue_item(id, raw, rec, now, wid ~= '')
  add_active(wid, 1)
  if wid ~= '' then rerank_workload(wid, now) end
  dispatch_ready(caller, now, out)

  for i, msg in ipairs(out) do
    local d = parse_delivery(msg)
    if d.id == id then
      table.remove(out, i)
      return S_DISPATCHED, id, int(d.wait), out
    end
  end
  return S_QUEUED, id, '', out
end

-- Frees an in-flight slot and dispatches whatever that frees. Idempotent. The clock is read only
-- when something waits (`override` is the caller's time override). `wid`, `tok`: the caller's
-- account of its slot, or nil (release_item).
local function op_release(override, caller, id, out, wid, tok)
  if not release_item(caller, id, wid, tok) then return S_NOT_FOUND, id, '', out end
  if ST.qn > 0 then dispatch_ready(caller, clock(override), out) end
  return S_DISPATCHED, id, '', out
end
