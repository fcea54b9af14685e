--[[
  A saturation sample for the utilization detector: the replica holding the pool's scrape lease
  (sidecar/telemetry/scraper.py) writes what the model servers' metrics say, stamped with Redis
  time, and dispatches what that frees at once, so no polling decides dispatch latency.
  Dispatch reads the sample in the same call as the queue (includes/dispatch.lua has_capacity).
  Input:
    KEYS[1] pool prefix 'as:{<pool>}:'
    ARGV[1] time override, absolute ms ('' = Redis TIME)
    ARGV[2] caller replica id
    ARGV[3] pool saturation (the average over endpoints; 1 or more is full)
    ARGV[4] stale endpoints (counted as full)
    ARGV[5] endpoints
  Output:
    { 1, '', '', outcome... }: 'id|status|wait_ms' for each item of the caller dispatched here;
    { -1 } no config.
]]
-- @include dispatch
if not load_cfg() then return { S_NO_CONFIG, foreign_layout() } end
local now = clock(ARGV[1])
pool_set('sat', fmt(tonumber(ARGV[3])))
pool_set('satT', int(now))
pool_set('satStale', int(tonumber(ARGV[4])))
pool_set('satN', int(tonumber(ARGV[5])))
pool_set('since', '0')
local out = {}
dispatch_ready(ARGV[2], now, out)
flush_state()
return reply(1, '', '', out)
