--[[
  Re-register slots a replica still holds after Redis lost them (restart, or the replica's lease
  was reclaimed during a stall). Items already in flight are left as they are, so a retry is safe.
  The slots count toward the limit even above it: those requests really are running.
  Input:
    KEYS[1] pool prefix 'as:{<pool>}:'
    ARGV[1] time override, absolute ms ('' = Redis TIME)
    ARGV[2] replica id
    ARGV[3..] pairs: item id, workload id (escaped; '' = anonymous)
  Output:
    { number of slots added }, or { -1 } no config.
]]
-- @include common
if not load_cfg() then return { S_NO_CONFIG } end
local now = clock(ARGV[1])
local replica, added = ARGV[2], 0
for i = 3, #ARGV - 1, 2 do
  local id, wid = ARGV[i], ARGV[i + 1]
  if rcall('HEXISTS', K_INFLIGHT, id) == 0 then
    wid = track(wid, now)
    rcall('HSET', K_INFLIGHT, id, replica .. '|' .. wid)
    rcall('HINCRBY', K_STATS, 'inflight', 1)
    rcall('HINCRBY', wkey(wid), 'active', 1)
    added = added + 1
  end
  rcall('SADD', P .. 'own:' .. replica, id)
end
return { added }
