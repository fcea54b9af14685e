--[[
  The pool hash and the one clock. The pool hash holds the configuration (written by
  configure.lua) and the pool's counters (includes/counters.lua) together, so a call reads both
  with one HGETALL and writes what changed with one HSET (flush_pool).
  Provides: init_config() (run by begin_call), POOL (the pool hash's fields as read, then as changed: pool_set), pool_set(field,
  value), pool_del(field), flush_pool(), CFG (settings, filled by load_cfg), load_cfg() -> false
  when the pool has no configuration (Redis lost its data), band_cfg(band) -> the band's parsed
  BAND_CONFIG record (cached per call), clock(override) -> pool-relative ms (TIME is read once
  per call, and only when a transition needs the time).
  Needs: contract.
]]
-- @include contract

-- State of one call, set afresh by init_config (each call runs begin_call first). POOL_READ:
-- the fields as read, so one that changed and changed back (a release that dispatches) is not
-- written.
local POOL, POOL_READ, POOL_DIRTY, POOL_GONE, CFG, BANDS, NOW
local function init_config()
  POOL, POOL_READ, POOL_DIRTY, POOL_GONE, CFG, BANDS, NOW = {}, {}, {}, {}, {}, {}, nil
  local v = rcall('HGETALL', K_POOL)
  for i = 1, #v, 2 do
    POOL[v[i]] = v[i + 1]
    POOL_READ[v[i]] = v[i + 1]
  end
end

local function pool_set(field, value)
  POOL[field] = value
  POOL_DIRTY[field] = true
  POOL_GONE[field] = nil
end

local function pool_del(field)
  POOL[field] = nil
  POOL_DIRTY[field] = nil
  POOL_GONE[field] = true
end

local function flush_pool()
  local args = {}
  for field in pairs(POOL_DIRTY) do
    if POOL[field] ~= POOL_READ[field] then
      args[#args + 1] = field
      args[#args + 1] = POOL[field]
      POOL_READ[field] = POOL[field]
    end
  end
  if #args > 0 then rcall('HSET', K_POOL, unpack(args)) end
  local gone = {}
  for field in pairs(POOL_GONE) do
    gone[#gone + 1] = field
    POOL_READ[field] = nil
  end
  if #gone > 0 then rcall('HDEL', K_POOL, unpack(gone)) end
  POOL_DIRTY, POOL_GONE = {}, {}
end

local function load_cfg()
  local r = POOL
  if not r.epoch then return false end
  -- After the pool's data was lost (Redis restarted empty), nothing is dispatched before this
  -- pool time, so every live replica can re-register what it still holds first (configure.lua).
  CFG.hold = tonumber(r.hold) or 0
  CFG.epoch, CFG.limit = tonumber(r.epoch), tonumber(r.limit)
  CFG.maxReq, CFG.maxBytes = tonumber(r.maxReq), tonumber(r.maxBytes)
  CFG.win, CFG.alpha, CFG.idle, CFG.maxTracked = tonumber(r.win), tonumber(r.alpha),
    tonumber(r.idle), tonumber(r.maxTracked)
  CFG.det = r.det
  CFG.stale, CFG.qdt, CFG.head = tonumber(r.stale), tonumber(r.qdt), tonumber(r.head)
  CFG.tokLimit = tonumber(r.tokLimit)
  return true
end

local function band_cfg(band)
  local b = BANDS[band]
  if b then return b end
  local raw = POOL[CFG_BAND .. band]
  -- An unlisted negative band takes defaultNegativePriorityBand when one is configured.
  if not raw and (tonumber(band) or 0) < 0 then raw = POOL[CFG_BAND_NEGATIVE] end
  if not raw then raw = POOL[CFG_BAND_DEFAULT] end
  b = parse_band(raw)
  BANDS[band] = b
  return b
end

-- The one clock: Redis TIME, unless a test passes an override (absolute ms). Read at most once
-- per call: every transition of a call sees the same time.
local function clock(override)
  if NOW then return NOW end
  local abs
  if override and override ~= '' then
    abs = tonumber(override)
  else
    local t = rcall('TIME')
    abs = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  NOW = abs - CFG.epoch
  return NOW
end
