--[[
  Replicas as owners of items, interned in the pool hash: r:<replica id> -> its number and
  o:<number> -> the id, so item records name their owner in a few bytes. Numbers come from the
  pool's rseq and are never reused: a replica presumed dead keeps its old number while
  maintain.lua reclaims what that number owns (x:<number> holds the scan cursor), and gets a
  new number when it comes back (heartbeat.lua), so nothing it does afresh is reclaimed.
  Provides: owner_num(replica) -> number (assigned on first use), owner_known(replica) ->
  number or nil, owner_id(num) -> replica id or nil, owner_reclaimed(num) -> whether its items
  are being reclaimed, renumber(replica) -> a fresh number for the replica.
  Needs: contract, config.
]]
-- @include contract
-- @include config

local function owner_known(replica)
  return POOL[REPLICA_NUMBER .. replica]
end

local function renumber(replica)
  local num = int((tonumber(POOL.rseq) or 0) + 1)
  pool_set('rseq', num)
  pool_set(REPLICA_NUMBER .. replica, num)
  pool_set(OWNER_ID .. num, replica)
  -- Its held hash a hashtable from the start (contract.POOL_LAYOUT).
  rcall('HSET', K_HELD .. num, POOL_LAYOUT, POOL_LAYOUT_NOTE)
  return num
end

-- (owner_known's lookup inline: this runs for every admission.)
local function owner_num(replica)
  return POOL[REPLICA_NUMBER .. replica] or renumber(replica)
end

local function owner_id(num)
  return POOL[OWNER_ID .. num]
end

local function owner_reclaimed(num)
  return POOL[RECLAIM .. num] ~= nil
end
