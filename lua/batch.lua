--[[
  Several admission transitions in one call: the coalesced enqueues and releases that concurrent
  requests of one replica issued in the same event-loop turn. Each runs exactly as enqueue.lua or
  release.lua would (same functions, includes/transitions.lua), in the order given, atomically.
  Input:
    KEYS[1] pool prefix 'as:{<pool>}:'
    ARGV[1] time override, absolute ms ('' = Redis TIME)
    ARGV[2] caller replica id
    ARGV[3..] operations, back to back:
              'e', band, flow, workload, criticality, bytes, ttl ms, lease ms, tokens,
                   slo ms                                                  (as enqueue.lua)
              'r', item id                                                     (as release.lua)
  Output:
    { reply, reply, ... } one per operation, each as its script returns it; or { -1 } no config.
]]
-- @include transitions
-- The band of the first enqueue, if any, is read with the counters.
if not load_cfg_hot(ARGV[2], ARGV[3] == 'e' and ARGV[4] or nil) then return { S_NO_CONFIG } end
local caller = ARGV[2]
local replies, i = {}, 3
while i <= #ARGV do
  if ARGV[i] == 'e' then
    replies[#replies + 1] = op_enqueue(clock(ARGV[1]), caller, ARGV[i + 1], ARGV[i + 2],
      ARGV[i + 3], tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6]),
      tonumber(ARGV[i + 7]), tonumber(ARGV[i + 8]), tonumber(ARGV[i + 9]))
    i = i + 10
  elseif ARGV[i] == 'r' then
    replies[#replies + 1] = op_release(ARGV[1], caller, ARGV[i + 1])
    i = i + 2
  else
    -- What ran before stays done, as it would have without the bad operation.
    flush_state()
    return redis.error_reply('batch: unknown operation ' .. tostring(ARGV[i]))
  end
end
flush_state()
return replies
