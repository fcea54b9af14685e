--[[
  The pool's configuration and its one clock.
  Provides: CFG (pool-wide settings, filled by load_cfg), load_cfg() -> false when the pool has
  no configuration (Redis lost its data), band_cfg(band) -> the band's parsed BAND_CONFIG record
  (cached per call), clock(override) -> pool-relative ms.
  Needs: contract.
]]
-- @include contract

local CFG = {}
local function load_cfg()
  local v = rcall('HMGET', K_CFG, 'epoch', 'limit', 'maxReq', 'maxBytes', 'win', 'alpha', 'idle',
    'maxTracked', 'hold')
  if not v[1] then return false end
  -- After the pool's data was lost (Redis restarted empty), nothing is dispatched before this
  -- pool time, so every live replica can re-register what it still holds first (configure.lua).
  CFG.hold = tonumber(v[9]) or 0
  CFG.epoch, CFG.limit = tonumber(v[1]), tonumber(v[2])
  CFG.maxReq, CFG.maxBytes = tonumber(v[3]), tonumber(v[4])
  CFG.win, CFG.alpha, CFG.idle, CFG.maxTracked = tonumber(v[5]), tonumber(v[6]), tonumber(v[7]),
    tonumber(v[8])
  return true
end

local BANDS = {}
local function band_cfg(band)
  local b = BANDS[band]
  if b then return b end
  local raw = rcall('HGET', K_CFG, CFG_BAND .. band)
  -- An unlisted negative band takes defaultNegativePriorityBand when one is configured.
  if not raw and (tonumber(band) or 0) < 0 then raw = rcall('HGET', K_CFG, CFG_BAND_NEGATIVE) end
  if not raw then raw = rcall('HGET', K_CFG, CFG_BAND_DEFAULT) end
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
