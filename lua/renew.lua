--[[
  Extend the lease of an externally held slot (a ticket from the admission API or gateway check).
  Input:
    KEYS[1] pool prefix 'as:{<pool>}:'
    ARGV[1] time override, absolute ms ('' = Redis TIME)
    ARGV[2] item id
    ARGV[3] new lease from now, ms
  Output:
    { 1 } renewed, { 7 } not in flight (released or expired), { -1 } no config.
]]
-- @include config
if not load_cfg() then return { S_NO_CONFIG } end
local now = clock(ARGV[1])
local raw = rcall('HGET', K_INFLIGHT, ARGV[2])
if not raw then return { S_NOT_FOUND } end
local f = parse_inflight(raw)
-- A slot its replica held until now gets a lease: mark it, so its release removes the lease.
if not f.leased then
  rcall('HSET', K_INFLIGHT, ARGV[2], encode_inflight(f.owner, f.wid, f.since, 1))
end
rcall('ZADD', K_LEASES, int(now + tonumber(ARGV[3])), ARGV[2])
return { 1 }
