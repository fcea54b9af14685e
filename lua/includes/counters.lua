--[[
  The queue counters that caps, dispatch and the state view read, all fields of the pool hash
  (includes/config.lua): queued count and bytes of the pool, in-flight count and the item
  sequence (ST), queued count and bytes of each band (n:<priority>, b:<priority>; '0' once the
  band emptied), queued count of each owner replica (q:<owner number>), and the list of bands
  whose count is above zero ('qb'), from which strict priority picks the highest.
  Provides: init_counters() (run by begin_call), ST = { qn, qbytes, inflight, seq, tok } (a
  table, not a function: a Lua call costs more than the lookup), stat_add(field, delta) -> new
  value, band_counts(band) -> n, bytes, queued_bands() -> the bands with queued items (pool field
  'qb'), top_band() -> the highest of them or nil,
  adjust_counts(rec, sign) for a parsed item record entering (+1) or leaving (-1),
  owner_queued(num) -> its queued count.
  Needs: contract, config.
]]
-- @include contract
-- @include config

-- The counters a call reads, each on first use (a fast-path release never needs the sequence).
local ST
local init_counters
do
  local ST_META = {
    __index = function(t, field)
      local v = pool_int(field)
      t[field] = v
      return v
    end,
  }
  function init_counters()
    -- Kept between calls (see clear in the contract include); made by the first call, since
    -- the library's top level runs without setmetatable.
    if not ST then
      ST = setmetatable({}, ST_META)
      return
    end
    -- The fields stat_add sets and callers read, emptied by name (cheaper than clear's `next`
    -- per key); clear only if some other field got in.
    ST.qn, ST.qbytes, ST.inflight, ST.seq, ST.tok = nil, nil, nil, nil, nil
    if next(ST) ~= nil then clear(ST) end
  end
end

local function stat_add(field, delta)
  local v = pool_add(field, delta, false)
  ST[field] = v
  return v
end

local function band_counts(band)
  return pool_int(BAND_QUEUED .. band), pool_int(BAND_BYTES .. band)
end

-- The bands with queued items, from the pool's 'qb' list (kept by adjust_counts), so no scan
-- of the pool's fields is needed. A pool written before the list existed has none: its bands
-- are found by a scan once, and the list is written from it. The caller must not change the
-- table: the last list's bands are remembered (a dispatch reads the list once per pick, and it
-- rarely changes).
local queued_bands
do
  local last_qb, last_bands = nil, {}
  local band_pattern = '[^' .. ID_LIST_SEP .. ']+'
  local function bands_of(qb)
    if qb == last_qb then return last_bands end
    local bands = {}
    if qb then
      for band in string.gmatch(qb, band_pattern) do bands[#bands + 1] = band end
    end
    last_qb, last_bands = qb, bands
    return bands
  end
  function queued_bands()
    local qb = POOL[QUEUED_BANDS]
    if qb == nil and ST.qn > 0 then
      pool_load_all()
      local found = {}
      for field, value in pairs(pool_fields()) do
        if string.sub(field, 1, #BAND_QUEUED) == BAND_QUEUED and value ~= '0' then
          found[#found + 1] = string.sub(field, #BAND_QUEUED + 1)
        end
      end
      qb = table.concat(found, ID_LIST_SEP)
      pool_set(QUEUED_BANDS, qb)
    end
    return bands_of(qb)
  end
end

local function top_band()
  local top = nil
  for _, band in ipairs(queued_bands()) do
    local n = tonumber(band)
    if not top or n > top then top = n end
  end
  if top then return int(top) end
  return nil
end

local function owner_queued(num)
  return pool_int(OWNER_QUEUED .. num)
end

local adjust_counts
do
  -- A band joined (+1) or left (-1) the bands with queued items.
  local function mark_band(band, sign)
    local bands, kept = queued_bands(), {}
    for _, b in ipairs(bands) do
      if b ~= band then kept[#kept + 1] = b end
    end
    if sign > 0 then kept[#kept + 1] = band end
    pool_set(QUEUED_BANDS, table.concat(kept, ID_LIST_SEP))
  end

  function adjust_counts(rec, sign)
    local band, h = rec.band, pool_hints()
    h.band = band
    if sign > 0 then h.queuer = rec.owner end
    stat_add('qn', sign)
    stat_add('qbytes', sign * rec.bytes)
    -- Counts never go below zero (data lost).
    local n, was = pool_add(BAND_QUEUED .. band, sign, true)
    if (was == 0) ~= (n == 0) then mark_band(band, sign) end
    pool_add(BAND_BYTES .. band, sign * rec.bytes, true)
    pool_add(OWNER_QUEUED .. rec.owner, sign, true)
  end
end
