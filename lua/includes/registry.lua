--[[
  The workload registry: per-workload counters (request rate, EMA of waits, active requests),
  written only here, inside the transitions that change them. Python reads them
  (sidecar/registry.py, whose window_rate and ema_update are the twins of rate_from and
  record_wait).
  Provides: wkey(wid), rate_from(bi, c, p, now), count_request(wid, now), track(wid, now),
  record_wait(wid, wait_s), workload_done(wid, now), workload_metrics(wid, now) -> ema, rate.
  Needs: contract, config.
]]
-- @include contract
-- @include config

local function wkey(wid)
  if wid == '' then return K_ANON end
  return K_W .. wid
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
