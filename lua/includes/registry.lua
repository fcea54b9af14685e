--[[
  The workload registry: per-workload counters (request rate, EMA of waits, active requests),
  written only here, inside the transitions that change them. Python reads them
  (sidecar/registry.py, whose window_rate and ema_update are the twins of rate_from and
  record_wait).
  A workload's hash is read at most once per call and kept here; the fields that changed are
  written back once, by flush_workloads, which every script that changes them calls before it
  returns.
  Provides: wkey(wid), rate_from(bi, c, p, now), count_request(wid, now), track(wid, now),
  record_wait(wid, wait_s), add_active(wid, delta), workload_done(wid, now),
  workload_metrics(wid, now) -> ema, rate, idle_active(wid) -> active count,
  forget_workload(wid) after its hash was deleted, flush_workloads().
  Needs: contract, config.
]]
-- @include contract
-- @include config

local function wkey(wid)
  if wid == '' then return K_ANON end
  return K_W .. wid
end

-- wid -> { bi, c, p, ema, n, active (numbers or nil), exists, dirty = { field = true } }
local WS = {}
local function wstate(wid)
  local w = WS[wid]
  if not w then
    local v = rcall('HMGET', wkey(wid), 'bi', 'c', 'p', 'ema', 'n', 'active')
    w = { bi = tonumber(v[1]), c = tonumber(v[2]), p = tonumber(v[3]), ema = tonumber(v[4]),
      n = tonumber(v[5]), active = tonumber(v[6]), dirty = {} }
    -- These are all of a workload hash's fields: none set means there is no hash.
    w.exists = v[1] ~= false or v[2] ~= false or v[3] ~= false or v[4] ~= false
      or v[5] ~= false or v[6] ~= false
    WS[wid] = w
  end
  return w
end

local function wset(w, field, value)
  w[field] = value
  w.dirty[field] = true
  w.exists = true
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
  local w = wstate(wid)
  local idx = math.floor(now / CFG.win)
  if w.bi == idx then
    wset(w, 'c', (w.c or 0) + 1)
  else
    if w.bi == idx - 1 then wset(w, 'p', w.c or 0) else wset(w, 'p', 0) end
    wset(w, 'bi', idx)
    wset(w, 'c', 1)
  end
end

-- Tracked workloads: a known id, or a new one while under the cap. Others score as anonymous.
-- A workload is known (in the workloads set) exactly when its hash exists: both are created by
-- the call that tracks it and deleted together by maintain.lua.
local function track(wid, now)
  if wid == '' then return '' end
  if CFG.maxTracked > 0 and not wstate(wid).exists
    and rcall('ZCARD', K_WORKLOADS) >= CFG.maxTracked then
    return ''
  end
  rcall('ZADD', K_WORKLOADS, int(now), wid)
  return wid
end

local function record_wait(wid, wait_s)
  local w = wstate(wid)
  local n = w.n or 0
  local ema
  if n == 0 then
    ema = wait_s
  else
    ema = CFG.alpha * wait_s + (1 - CFG.alpha) * w.ema
  end
  -- Stored as text and read back as the same double (fmt keeps 17 digits).
  wset(w, 'ema', tonumber(fmt(ema)))
  wset(w, 'n', n + 1)
end

local function add_active(wid, delta)
  local w = wstate(wid)
  wset(w, 'active', (w.active or 0) + delta)
end

local function workload_done(wid, now)
  local w = wstate(wid)
  -- An expired or never-tracked workload has no counters to decrement; do not resurrect it.
  if wid ~= '' and not w.exists then return end
  wset(w, 'active', math.max((w.active or 0) - 1, 0))
  if wid ~= '' then rcall('ZADD', K_WORKLOADS, 'XX', int(now), wid) end
end

-- A workload's average wait (s) and request rate (req/s) at `now`; zero for anonymous traffic,
-- which is scored as a workload with no history.
local function workload_metrics(wid, now)
  if wid == '' then return 0, 0 end
  local w = wstate(wid)
  local ema = 0
  if (w.n or 0) > 0 then ema = w.ema end
  return ema, rate_from(w.bi, w.c or 0, w.p or 0, now)
end

local function idle_active(wid)
  return wstate(wid).active or 0
end

local function forget_workload(wid)
  WS[wid] = nil
end

local WRITE_AS = { bi = int, c = int, p = int, ema = fmt, n = int, active = int }
local function flush_workloads()
  for wid, w in pairs(WS) do
    local args = {}
    for field in pairs(w.dirty) do
      args[#args + 1] = field
      args[#args + 1] = WRITE_AS[field](w[field])
    end
    if #args > 0 then rcall('HSET', wkey(wid), unpack(args)) end
    w.dirty = {}
  end
end
