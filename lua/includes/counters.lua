--[[
  The queue counters that caps and the state view read: queued count and bytes of the pool
  (stats) and of each band (band:<priority>), queued count per flow (flowlen), and the set of
  bands with queued items (bands, which strict priority picks from).
  The stats and band hashes are read at most once per call and kept here; what changed is
  written back once, by flush_counts, which every script that changes counts calls before it
  returns. The bands set is written only when a band empties or gains its first item, at once,
  because dispatch reads it within the call.
  Provides: stats() -> { qn, qbytes, inflight, seq }, stat_add(field, delta) -> new value,
  band_counts(band) -> { n, bytes }, adjust_counts(rec, sign) for a parsed item record entering
  (+1) or leaving (-1), flush_counts().
  Needs: contract.
]]
-- @include contract

-- ST_READ: the values as read, so a field that changed and changed back (a release that
-- dispatches) is not written.
local ST, ST_READ, ST_DIRTY = nil, {}, {}
local function stats()
  if not ST then
    local v = rcall('HMGET', K_STATS, 'qn', 'qbytes', 'inflight', 'seq')
    ST = { qn = tonumber(v[1]) or 0, qbytes = tonumber(v[2]) or 0, inflight = tonumber(v[3]) or 0,
      seq = tonumber(v[4]) or 0 }
    for field, value in pairs(ST) do ST_READ[field] = value end
  end
  return ST
end

local function stat_add(field, delta)
  local s = stats()
  s[field] = s[field] + delta
  ST_DIRTY[field] = true
  return s[field]
end

local BAND_COUNTS = {}
local function band_counts(band)
  local c = BAND_COUNTS[band]
  if not c then
    local v = rcall('HMGET', K_BAND .. band, 'n', 'bytes')
    c = { n = tonumber(v[1]) or 0, bytes = tonumber(v[2]) or 0, dirty = false }
    BAND_COUNTS[band] = c
  end
  return c
end

local function adjust_counts(rec, sign)
  stat_add('qn', sign)
  stat_add('qbytes', sign * rec.bytes)
  local c = band_counts(rec.band)
  local was = c.n
  c.n, c.bytes, c.dirty = c.n + sign, c.bytes + sign * rec.bytes, true
  if was <= 0 and c.n > 0 then
    rcall('ZADD', K_BANDS, rec.band, rec.band)
  elseif was > 0 and c.n <= 0 then
    rcall('ZREM', K_BANDS, rec.band)
  end
  local fk = encode_flow(rec.band, rec.flow)
  if rcall('HINCRBY', K_FLOWLEN, fk, sign) <= 0 then rcall('HDEL', K_FLOWLEN, fk) end
end

local function flush_counts()
  local args = {}
  for field in pairs(ST_DIRTY) do
    if ST[field] ~= ST_READ[field] then
      args[#args + 1] = field
      args[#args + 1] = int(ST[field])
      ST_READ[field] = ST[field]
    end
  end
  if #args > 0 then rcall('HSET', K_STATS, unpack(args)) end
  ST_DIRTY = {}
  for band, c in pairs(BAND_COUNTS) do
    if c.dirty then
      if c.n > 0 then
        rcall('HSET', K_BAND .. band, 'n', int(c.n), 'bytes', int(c.bytes))
      else
        rcall('DEL', K_BAND .. band)
      end
      c.dirty = false
    end
  end
end
