--[[
  Dispatch and the other ends of an item's life. Picks the next item by strict band priority,
  then the band's fairness policy, then lane ranking; moves it in flight while the concurrency
  detector reports capacity; tells its owner (in the reply, or through the owner's inbox); frees
  in-flight slots; removes queued items for good; builds replies.
  A slot a replica holds is in held:<its number> (so its slots are found without an index per
  item); a slot a ticket holds is in leased, with its expiry in leases.
  Provides: notify(owner, id, status, wait, caller, out), has_capacity(now), took_capacity(),
  dispatch_item(id, lane, caller, now, out), pick_next() -> id, lane, dispatch_ready(caller, now,
  out), grant_slot(num, owner, id, wid, now, lease, tok),
  grants (the caller's held slots a coalesced call writes at its end), release_held(num, id),
  release_leased(id), release_item(caller, id, wid, tok) (held by the caller, else leased; `wid`
  and `tok` the caller's account of its slot, or nil), drop_queued(id, now) -> record or false,
  reply(status, a, b, out), flush_state() (writes what the call kept in memory: every script
  that changes state calls it before it returns).
  Needs: contract, config, items, owners, registry, counters, lanes.
]]
-- @include contract
-- @include config
-- @include items
-- @include owners
-- @include registry
-- @include counters
-- @include lanes

-- Outcomes reach the waiting request: directly in the reply when the caller owns it, otherwise
-- through the owner's inbox (a list it blocks on), so no polling decides dispatch latency. A
-- replica's inbox is deleted when it stops or is reclaimed.
local function notify(owner, id, status, wait, caller, out)
  local msg = encode_delivery(id, status, wait)
  if owner == caller then
    out[#out + 1] = msg
  elseif owner then
    rcall('RPUSH', K_INBOX .. owner, msg)
  end
end

-- The held slots a coalesced call grants its caller, written with one HSET when the call ends
-- (flush_state) rather than one each: a command from a script costs more than adding its fields
-- to another. A release that does not find a slot writes them first and looks again, so nothing
-- reads the hash without them. init_grants (run by begin_call) forgets what an aborted call left.
-- grants.defer(num): from now on, defer the grants of owner number `num`; grants.put(num, id,
-- record); grants.write() -> whether anything was written; grants.write_to(key): the same, if
-- the grants deferred go to the hash `key`.
local grants = {}
local init_grants
do
  -- The owner number whose grants wait, and HSET's arguments: the hash key, then id, record...
  local num_, args, n = nil, nil, 0
  function init_grants()
    num_, args, n = nil, nil, 0
  end
  function grants.defer(num)
    num_, args, n = num, { K_HELD .. num }, 1
  end
  function grants.put(num, id, record)
    if num == num_ then
      args[n + 1], args[n + 2] = id, record
      n = n + 2
    else
      rcall('HSET', K_HELD .. num, id, record)
    end
  end
  function grants.write()
    if n <= 1 then return false end
    rcall('HSET', unpack(args, 1, n))
    args, n = { args[1] }, 1
    return true
  end
  function grants.write_to(key)
    return args ~= nil and args[1] == key and grants.write()
  end
end

-- Puts `id` in flight. Lease 0: the replica (owner number `num`, id `owner`) holds the slot.
-- Otherwise a ticket does (a gateway, not the replica): only its lease or a release ends it, so a
-- replica that stops or dies does not take back tickets that are still in use.
local function grant_slot(num, owner, id, wid, now, lease, tok)
  if lease > 0 then
    rcall('HSET', K_LEASED, id, encode_leased(owner, wid, now, tok))
    rcall('ZADD', K_LEASES, int(now + lease), id)
  else
    grants.put(num, id, encode_held(wid, now, tok))
  end
  -- Into the pool's in-flight count, and its tokens.
  stat_add('inflight', 1)
  if tok > 0 then stat_add('tok', tok) end
end

-- The saturation detector, for a request of `tok` estimated tokens. The concurrency detector:
-- the pool's in-flight count below the limit, and in tokens or hybrid mode its tokens in flight
-- plus these within the token limit (a request larger than the whole limit goes alone, when
-- nothing else is in flight, so it cannot wait forever). The utilization detector (lua/sample.lua writes its samples): the newest sample fresh
-- (a missing or stale one fails closed), its saturation below 1, and fewer dispatches since it
-- than (1 + headroom - saturation) x endpoints x queueDepthThreshold, so dispatches between two
-- samples cannot stampede: on average they fill each endpoint's waiting queue at most to
-- (1 + headroom) x queueDepthThreshold before the next sample is seen.
local function has_capacity(now, tok)
  local st = ST
  if st.inflight >= CFG.limit then return false end
  if CFG.tokLimit and st.tok > 0 and st.tok + tok > CFG.tokLimit then return false end
  if CFG.det ~= DETECTOR_UTILIZATION then return true end
  local at, sat = tonumber(POOL.satT), tonumber(POOL.sat)
  if not at or now - at > CFG.stale or sat >= 1 then return false end
  local allowance = (1 + CFG.head - sat) * tonumber(POOL.satN) * CFG.qdt
  return (tonumber(POOL.since) or 0) < allowance
end

local function took_capacity()
  if CFG.det == DETECTOR_UTILIZATION then pool_add('since', 1, false) end
end

-- Removes a queued item for good (cancelled, expired, reclaimed). Returns its record or false.
local function drop_queued(id, now)
  local raw = item_get(id)
  if not raw then return false end
  local rec = parse_item(raw)
  unqueue_item(id, rec, now)
  workload_done(rec.wid)
  return rec
end

-- `id` heads `lane` (it was picked from a ranking). Returns true when dispatched; false when
-- dropped instead, its owner being reclaimed (presumed dead); nil when its tokens do not fit
-- (it stays at the head: nothing behind it overtakes it).
local function dispatch_item(id, lane, caller, now, out)
  local rec = parse_item(item_get(id))
  if rec.tok > 0 and not has_capacity(now, rec.tok) then return nil end
  -- Its band's and its owner's fields, in one read.
  local o = rec.owner
  pool_prefetch_these(6, BAND_QUEUED .. rec.band, BAND_BYTES .. rec.band, OWNER_QUEUED .. o,
    OWNER_ID .. o, RECLAIM .. o, 'qbytes')
  if owner_reclaimed(rec.owner) then
    unqueue_item(id, rec, now, true)
    workload_done(rec.wid)
    return false
  end
  local wait = math.max(now - rec.enq, 0)
  -- The wait changes the workload's score first, so its lanes, the one this item leaves
  -- included, are ranked once, by the re-rank below.
  record_wait(rec.wid, wait / 1000.0)
  local rerank = rec.wid ~= ''
  unqueue_item(id, rec, now, true, rerank)
  local owner = owner_id(rec.owner)
  grant_slot(rec.owner, owner, id, rec.wid, now, rec.lease, rec.tok)
  if rerank then rerank_workload(rec.wid, now) end
  notify(owner, id, S_DISPATCHED, wait, caller, out)
  return true
end

-- The next item by strict band priority, then the band's fairness policy, then lane ranking:
-- its id and its lane.
local function pick_next()
  local band = top_band()
  if not band then return nil end
  local b = band_cfg(band)
  local rs
  if b.fair == FAIR_RR then
    local fk = K_FLOWS .. band
    -- The cursor outlives the band's queue, so a band that empties and refills keeps its turn.
    local cur = POOL[RR_CURSOR .. band]
    local flow = false
    if cur then flow = rcall('ZRANGEBYLEX', fk, '(' .. cur, '+', 'LIMIT', '0', '1')[1] end
    if not flow then flow = rcall('ZRANGE', fk, '0', '0')[1] end
    if not flow then return nil end
    pool_set(RR_CURSOR .. band, flow)
    rs = rankset_of(b, band, flow)
  else
    rs = rankset_of(b, band, nil)
  end
  local member = rcall('ZRANGE', rs, '0', '0')[1]
  if not member then return nil end
  return string.sub(member, 1, ID_WIDTH), string.sub(member, ID_WIDTH + 1)
end

-- Dispatches while the saturation detector reports capacity. Capacity is checked and taken in
-- the same atomic call as the dispatch, so replicas can never dispatch past it.
local function dispatch_ready(caller, now, out)
  if now < CFG.hold then return end
  local st = ST
  -- With nothing queued there is no band to pick from: no need to look.
  while st.qn > 0 and has_capacity(now, 0) do
    local id, lane = pick_next()
    if not id then break end
    local done = dispatch_item(id, lane, caller, now, out)
    if done == nil then break end
    if done then took_capacity() end
  end
end

-- A slot left the in-flight counts: the pool's, its tokens, and its workload's active count.
local function free_slot(wid, tok)
  stat_add('inflight', -1)
  if tok > 0 then stat_add('tok', -tok) end
  workload_done(wid)
end

-- Takes slot `id` out of the hash `key` (a replica's held slots, or the leased ones: `leased`)
-- and out of the counts. Returns true, or false when the hash holds no such slot.
local function take_slot(key, id, leased)
  local raw = rcall('HGET', key, id)
  if not raw and grants.write_to(key) then raw = rcall('HGET', key, id) end
  if not raw then return false end
  rcall('HDEL', key, id)
  local wid, tok
  if leased then
    local f = parse_leased(raw)
    wid, tok = f.wid, f.tok
  else
    -- A held record's fields, without a table.
    local _
    wid, _, tok = fields_held(raw)
    tok = NUMBER_OF[tok] or tonum(tok)
  end
  free_slot(wid, tok)
  return true
end

-- Frees a slot a replica holds. Returns false when it holds no such slot.
local function release_held(num, id)
  return take_slot(K_HELD .. num, id, false)
end

local function release_leased(id)
  if not take_slot(K_LEASED, id, true) then return false end
  rcall('ZREM', K_LEASES, id)
  return true
end

-- Frees an in-flight slot: the caller's own, or a ticket's (any replica may release a ticket).
-- Idempotent: returns false when the item is not in flight. `wid` and `tok`, when given, are the
-- caller's account of its own slot (contract.BATCH_RELEASE_HELD): what it enqueued the request
-- with, which is what the slot's record holds unless the pool counted the request as anonymous
-- (ANON_FALLBACK set), so the record is deleted without being read.
local function release_item(caller, id, wid, tok)
  -- owner_known(caller), inline: this runs for every admission.
  local num = POOL[REPLICA_NUMBER .. caller]
  if num then
    -- (Every caller read the flag with the counters, if it is set: rawget, not POOL's __index.)
    if wid and not rawget(POOL, ANON_FALLBACK) then
      local key = K_HELD .. num
      if rcall('HDEL', key, id) == 1 or (grants.write_to(key) and rcall('HDEL', key, id) == 1) then
        free_slot(wid, tok)
        return true
      end
    elseif take_slot(K_HELD .. num, id, false) then
      return true
    end
  end
  return release_leased(id)
end

local function reply(status, a, b, out)
  local r = { status, a or '', b or '' }
  for i = 1, #out do r[#r + 1] = out[i] end
  return r
end

local function flush_state()
  grants.write()
  -- With nothing queued or in flight, no item counted as anonymous for want of room in the
  -- registry is left (contract.ANON_FALLBACK). Only a call that read the flag looks.
  if rawget(POOL, ANON_FALLBACK) and ST.qn == 0 and ST.inflight == 0 then
    pool_del(ANON_FALLBACK)
  end
  flush_workloads()
  flush_pool()
end
