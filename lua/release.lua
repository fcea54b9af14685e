--[[
  Release an in-flight slot and dispatch whatever that frees. Idempotent.
  Input:
    KEYS[1] pool prefix 'as:{<pool>}:'
    ARGV[1] time override, absolute ms ('' = Redis TIME)
    ARGV[2] caller replica id
    ARGV[3] item id
  Output:
    { status, item id, '', outcome... }: status 1 released, 7 not in flight (already released or
    reclaimed), -1 no config; then 'id|status|wait_ms' for each item of the caller dispatched here.
]]
-- @include common
if not load_cfg() then return { S_NO_CONFIG } end
local now = clock(ARGV[1])
local out = {}
if not release_item(ARGV[3], now) then return reply(S_NOT_FOUND, ARGV[3], '', out) end
dispatch_ready(ARGV[2], now, out)
return reply(S_DISPATCHED, ARGV[3], '', out)
