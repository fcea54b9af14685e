--[[
  Enqueue a request and try to dispatch: the admission fast path in one round trip.
  Counts the request toward its workload's rate first, even if it is then rejected, so rejection
  cannot be gamed. With nothing queued and a free slot it is dispatched at once; otherwise it is
  checked against the queue caps, queued, and every dispatchable item is dispatched.
  Input:
    KEYS[1] pool prefix 'as:{<pool>}:'
    ARGV[1] time override, absolute ms ('' = Redis TIME)
    ARGV[2] caller replica id
    ARGV[3] priority band (integer)
    ARGV[4] flow (fairness id, escaped)
    ARGV[5] workload id (escaped; '' = anonymous)
    ARGV[6] criticality 1..5
    ARGV[7] request size, bytes
    ARGV[8] TTL in the queue, ms
    ARGV[9] lease, ms, for a slot held outside this replica (0 = held by the replica)
  Output:
    { status, item id, wait ms, outcome... } with status 1 dispatched, 0 queued,
    2 rejected_capacity, -1 no config; each following 'id|status|wait_ms' is another item of the
    caller that reached an outcome in this call.
]]
-- @include common
if not load_cfg() then return { S_NO_CONFIG } end
local now = clock(ARGV[1])
local caller, band, flow = ARGV[2], ARGV[3], ARGV[4]
local crit, bytes = tonumber(ARGV[6]), tonumber(ARGV[7])
local ttl, lease = tonumber(ARGV[8]), tonumber(ARGV[9])
local out = {}

local wid = track(ARGV[5], now)
count_request(wid, now)
if wid ~= '' then rerank_workload(wid, now) end

local st = rcall('HMGET', K_STATS, 'qn', 'qbytes', 'inflight')
local qn, qbytes, inflight = tonumber(st[1]) or 0, tonumber(st[2]) or 0, tonumber(st[3]) or 0

if qn == 0 and inflight < CFG.limit then
  -- Fast path: nothing waits, so nothing better waits; no queue structure is touched.
  local id = item_id(rcall('HINCRBY', K_STATS, 'seq', 1))
  rcall('HSET', K_INFLIGHT, id, caller .. '|' .. wid)
  rcall('HINCRBY', K_STATS, 'inflight', 1)
  rcall('HINCRBY', wkey(wid), 'active', 1)
  rcall('SADD', P .. 'own:' .. caller, id)
  if lease > 0 then rcall('ZADD', K_LEASES, int(now + lease), id) end
  record_wait(wid, 0)
  return reply(S_DISPATCHED, id, '0', out)
end

local b = band_cfg(band)
local bs = rcall('HMGET', P .. 'band:' .. band, 'n', 'bytes')
local bn, bbytes = tonumber(bs[1]) or 0, tonumber(bs[2]) or 0
if (CFG.maxReq > 0 and qn >= CFG.maxReq) or (CFG.maxBytes > 0 and qbytes + bytes > CFG.maxBytes)
  or (b.maxReq > 0 and bn >= b.maxReq) or (b.maxBytes > 0 and bbytes + bytes > b.maxBytes) then
  return reply(S_REJECTED_CAPACITY, '', '', out)
end

local id = item_id(rcall('HINCRBY', K_STATS, 'seq', 1))
local raw = caller .. '|' .. band .. '|' .. flow .. '|' .. wid .. '|' .. int(crit) .. '|'
  .. int(bytes) .. '|' .. int(now) .. '|' .. int(now + ttl) .. '|' .. int(lease)
queue_item(id, raw, parse_item(raw), now)
rcall('HINCRBY', wkey(wid), 'active', 1)
rcall('SADD', P .. 'own:' .. caller, id)
dispatch_ready(caller, now, out)

local mine = id .. '|'
for i, msg in ipairs(out) do
  if string.sub(msg, 1, #mine) == mine then
    table.remove(out, i)
    return reply(S_DISPATCHED, id, split(msg)[3], out)
  end
end
return reply(S_QUEUED, id, '', out)
