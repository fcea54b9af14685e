--[[
  Renew a replica's lease. A replica whose lease runs out is presumed dead: maintain.lua reclaims
  its in-flight slots and drops its queued items. Lease 0 deregisters (graceful stop). A replica
  the pool did not know gets its owner number here (includes/owners.lua).
  Also compares how many items the pool says the replica owns with how many the replica knows
  of: a difference means writes were lost (a failover to a replica that had not received them)
  or are still on the wire, and the replica answers with reconcile.lua.
  Input:
    KEYS[1] pool prefix 'as:{<pool>}:'
    ARGV[1] time override, absolute ms ('' = Redis TIME)
    ARGV[2] replica id
    ARGV[3] lease, ms
    ARGV[4] items the replica knows it owns (held slots + queued requests); '' = do not compare
  Output:
    { known, epoch, differs }: known 1 if the replica was registered, 0 if not (first beat,
    reclaimed after a stall, or Redis restarted empty); the pool's epoch tells the two apart (a new
    epoch is a new pool: re-register; the same one means the lease ran out and what the replica
    held was reclaimed: stop using it); differs 1 when the owned counts disagree. { -1 } no config.
]]
-- @include owners
-- @include counters
if not load_cfg() then return { S_NO_CONFIG, foreign_layout() } end
local now = clock(ARGV[1])
local replica = ARGV[2]
local known = rcall('ZSCORE', K_REPLICAS, replica)
rcall('ZADD', K_REPLICAS, int(now + tonumber(ARGV[3])), replica)
local num = owner_known(replica)
-- Back after it was presumed dead (its old number is being reclaimed, or was): a new number, so
-- nothing it does from now on is taken for what it held before.
if not known and (not num or owner_reclaimed(num) or not owner_id(num)) then
  num = renumber(replica)
end
local differs = 0
if ARGV[4] and ARGV[4] ~= ''
  and rcall('HLEN', K_HELD .. num) - rcall('HEXISTS', K_HELD .. num, POOL_LAYOUT)
    + owner_queued(num) ~= tonumber(ARGV[4]) then
  differs = 1
end
flush_pool()
if known then return { 1, int(CFG.epoch), differs } end
return { 0, int(CFG.epoch), differs }
