--[[
  Make the pool's record of what a replica owns match what the replica really holds, after writes
  were lost (Redis failed over to a replica that had not received the last ones) or a release or
  dispatch went astray. Items younger than the grace period are left alone: their enqueue or
  release may still be on the wire.
  Input:
    KEYS[1] pool prefix 'as:{<pool>}:'
    ARGV[1] time override, absolute ms ('' = Redis TIME)
    ARGV[2] replica id
    ARGV[3] grace, ms
    ARGV[4] number of held slots that follow
    ARGV[5..] triples for each held slot: item id, workload id (escaped; '' = anonymous),
              estimated tokens
    ARGV[...] then the ids of the replica's queued requests
  Output:
    { 1, 'released|readded|dropped', missing, outcome... }: counts of in-flight items released
    (the replica does not hold them), held slots put back in flight (a lost dispatch: they are
    running, so they count), queued items dropped (the replica is not waiting for them);
    missing = ','-joined queued ids the pool lost (the replica re-queues them); then
    'id|status|wait_ms' for the caller's items dispatched by the releases. { -1 } no config.
]]
-- @include dispatch
if not load_cfg() then return { S_NO_CONFIG, foreign_layout() } end
local now = clock(ARGV[1])
local replica, grace = ARGV[2], tonumber(ARGV[3])
local num = owner_num(replica)
local hk = K_HELD .. num
local held, queued, i = {}, {}, 5
local held_tok = {}
for _ = 1, tonumber(ARGV[4]) do
  held[ARGV[i]] = ARGV[i + 1]
  held_tok[ARGV[i]] = tonumber(ARGV[i + 2])
  i = i + 3
end
while i <= #ARGV do
  queued[ARGV[i]] = true
  i = i + 1
end

local released, readded, dropped = 0, 0, 0
local v = rcall('HGETALL', hk)
for j = 1, #v, 2 do
  local id = v[j]
  if id ~= POOL_LAYOUT and not held[id] and not queued[id]
    and now - (parse_held(v[j + 1]).since or 0) >= grace then
    release_held(num, id)
    released = released + 1
  end
end

-- Queued items of the replica that it is not waiting for, found by scanning the item buckets
-- (bounded: a few thousand buckets; this runs only after writes were lost).
if owner_queued(num) > 0 then
  local top = item_bucket(ST.seq)
  local bucket, scanned = tonumber(POOL.ilo) or top, 0
  while bucket <= top and scanned < 4096 do
    local items = rcall('HGETALL', K_ITEMS .. int(bucket))
    for j = 1, #items, 2 do
      local rec = parse_item(items[j + 1])
      local id = item_id(bucket * ITEM_BUCKET + tonumber(items[j]))
      if tonumber(rec.owner) == tonumber(num) and not queued[id] and not held[id]
        and now - rec.enq >= grace then
        drop_queued(id, now)
        dropped = dropped + 1
      end
    end
    bucket, scanned = bucket + 1, scanned + 1
  end
end

for id, wid in pairs(held) do
  if rcall('HEXISTS', hk, id) == 0 and rcall('HEXISTS', K_LEASED, id) == 0 then
    local q = item_get(id)
    local tok = held_tok[id]
    if q then
      -- Its dispatch was lost but the request runs: out of the queue, into the count. Its
      -- workload's active count already includes it.
      local rec = parse_item(q)
      unqueue_item(id, rec, now)
      wid, tok = rec.wid, rec.tok
    else
      wid = track(wid, now)
      add_active(wid, 1)
    end
    grant_slot(num, replica, id, wid, now, 0, tok)
    readded = readded + 1
  end
end

local missing = {}
for id in pairs(queued) do
  if not item_get(id) and rcall('HEXISTS', hk, id) == 0 then missing[#missing + 1] = id end
end

local out = {}
if released > 0 or dropped > 0 then dispatch_ready(replica, now, out) end
flush_state()
return reply(1, encode_reconciled(released, readded, dropped), table.concat(missing, ID_LIST_SEP),
  out)
