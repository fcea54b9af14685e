--[[
  The queue counters that caps and the state view read: queued count and bytes of the pool
  (stats) and of each band (band:<priority>), queued count per flow (flowlen), and the set of
  bands with queued items (bands, which strict priority picks from).
  Provides: adjust_counts(rec, sign) for a parsed item record entering (+1) or leaving (-1).
  Needs: contract.
]]
-- @include contract

local function adjust_counts(rec, sign)
  local bk = K_BAND .. rec.band
  rcall('HINCRBY', K_STATS, 'qn', sign)
  rcall('HINCRBY', K_STATS, 'qbytes', int(sign * rec.bytes))
  rcall('HINCRBY', bk, 'bytes', int(sign * rec.bytes))
  local fk = encode_flow(rec.band, rec.flow)
  if rcall('HINCRBY', K_FLOWLEN, fk, sign) <= 0 then rcall('HDEL', K_FLOWLEN, fk) end
  local n = rcall('HINCRBY', bk, 'n', sign)
  if n > 0 then
    rcall('ZADD', K_BANDS, rec.band, rec.band)
  else
    rcall('ZREM', K_BANDS, rec.band)
    rcall('DEL', bk)
  end
end
