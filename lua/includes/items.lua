--[[
  Queued item records, in bucket hashes of ITEM_BUCKET consecutive ids (items:<seq div N>, field
  <seq mod N>): short records in small hashes stay listpacks, which cost a fraction of one big
  hashtable per item.
  Provides: item_key(id) -> bucket key, field; item_bucket(id) -> bucket number; item_get(id) ->
  raw record or false; item_put(id, raw); item_del(id).
  Needs: contract.
]]
-- @include contract

local function item_bucket(id)
  return math.floor(tonumber(id) / ITEM_BUCKET)
end

local function item_key(id)
  local seq = tonumber(id)
  local bucket = math.floor(seq / ITEM_BUCKET)
  return K_ITEMS .. int(bucket), int(seq - bucket * ITEM_BUCKET)
end

local function item_get(id)
  local k, f = item_key(id)
  return rcall('HGET', k, f)
end

local function item_put(id, raw)
  local k, f = item_key(id)
  rcall('HSET', k, f, raw)
end

local function item_del(id)
  local k, f = item_key(id)
  rcall('HDEL', k, f)
end
