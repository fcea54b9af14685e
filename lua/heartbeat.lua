--[[
  Renew a replica's lease. A replica whose lease runs out is presumed dead: maintain.lua reclaims
  its in-flight slots and drops its queued items. Lease 0 deregisters (graceful stop).
  Input:
    KEYS[1] pool prefix 'as:{<pool>}:'
    ARGV[1] time override, absolute ms ('' = Redis TIME)
    ARGV[2] replica id
    ARGV[3] lease, ms
  Output:
    { 1 } if the replica was registered, { 0 } if it was not (first beat, reclaimed after a stall,
    or Redis restarted empty: the caller should re-register what it holds), { -1 } no config.
]]
-- @include common
if not load_cfg() then return { S_NO_CONFIG } end
local now = clock(ARGV[1])
local known = rcall('ZSCORE', K_REPLICAS, ARGV[2])
rcall('ZADD', K_REPLICAS, int(now + tonumber(ARGV[3])), ARGV[2])
if known then return { 1 } end
return { 0 }
