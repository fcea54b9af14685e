--[[
  Write the pool's configuration, read by every other script. Each replica runs it at start and
  whenever a script answers 'no config' (Redis restarted empty). The pool's epoch (time origin) and
  sequence and counters (the same hash) survive reconfiguration; a fresh pool starts its sequence at epoch*1000 so item ids never
  repeat those of an earlier incarnation that replicas may still re-register. A fresh pool also
  holds dispatch for the recovery hold: if Redis lost the pool's data, replicas still run requests
  they were admitted for, and none may be admitted before those are counted again (reregister.lua).
  Input:
    KEYS[1] pool prefix 'as:{<pool>}:'
    ARGV[1] time override, absolute ms ('' = Redis TIME)
    ARGV[2..] field, value pairs: limit, maxReq, maxBytes, win (ms), alpha, idle (ms), maxTracked,
             recover (ms: the hold on a fresh pool; 0 = none), and the optional settings
             (contract CFG_OPTIONAL; one left out is deleted),
             and 'band:<priority>' / 'band:*' (default template) =
             'fairness|ordering|maxReq|maxBytes|wW|cW|rW|maxWait s|maxRate|aging'
  Output:
    { 1, epoch } fresh pool, { 0, epoch } updated, { -2, band } refused: that band has queued items and the new
    configuration changes its fairness or ordering policy (its queue structures would be orphaned);
    { -3, note } refused: the pool is in another Redis layout, named by its note (contract
    LAYOUT_VERSION, POOL_LAYOUT).
]]
-- @include items
-- @include counters
pool_load_all()
local abs
if ARGV[1] ~= '' then
  abs = tonumber(ARGV[1])
else
  local t = rcall('TIME')
  abs = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local new = {}
for i = 2, #ARGV - 1, 2 do new[ARGV[i]] = ARGV[i + 1] end

local epoch, hold = POOL.epoch, POOL.hold or '0'
local fresh = not epoch
-- A pool another version of the sidecar writes in its own Redis layout is left as it is: its
-- replicas keep running on it (docs/upgrading.md).
local foreign = not fresh and foreign_layout()
if foreign then return { S_LAYOUT_MISMATCH, foreign } end
if not fresh then
  for field, n in pairs(pool_fields()) do
    if string.sub(field, 1, #BAND_QUEUED) == BAND_QUEUED and n ~= '0' then
      local band = string.sub(field, #BAND_QUEUED + 1)
      local old = band_cfg(band)
      -- An unlisted negative band follows the negative template when there is one (as band_cfg).
      local template = (tonumber(band) or 0) < 0 and new[CFG_BAND_NEGATIVE] or nil
      local now_cfg = parse_band(new[CFG_BAND .. band] or template or new[CFG_BAND_DEFAULT])
      if old.fair ~= now_cfg.fair or old.order ~= now_cfg.order then return { S_CONFLICT, band } end
    end
  end
  -- Band records the new configuration no longer lists.
  for field in pairs(POOL) do
    if string.sub(field, 1, #CFG_BAND) == CFG_BAND and not new[field] then pool_del(field) end
  end
else
  epoch = int(abs)
  hold = int(tonumber(new['recover'] or '0'))
  -- Ids continue from epoch*1000, so they never repeat those of an earlier incarnation.
  local seq = abs * 1000
  pool_set('seq', int(seq))
  pool_set('ilo', int(item_bucket(seq)))
  pool_set('dl0', '0')
  pool_set(QUEUED_BANDS, '')
end
-- Optional settings the new configuration leaves out (a detector or a mode switched off).
for _, field in ipairs(CFG_OPTIONAL) do
  if not new[field] and POOL[field] then pool_del(field) end
end
pool_set('epoch', epoch)
pool_set('hold', hold)
for k, v in pairs(new) do pool_set(k, v) end
-- Keeps the hash a hashtable (contract POOL_LAYOUT): its fields are found without a scan. It
-- names the layout, and goes into the digest.
pool_set(POOL_LAYOUT, POOL_LAYOUT_NOTE)
-- The digest the hot scripts check their cached configuration against (includes/config.lua).
pool_set(CFG_DIGEST, config_digest())
flush_pool()
if fresh then return { 1, epoch } end
return { 0, epoch }
