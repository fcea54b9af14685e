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
    ARGV[10] estimated tokens (concurrency detector, tokens or hybrid mode)
    ARGV[11] TTFT objective, ms, for slo-deadline ordering (0 = none)
  Output:
    { status, item id, wait ms, outcome... } with status 1 dispatched, 0 queued,
    2 rejected_capacity, -1 no config; each following 'id|status|wait_ms' is another item of the
    caller that reached an outcome in this call.
]]
-- @include transitions
if not load_cfg_hot(ARGV[2], ARGV[3]) then return { S_NO_CONFIG, foreign_layout() } end
-- Small numbers are looked up rather than read by tonumber (its strtod is dear).
local r = reply(op_enqueue(clock(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonum(ARGV[6]),
  tonum(ARGV[7]), tonumber(ARGV[8]), tonum(ARGV[9]), tonum(ARGV[10]) or 0, tonum(ARGV[11]) or 0,
  op_out()))
flush_state()
return r
