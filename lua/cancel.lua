--[[
  Take a queued request out: its client went away, or its TTL ran out on the owning replica.
  If it was dispatched in the meantime (a race the caller cannot see), a cancelled request's slot is
  released at once, while an expiring one is reported dispatched so the caller can still use it.
  Input:
    KEYS[1] pool prefix 'as:{<pool>}:'
    ARGV[1] time override, absolute ms ('' = Redis TIME)
    ARGV[2] caller replica id
    ARGV[3] item id
    ARGV[4] reason: 4 evicted_cancelled or 3 evicted_ttl
  Output:
    { status, item id, detail, outcome... }: status = the reason when removed from the queue;
    1 when it was already in flight (detail 'released' if this call freed it); 7 when unknown
    (evicted or reclaimed before); -1 no config. Then 'id|status|wait_ms' for the caller's items
    dispatched by a release here.
]]
-- @include dispatch
if not load_cfg() then return { S_NO_CONFIG, foreign_layout() } end
local now = clock(ARGV[1])
local caller, id, reason = ARGV[2], ARGV[3], tonumber(ARGV[4])
local function cancel(out)
  if drop_queued(id, now) then return reply(reason, id, '', out) end
  local num = owner_known(caller)
  local held = num and rcall('HEXISTS', K_HELD .. num, id) == 1
  if held or rcall('HEXISTS', K_LEASED, id) == 1 then
    if reason == S_EVICTED_CANCELLED then
      release_item(caller, id)
      dispatch_ready(caller, now, out)
      return reply(S_DISPATCHED, id, 'released', out)
    end
    return reply(S_DISPATCHED, id, '', out)
  end
  return reply(S_NOT_FOUND, id, '', out)
end
local r = cancel({})
flush_state()
return r
