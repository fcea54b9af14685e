--[[
  The pool's configuration and its one clock.
  Provides: CFG (pool-wide settings, filled by load_cfg), load_cfg() -> false when the pool has
  no configuration (Redis lost its data), band_cfg(band) -> the band's parsed BAND_CONFIG record
  (cached per call), clock(override) -> pool-relative ms.
  Needs: contract.
]]
-- @include contract

-- The whole configuration hash, read once per call: pool settings and band records together
-- (a handful of short fields), so no script reads the hash twice.
local CFG_RAW = nil
local function cfg_raw()
  if not CFG_RAW then
    CFG_RAW = {}
    local v = rcall('HGETALL', K_CFG)
    for i = 1, #v, 2 do CFG_RAW[v[i]] = v[i + 1] end
  end
  return CFG_RAW
end

local CFG = {}
local function load_cfg()
  local r = cfg_raw()
  if not r.epoch then return false end
  -- After the pool's data was lost (Redis restarted empty), nothing is dispatched before this
  -- pool time, so every live replica can re-register what it still holds first (configure.lua).
  CFG.hold = tonumber(r.hold) or 0
  CFG.epoch, CFG.limit = tonumber(r.epoch), tonumber(r.limit)
  CFG.maxReq, CFG.maxBytes = tonumber(r.maxReq), tonumber(r.maxBytes)
  CFG.win, CFG.alpha, CFG.idle, CFG.maxTracked = tonumber(r.win), tonumber(r.alpha),
    tonumber(r.idle), tonumber(r.maxTracked)
  return true
end

local BANDS = {}
local function band_cfg(band)
  local b = BANDS[band]
  if b then return b end
  local r = cfg_raw()
  local raw = r[CFG_BAND .. band]
  -- An unlisted negative band takes defaultNegativePriorityBand when one is configured.
  if not raw and (tonumber(band) or 0) < 0 then raw = r[CFG_BAND_NEGATIVE] end
  if not raw then raw = r[CFG_BAND_DEFAULT] end
  b = parse_band(raw)
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
