--[[
  The queue counters that caps, dispatch and the state view read, all fields of the pool hash
  (includes/config.lua): queued count and bytes of the pool, in-flight count and the item
  sequence (stats), queued count and bytes of each band (n:<priority>, b:<priority>; '0' once the
  band emptied), queued count of each owner replica (q:<owner number>). Strict priority picks the
  highest band whose count is above zero, so no separate set of bands is kept.
  Provides: init_counters() (run by begin_call), stats() -> { qn, qbytes, inflight, seq, tok }, stat_add(field, delta) -> new value,
  band_counts(band) -> { n, bytes }, top_band() -> the highest band with queued items or nil,
  adjust_counts(rec, sign) for a parsed item record entering (+1) or leaving (-1),
  owner_queued(num) -> its queued count.
  Needs: contract, config.
]]
-- @include contract
-- @include config

local ST
local function init_counters()
  ST = nil
end

local function stats()
  if not ST then
    ST = { qn = tonumber(POOL.qn) or 0, qbytes = tonumber(POOL.qbytes) or 0,
      inflight = tonumber(POOL.inflight) or 0, seq = tonumber(POOL.seq) or 0,
      tok = tonumber(POOL.tok) or 0 }
  end
  return ST
end

local function stat_add(field, delta)
  local s = stats()
  s[field] = s[field] + delta
  pool_set(field, int(s[field]))
  return s[field]
end

local function band_counts(band)
  return { n = tonumber(POOL[BAND_QUEUED .. band]) or 0,
    bytes = tonumber(POOL[BAND_BYTES .. band]) or 0 }
end

local function top_band()
  local top = nil
  for field, value in pairs(POOL) do
    if string.sub(field, 1, #BAND_QUEUED) == BAND_QUEUED and value ~= '0' then
      local band = tonumber(string.sub(field, #BAND_QUEUED + 1))
      if not top or band > top then top = band end
    end
  end
  if top then return int(top) end
  return nil
end

local function owner_queued(num)
  return tonumber(POOL[OWNER_QUEUED .. num]) or 0
end

local function adjust_counts(rec, sign)
  stat_add('qn', sign)
  stat_add('qbytes', sign * rec.bytes)
  local c = band_counts(rec.band)
  pool_set(BAND_QUEUED .. rec.band, int(math.max(c.n + sign, 0)))
  pool_set(BAND_BYTES .. rec.band, int(math.max(c.bytes + sign * rec.bytes, 0)))
  pool_set(OWNER_QUEUED .. rec.owner, int(math.max(owner_queued(rec.owner) + sign, 0)))
end
