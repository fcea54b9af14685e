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

-- The last id's key and field are remembered (a dispatch reads an item, then deletes it; ids
-- queued together share a bucket), so its number is read and formatted once.
local item_key
do
  local last_id, last_items, last_key, last_field
  local bucket_of, bucket_key = nil, nil
  function item_key(id)
    if id == last_id and K_ITEMS == last_items then return last_key, last_field end
    local seq = NUMBER_OF[id] or tonum(id)
    local bucket = math.floor(seq / ITEM_BUCKET)
    local key = bucket_key
    if bucket ~= bucket_of or K_ITEMS ~= last_items then
      key = K_ITEMS .. int(bucket)
      bucket_of, bucket_key = bucket, key
    end
    local field = seq - bucket * ITEM_BUCKET
    last_id, last_items, last_key, last_field = id, K_ITEMS, key, TEXT_OF[field] or int(field)
    return key, last_field
  end
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
