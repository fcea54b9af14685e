--[[
  The workload registry: per-workload counters (request rate, EMA of waits, active requests, last
  request), written only here, inside the transitions that change them, and each workload's best
  queued workload-aware lane per ranking set (field WGROUP_FIELD .. ranking set suffix -> 'head
  key|lanes|rank member', see includes/lanes.lua), which re-ranking reads with the counters.
  Python reads the counters (sidecar/registry.py, whose window_rate and ema_update are the twins
  of rate_from and record_wait).
  A workload's hash is read at most once (HGETALL: counters and lanes together) and kept here,
  between calls too, while the pool's write stamp says nothing else wrote the pool (see WS);
  the fields that changed are written back once per call, by flush_workloads. A release that
  has no other reason to read its workload only sends its decrement (HINCRBY) at the flush.
  Provides: init_registry() (run by begin_call), wkey(wid), rate_from(bi, c, p, now),
  count_request(wid, now), track(wid, now, counters_only),
  record_wait(wid, wait_s, joined), add_active(wid, delta), workload_done(wid),
  workload_metrics(wid, now) -> ema, rate, wstate(wid, counters_only) -> the cached state,
  groups_of(wid) -> { suffix = best }, group_set(wid, suffix, best or nil) with best = { key,
  member, n (the group's lanes) }, compact_workload(wid),
  forget_workload(wid) after its hash was deleted,
  flush_workloads().
  Needs: contract, config.
]]
-- @include contract
-- @include config

local function wkey(wid)
  if wid == '' then return K_ANON end
  return K_W .. wid
end

-- wid -> { bi, c, p, ema, n, active, t (numbers or nil), groups = { suffix = best } or nil (not
-- read yet), exists, counts_dirty (one of the packed counters changed), active_dirty,
-- dirty_groups = { suffix = true } (empty: none), touched (changed by this call) }.
-- The states stay between calls with the pool's cache entry (includes/config.lua, POOL_CACHE:
-- ENTRY.workloads), valid while the pool's write stamp is the one this library wrote last,
-- which every call that changes a workload hash writes (flush_workloads sets the entry's
-- `touched`); so a workload is read once, not once per call. WS is this call's pool's table.
local WS = {}
-- Active-count changes of workloads this call did not otherwise read: wid -> delta.
local PENDING = {}
local init_registry, new_state, touch, flush_workloads
do
  -- W_ENTRY: the entry WS belongs to. TOUCHED: the states this call changed (TOUCHED_N of
  -- them), which flush_workloads writes. W_MADE: states made since the last reset; past
  -- W_MADE_MAX every entry's states (W_ENTRIES: the entries holding some) are let go, which
  -- bounds the library's memory (the next calls read their workloads again).
  local W_ENTRY, TOUCHED, TOUCHED_N = nil, {}, 0
  local W_MADE, W_MADE_MAX, W_ENTRIES, W_ENTRIES_N = 0, 4096, {}, 0
  function init_registry()
    if TOUCHED_N > 0 then
      -- A call stopped before its flush: its pool's states hold changes never written.
      if W_ENTRY then W_ENTRY.workloads = nil end
      clear(TOUCHED)
      TOUCHED_N = 0
    end
    -- flush_workloads leaves PENDING empty; a call that stopped before it may not have.
    if next(PENDING) ~= nil then clear(PENDING) end
    if W_MADE >= W_MADE_MAX or W_ENTRIES_N >= W_MADE_MAX then
      for i = 1, W_ENTRIES_N do W_ENTRIES[i].workloads = nil end
      W_ENTRIES, W_ENTRIES_N, W_MADE = {}, 0, 0
    end
    local entry = pool_entry()
    local ws = entry.workloads
    if not ws then
      ws = {}
      entry.workloads = ws
      W_ENTRIES_N = W_ENTRIES_N + 1
      W_ENTRIES[W_ENTRIES_N] = entry
    end
    W_ENTRY, WS = entry, ws
  end

  -- A new state for `wid`, in WS, with no counter and no group read.
  function new_state(wid)
    local w = { bi = nil, c = nil, p = nil, ema = nil, n = nil, active = nil, t = nil,
      exists = false, counts_dirty = false, active_dirty = false, touched = false,
      groups = nil, dirty_groups = {}, wid = wid }
    WS[wid] = w
    W_MADE = W_MADE + 1
    return w
  end

  -- Marks the state changed by this call (callers check w.touched first: this runs for every
  -- admission, and a Lua call costs more than the test).
  function touch(w)
    w.touched = true
    TOUCHED_N = TOUCHED_N + 1
    TOUCHED[TOUCHED_N] = w
  end

  -- Writes what this call changed: each touched state's changed fields in one HSET (an emptied
  -- group as '', which maintain.lua deletes: compact_workload), then the active-count changes
  -- of workloads not read (HINCRBY). Marks the pool's entry touched when it wrote anything, so
  -- flush_pool, which runs next, writes a new stamp.
  local FLUSH_ARGS = {}
  function flush_workloads()
    if TOUCHED_N > 0 or next(PENDING) ~= nil then W_ENTRY.touched = true end
    for i = 1, TOUCHED_N do
      local w = TOUCHED[i]
      local args, n = FLUSH_ARGS, 0
      if w.counts_dirty then
        args[1], args[2] = WORKLOAD_COUNTS,
          encode_counts(w.bi or 0, w.c or 0, w.p or 0, w.n or 0, w.t or 0, w.ema or 0)
        n, w.counts_dirty = 2, false
      end
      if w.active_dirty then
        local active = w.active
        args[n + 1], args[n + 2] = WORKLOAD_ACTIVE, TEXT_OF[active] or int(active)
        n, w.active_dirty = n + 2, false
      end
      local dirty_groups = w.dirty_groups
      if next(dirty_groups) ~= nil then
        for suffix in pairs(dirty_groups) do
          local best = w.groups[suffix]
          args[n + 1], args[n + 2] = WGROUP_FIELD .. suffix,
            best and encode_best(best) or ''
          n = n + 2
          dirty_groups[suffix] = nil
        end
      end
      if n > 0 then rcall('HSET', wkey(w.wid), unpack(args, 1, n)) end
      w.touched = false
      TOUCHED[i] = nil
    end
    -- (Counted down only once all is written: a call stopped by an error in between leaves it
    -- above 0, and the next lets this pool's states go, see init_registry.)
    TOUCHED_N = 0
    for wid, delta in pairs(PENDING) do
      PENDING[wid] = nil
      local left = rcall('HINCRBY', wkey(wid), WORKLOAD_ACTIVE, int(delta))
      if left < 0 then
        -- Only if the invariant of workload_done was broken (data lost): never leave a negative
        -- count, and never a hash holding nothing but it.
        if rcall('HLEN', wkey(wid)) == 1 then
          rcall('DEL', wkey(wid))
        else
          rcall('HSET', wkey(wid), WORKLOAD_ACTIVE, 0)
        end
      end
    end
  end
end

-- A field of the workload hash, if it names a group with a lane: its best lane into w.groups. (A
-- group that emptied holds '' until maintain.lua deletes it: compact_workload.)
local function take_group(w, f, value)
  local stem = #WGROUP_FIELD
  if value ~= '' and string.sub(f, 1, stem) == WGROUP_FIELD then
    w.groups[string.sub(f, stem + 1)] = parse_best(value)
  end
end

-- A workload's state for this call (read by its first use). (Its helpers in a do block: the
-- library's main chunk is held to Lua's 200 locals.)
local wstate
do
  local function pending_delta(wid, w)
    local delta = PENDING[wid]
    if delta then
      PENDING[wid] = nil
      if w.exists then
        w.active = math.max((w.active or 0) + delta, 0)
        w.active_dirty = true
        if not w.touched then touch(w) end
      end
    end
  end

  -- The packed counters into w.
  local function take_counts(w, packed)
    local bi, c, p, n, t, ema = fields_counts(packed)
    -- Integers (written by int) are looked up rather than read by tonumber (its strtod is dear);
    -- the EMA, a new fraction each time, is read.
    w.bi, w.c, w.p, w.n, w.t, w.ema = NUMBER_OF[bi] or tonum(bi), NUMBER_OF[c] or tonum(c),
      NUMBER_OF[p] or tonum(p), NUMBER_OF[n] or tonum(n), NUMBER_OF[t] or tonum(t), tonumber(ema)
  end

  -- The counters and the groups from one HGETALL.
  local function read_all(wid, w)
    local v = rcall('HGETALL', wkey(wid))
    w.groups = {}
    w.exists = #v > 0
    for i = 1, #v, 2 do
      local f = v[i]
      if f == WORKLOAD_COUNTS then
        take_counts(w, v[i + 1])
      elseif f == WORKLOAD_ACTIVE then
        local value = v[i + 1]
        w.active = NUMBER_OF[value] or tonum(value)
      else
        take_group(w, f, v[i + 1])
      end
    end
  end

  -- `counters_only`: the caller needs no groups (nothing is queued in the pool, so no group holds
  -- a lane): one HMGET of the counters. Groups asked for later in the call are read then
  -- (groups_of).
  function wstate(wid, counters_only)
    local w = WS[wid]
    if w then return w end
    w = new_state(wid)
    if counters_only then
      local v = rcall('HMGET', wkey(wid), WORKLOAD_COUNTS, WORKLOAD_ACTIVE)
      local packed, active = v[1], v[2]
      -- Every tracked workload's hash holds its counters (count_request writes them first).
      if packed then
        take_counts(w, packed)
        w.active, w.exists = NUMBER_OF[active] or tonum(active), true
      else
        read_all(wid, w)
      end
    else
      read_all(wid, w)
    end
    pending_delta(wid, w)
    return w
  end
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

-- (The call's state looked up before wstate is called: these
-- run for every admission, and a Lua call costs more than the assignments.)
local function count_request(wid, now)
  local w = WS[wid] or wstate(wid)
  local idx = math.floor(now / CFG.win)
  if w.bi == idx then
    w.c = (w.c or 0) + 1
  else
    if w.bi == idx - 1 then w.p = w.c or 0 else w.p = 0 end
    w.bi, w.c = idx, 1
  end
  if wid ~= '' then w.t = now end
  w.exists, w.counts_dirty = true, true
  if not w.touched then touch(w) end
end

-- Tracked workloads: a known id, or a new one while under the cap. Others score as anonymous.
-- A workload is known (in the workloads set) exactly when its hash exists: both are created by
-- the call that tracks it and deleted together by maintain.lua. The set's score is only the
-- time it was first tracked (maintain.lua reads the hash's t before it expires anything), so a
-- known workload costs no write here.
local function track(wid, now, counters_only)
  if wid == '' then return '' end
  if wstate(wid, counters_only).exists then return wid end
  if CFG.maxTracked > 0 and rcall('ZCARD', K_WORKLOADS) >= CFG.maxTracked then
    -- Counted as anonymous while its replica knows it by name (contract.ANON_FALLBACK).
    pool_set(ANON_FALLBACK, '1')
    return ''
  end
  rcall('ZADD', K_WORKLOADS, int(now), wid)
  return wid
end

-- `joined`: the request also joins its workload's active count now (1; the fast path, which
-- dispatches it in the call that counts it), or joined it when it was queued (nil).
local function record_wait(wid, wait_s, joined)
  local w = WS[wid] or wstate(wid)
  local n = w.n or 0
  local ema
  if n == 0 then
    ema = wait_s
  else
    ema = CFG.alpha * wait_s + (1 - CFG.alpha) * w.ema
  end
  -- Stored as text with 17 digits (fmt), which reads back as the same double.
  w.ema, w.n, w.exists, w.counts_dirty = ema, n + 1, true, true
  if joined then
    w.active = (w.active or 0) + joined
    w.active_dirty = true
  end
  if not w.touched then touch(w) end
end

local function add_active(wid, delta)
  local w = WS[wid] or wstate(wid)
  w.active, w.exists, w.active_dirty = (w.active or 0) + delta, true, true
  if not w.touched then touch(w) end
end

-- One of the workload's requests left (released, dropped). An expired or never-tracked workload
-- has no counters to decrement; do not resurrect it. A tracked workload with a request queued
-- or in flight is never expired (maintain.lua), so its hash exists.
local function workload_done(wid)
  local w = WS[wid]
  if w then
    if wid ~= '' and not w.exists then return end
    w.active, w.exists, w.active_dirty = math.max((w.active or 0) - 1, 0), true, true
    if not w.touched then touch(w) end
  else
    PENDING[wid] = (PENDING[wid] or 0) - 1
  end
end

-- A workload's average wait (s) and request rate (req/s) at `now`; zero for anonymous traffic,
-- which is scored as a workload with no history.
local function workload_metrics(wid, now)
  if wid == '' then return 0, 0 end
  local w = WS[wid] or wstate(wid)
  local ema = 0
  if (w.n or 0) > 0 then ema = w.ema end
  return ema, rate_from(w.bi, w.c or 0, w.p or 0, now)
end

local function groups_of(wid)
  local w = WS[wid] or wstate(wid)
  if not w.groups then
    -- Read counters-only: the groups come now (the counters this call has changed stay).
    local v = rcall('HGETALL', wkey(wid))
    w.groups = {}
    for i = 1, #v, 2 do take_group(w, v[i], v[i + 1]) end
  end
  return w.groups
end

local function group_set(wid, suffix, best)
  local w = WS[wid] or wstate(wid)
  local groups = w.groups or groups_of(wid)
  groups[suffix] = best
  w.dirty_groups[suffix] = true
  if not w.touched then touch(w) end
end

-- Deletes the fields of groups that emptied (written as '' by flush_workloads), read from the
-- hash (the states keep no emptied group), except those this call has set again.
local function compact_workload(wid)
  local dirty = wstate(wid).dirty_groups
  local v = rcall('HGETALL', wkey(wid))
  local gone, stem = {}, #WGROUP_FIELD
  for i = 1, #v, 2 do
    local f = v[i]
    if v[i + 1] == '' and string.sub(f, 1, stem) == WGROUP_FIELD
      and not dirty[string.sub(f, stem + 1)] then
      gone[#gone + 1] = f
    end
  end
  if #gone > 0 then
    rcall('HDEL', wkey(wid), unpack(gone))
    -- A workload hash changed: the pool gets a new stamp (includes/config.lua, POOL_CACHE).
    pool_entry().touched = true
  end
end

-- After the workload's hash was deleted. (A state this call touched stays in the flush's list:
-- left with nothing to write, so the hash is not made again.)
local function forget_workload(wid)
  local w = WS[wid]
  if w then
    w.counts_dirty, w.active_dirty = false, false
    clear(w.dirty_groups)
  end
  WS[wid] = nil
  PENDING[wid] = nil
  pool_entry().touched = true
end
