--[[
  Re-register slots a replica still holds after Redis lost them (restart, or failover to a replica
  that had not received them). Items already in flight are left as they are, so a retry is safe.
  The slots count toward the limit like any other: configure.lua holds dispatch on a fresh pool
  until live replicas have done this, so they are counted before anything new is admitted.
  Input:
    KEYS[1] pool prefix 'as:{<pool>}:'
    ARGV[1] time override, absolute ms ('' = Redis TIME)
    ARGV[2] replica id
    ARGV[3..] quadruples: item id, workload id (escaped; '' = anonymous), lease ms: 0 for a slot
              the replica holds itself, else the remaining lease of a ticket it issued, and its
              estimated tokens
  Output:
    { number of slots added }, or { -1 } no config.
]]
-- @include dispatch
if not load_cfg() then return { S_NO_CONFIG, foreign_layout() } end
local now = clock(ARGV[1])
local replica, added = ARGV[2], 0
local num = owner_num(replica)
for i = 3, #ARGV - 3, 4 do
  local id, wid, lease, tok = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  if rcall('HEXISTS', K_HELD .. num, id) == 0 and rcall('HEXISTS', K_LEASED, id) == 0 then
    wid = track(wid, now)
    grant_slot(num, replica, id, wid, now, lease, tok)
    add_active(wid, 1)
    added = added + 1
  end
end
flush_state()
return { added }
