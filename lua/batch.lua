--[[
  Several admission transitions in one call: the coalesced enqueues and releases that concurrent
  requests of one replica issued in the same event-loop turn. Each runs exactly as enqueue.lua or
  release.lua would (same functions, includes/transitions.lua), in the order given, atomically.
  Input:
    KEYS[1] pool prefix 'as:{<pool>}:'
    ARGV[1] time override, absolute ms ('' = Redis TIME)
    ARGV[2] caller replica id
    ARGV[3..] operations, one argument each (contract BATCH_ENQUEUE, BATCH_RELEASE):
              'e|band|flow|workload|criticality|bytes|ttl ms|lease ms|tokens|slo ms'
                                                                           (as enqueue.lua)
              'r|item id'                                                  (as release.lua)
  Output:
    { reply, reply, ... } one per operation, each as its script returns it; or { -1 } no config.
]]
-- @include transitions
local caller = ARGV[2]
-- Operation tags are one character (contract OP_ENQUEUE, OP_RELEASE).
local first = ARGV[3] or ''
-- The band of the first enqueue, if any, is read with the counters.
local first_band = nil
if string.sub(first, 1, 1) == OP_ENQUEUE then first_band = select(2, fields_op_enqueue(first)) end
if not load_cfg_hot(caller, first_band) then return { S_NO_CONFIG } end
local replies = {}
for i = 3, #ARGV do
  local arg = ARGV[i]
  local op = string.sub(arg, 1, 1)
  if op == OP_ENQUEUE then
    local _, band, flow, wid, crit, bytes, ttl, lease, tok, slo = fields_op_enqueue(arg)
    -- Small numbers are looked up rather than read by tonumber (its strtod is dear).
    replies[i - 2] = op_enqueue(clock(ARGV[1]), caller, band, flow, wid, tonum(crit), tonum(bytes),
      tonumber(ttl), tonum(lease), tonum(tok), tonum(slo))
  elseif op == OP_RELEASE then
    replies[i - 2] = op_release(ARGV[1], caller, string.sub(arg, #OP_RELEASE + #SEP + 1))
  else
    -- What ran before stays done, as it would have without the bad operation.
    flush_state()
    return redis.error_reply('batch: unknown operation ' .. tostring(arg))
  end
end
flush_state()
return replies
