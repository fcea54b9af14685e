--[[
  The ordering policies in Lua: the key a lane is ranked by (lower dispatches first). fcfs ranks
  by the head's sequence, edf by its deadline, workload-aware by minus the head's score plus its
  aging term, computed as a part of the workload plus a part of the head, so a workload's lanes
  are ranked among themselves by the head part alone (includes/lanes.lua).
  Workload-aware keys are whole numbers (the parts in units of 1 / RANK_KEY_SCALE, see
  sidecar/contract.py): Redis stores them in listpacks as integers.
  Python twins: sidecar/policies/ordering.py WorkloadAwareOrdering.workload_key, head_key and
  sort_key (same operations, same order, same doubles).
  Provides: workload_key(ema, rate, b), head_key(b, crit, head), lane_key(b, lane, head,
  in_lane, m, now).
  Needs: contract, items, registry.
]]
-- @include contract
-- @include items
-- @include registry

local workload_key, head_key
do
  -- A part of a key in whole units, rounded half up (Python twin: ordering.py rank_units).
  local function rank_units(x)
    return math.floor(x * RANK_KEY_SCALE + 0.5)
  end

  function workload_key(ema, rate, b)
    local wait_part = math.min(ema / b.maxWait, 1.0) * b.wW
    local rate_part = math.min(rate / b.maxRate, 1.0) * b.rW
    return rank_units(rate_part - wait_part)
  end

  function head_key(b, crit, head)
    local age_part = 0
    -- With agingWeight 0 (the default) the age term is exactly 0: skip reading the head's record.
    if b.aging ~= 0 then
      age_part = b.aging * (parse_item(item_get(head)).enq / 1000.0) / b.maxWait
    end
    return rank_units(age_part - (crit / 5.0) * b.cW)
  end
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
  return workload_key(ema, rate, b) + head_key(b, lane.crit, head)
end
