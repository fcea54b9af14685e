--[[
  Several admission transitions in one call: the coalesced enqueues and releases that concurrent
  requests of one replica issued in the same event-loop turn. Each runs exactly as enqueue.lua or
  release.lua would (same functions, includes/transitions.lua), in the order given, atomically.
  Input:
    KEYS[1] pool prefix 'as:{<pool>}:'
    ARGV[1] time override, absolute ms ('' = Redis TIME)
    ARGV[2] caller replica id
    ARGV[3..] operations, one argument each (contract BATCH_ENQUEUE, BATCH_RELEASE,
              BATCH_RELEASE_HELD):
              'e|band|flow|workload|criticality|bytes|ttl ms|lease ms|tokens|slo ms'
                                                                           (as enqueue.lua)
              'r|item id'                                                  (as release.lua)
              'h|item id|tokens|workload'                 (as release.lua with its ARGV[4..5])
  Output:
    { reply, reply, ... } one per operation: as its script returns it when it carries outcomes
    of other items, else an enqueue's three fields as one string (contract OP_REPLY: Redis
    converts a list reply element by element) and a release's status alone (an integer: 1 or
    7, never -1); or { -1 } no config.
]]
-- @include transitions
local caller = ARGV[2]
-- Operation tags are one character (contract OP_ENQUEUE, OP_RELEASE, OP_RELEASE_HELD).
local first = ARGV[3] or ''
-- The band of the first enqueue, if any, is read with the counters.
local first_band = nil
if string.sub(first, 1, 1) == OP_ENQUEUE then first_band = select(2, fields_op_enqueue(first)) end
if not load_cfg_hot(caller, first_band) then return { S_NO_CONFIG } end
-- The caller's new held slots are written together, when the call ends (includes/dispatch.lua).
do
  local num = rawget(POOL, REPLICA_NUMBER .. caller)
  if num then grants.defer(num) end
end
-- The call's time, read (clock) by the first enqueue.
local replies, out, now = {}, {}, nil
local HELD_ID_AT = #OP_RELEASE_HELD + #SEP + 1
local HELD_TOK_AT = HELD_ID_AT + ID_WIDTH + #SEP
for i = 3, #ARGV do
  local arg = ARGV[i]
  local op = string.sub(arg, 1, 1)
  local status, a, b
  if op == OP_ENQUEUE then
    local _, band, flow, wid, crit, bytes, ttl, lease, tok, slo = fields_op_enqueue(arg)
    -- Small numbers are looked up rather than read by tonumber (its strtod is dear), inline as
    -- the generated record code does (a call costs more than the lookup).
    now = now or clock(ARGV[1])
    status, a, b = op_enqueue(now, caller, band, flow, wid,
      SMALL_NUMBER[crit] or tonum(crit), SMALL_NUMBER[bytes] or tonum(bytes),
      SMALL_NUMBER[ttl] or tonum(ttl), SMALL_NUMBER[lease] or tonum(lease),
      SMALL_NUMBER[tok] or tonum(tok), SMALL_NUMBER[slo] or tonum(slo), out)
  elseif op == OP_RELEASE_HELD then
    -- By position (contract.BATCH_RELEASE_HELD): the id has ID_WIDTH characters; the tokens end
    -- at the next SEP; the workload is the rest.
    local id = string.sub(arg, HELD_ID_AT, HELD_TOK_AT - 2)
    local j = string.find(arg, SEP, HELD_TOK_AT, true)
    local tok = string.sub(arg, HELD_TOK_AT, j - 1)
    status, a, b = op_release(ARGV[1], caller, id, out, string.sub(arg, j + 1),
      SMALL_NUMBER[tok] or tonum(tok))
  elseif op == OP_RELEASE then
    status, a, b = op_release(ARGV[1], caller, string.sub(arg, #OP_RELEASE + #SEP + 1), out)
  else
    -- What ran before stays done, as it would have without the bad operation.
    flush_state()
    return redis.error_reply('batch: unknown operation ' .. tostring(arg))
  end
  -- A reply with no outcome of another item goes as one string; a release's as its status alone
  -- (the caller knows the id it released).
  if #out == 0 then
    if op == OP_ENQUEUE then
      -- encode_op_reply(status, a, b), inline: this runs for every enqueue.
      replies[i - 2] = (SMALL_TEXT[status] or int(status)) .. SEP .. a .. SEP .. b
    else
      replies[i - 2] = status
    end
  else
    replies[i - 2] = reply(status, a, b, out)
    out = {}
  end
end
flush_state()
return replies
