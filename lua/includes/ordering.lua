--[[
  The ordering policies in Lua: the key a lane is ranked by (lower dispatches first). fcfs ranks
  by the head's sequence, edf by its deadline, workload-aware by minus the head's score.
  Python twins: sidecar/policies/ordering.py (same operations, same order, same doubles).
  Provides: wa_score(ema, rate, crit, b), lane_key(b, lane, head, in_lane, m, now).
  Needs: contract, registry.
]]
-- @include contract
-- @include registry

-- The workload-aware score; Python twin: WorkloadAwareOrdering.score.
local function wa_score(ema, rate, crit, b)
  local wait_part = math.min(ema / b.maxWait, 1.0) * b.wW
  local crit_part = (crit / 5.0) * b.cW
  local rate_part = math.min(rate / b.maxRate, 1.0) * b.rW
  return wait_part + crit_part - rate_part
end

-- `lane` is the parsed lane id; `in_lane` the head's key inside its lane (seq, or the deadline
-- for edf); `m` optionally holds the workload's metrics {ema, rate} when the caller read them.
local function lane_key(b, lane, head, in_lane, m, now)
  if b.order ~= ORDER_WA then return in_lane end
  local ema, rate
  if m then
    ema, rate = m[1], m[2]
  else
    ema, rate = workload_metrics(lane.wid, now)
  end
  local score = wa_score(ema, rate, lane.crit, b)
  -- With agingWeight 0 (the default) the age term is exactly 0: skip reading the head's record.
  if b.aging == 0 then return -score end
  local enq = parse_item(rcall('HGET', K_ITEMS, head)).enq
  local age_part = b.aging * (enq / 1000.0) / b.maxWait
  return -(score - age_part)
end
