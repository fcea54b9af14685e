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
    ARGV[5..] pairs for each held slot: item id, workload id (escaped; '' = anonymous)
    ARGV[...] then the ids of the replica's queued requests
  Output:
    { 1, 'released|readded|dropped', missing, outcome... }: counts of in-flight items released
    (the replica does not hold them), held slots put back in flight (a lost dispatch: they are
    running, so they count), queued items dropped (the replica is not waiting for them);
    missing = ','-joined queued ids the pool lost (the replica re-queues them); then
    'id|status|wait_ms' for the caller's items dispatched by the releases. { -1 } no config.
]]
-- @include dispatch
if not load_cfg() then return { S_NO_CONFIG } end
local now = clock(ARGV[1])
local replica, grace = ARGV[2], tonumber(ARGV[3])
local own = K_OWN .. replica
local held, queued, i = {}, {}, 5
for _ = 1, tonumber(ARGV[4]) do
  held[ARGV[i]] = ARGV[i + 1]
  i = i + 2
end
while i <= #ARGV do
  queued[ARGV[i]] = true
  i = i + 1
end

local released, readded, dropped = 0, 0, 0
for _, id in ipairs(rcall('SMEMBERS', own)) do
  if not held[id] and not queued[id] then
    local raw = rcall('HGET', K_INFLIGHT, id)
    if raw then
      if now - (parse_inflight(raw).since or 0) >= grace then
        release_item(id, now)
        released = released + 1
      end
    else
      local q = rcall('HGET', K_ITEMS, id)
      if not q then
        rcall('SREM', own, id)
      elseif now - parse_item(q).enq >= grace then
        drop_queued(id, now)
        dropped = dropped + 1
      end
    end
  end
end

for id, wid in pairs(held) do
  if rcall('HEXISTS', K_INFLIGHT, id) == 0 then
    local q = rcall('HGET', K_ITEMS, id)
    if q then
      -- Its dispatch was lost but the request runs: out of the queue, into the count. Its
      -- workload's active count already includes it.
      local rec = parse_item(q)
      unqueue_item(id, rec, now)
      wid = rec.wid
    else
      wid = track(wid, now)
      add_active(wid, 1)
    end
    rcall('HSET', K_INFLIGHT, id, encode_inflight(replica, wid, now))
    stat_add('inflight', 1)
    rcall('SADD', own, id)
    readded = readded + 1
  end
end

local missing = {}
for id in pairs(queued) do
  if rcall('HEXISTS', K_ITEMS, id) == 0 and rcall('HEXISTS', K_INFLIGHT, id) == 0 then
    missing[#missing + 1] = id
  end
end

local out = {}
if released > 0 or dropped > 0 then dispatch_ready(replica, now, out) end
flush_state()
return reply(1, encode_reconciled(released, readded, dropped), table.concat(missing, ID_LIST_SEP),
  out)
