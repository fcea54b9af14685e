--[[
  Several admission transitions in one call: the coalesced enqueues and releases that concurrent
  requests of one replica issued in the same event-loop turn. Each runs exactly as enqueue.lua or
  release.lua would (same functions, includes/transitions.lua), in the order given, atomically.
  Input:
    KEYS[1] pool prefix 'as:{<pool>}:'
    ARGV[1] time override, absolute ms ('' = Redis TIME)
    ARGV[2] caller replica id
    ARGV[3] the operations, one MessagePack stream (contract batch_ops, decoded by
            includes/operations.lua): each operation's tag, then its fields, then the next's:
              OP_ENQUEUE band flow workload criticality bytes ttl-ms lease-ms tokens slo-ms
                                                                           (as enqueue.lua)
              OP_RELEASE item-id                                           (as release.lua)
              OP_RELEASE_HELD item-id tokens workload     (as release.lua with its ARGV[4..5])
  Output:
    { reply, reply, ... } one per operation: as its script returns it when it carries outcomes
    of other items, else an enqueue's three fields as one string (contract OP_REPLY: Redis
    converts a list reply element by element) and a release's status alone (an integer: 1 or
    7, never -1); or { -1 } no config; an error if the operations do not decode.
]]
-- @include transitions
-- @include operations
local caller = ARGV[2]
local ops = decode_operations(ARGV[3])
if not ops then return redis.error_reply('batch: the operations are not a MessagePack stream') end
-- The band of the first enqueue, if any, is read with the counters.
local first_band = nil
if ops[1] == OP_ENQUEUE then first_band = fields_op_enqueue(ops, 1) end
if not load_cfg_hot(caller, first_band) then return { S_NO_CONFIG, foreign_layout() } end
-- The caller's new held slots are written together, when the call ends (includes/dispatch.lua).
do
  local num = rawget(POOL, REPLICA_NUMBER .. caller)
  if num then grants.defer(num) end
end
-- The call's time, read (clock) by the first enqueue.
local replies, out, now = {}, {}, nil
local at, last, k = 1, #ops, 0
while at <= last do
  local op = ops[at]
  local arity = OP_ARITY[op]
  if not arity or at + arity - 1 > last then
    -- What ran before stays done, as it would have without the bad operation.
    flush_state()
    return redis.error_reply('batch: unknown or cut short operation ' .. tostring(op))
  end
  local status, a, b
  if op == OP_ENQUEUE then
    local band, flow, wid, crit, bytes, ttl, lease, tok, slo = fields_op_enqueue(ops, at)
    now = now or clock(ARGV[1])
    status, a, b = op_enqueue(now, caller, band, flow, wid, crit, bytes, ttl, lease, tok, slo, out)
  elseif op == OP_RELEASE_HELD then
    local id, tok, wid = fields_op_release_held(ops, at)
    status, a, b = op_release(ARGV[1], caller, id, out, wid, tok)
  else
    -- OP_RELEASE: its one field is the item id.
    status, a, b = op_release(ARGV[1], caller, ops[at + 1], out)
  end
  at, k = at + arity, k + 1
  -- A reply with no outcome of another item goes as one string; a release's as its status alone
  -- (the caller knows the id it released).
  if #out == 0 then
    if op == OP_ENQUEUE then
      -- encode_op_reply(status, a, b), inline: this runs for every enqueue.
      replies[k] = (TEXT_OF[status] or int(status)) .. SEP .. a .. SEP .. b
    else
      replies[k] = status
    end
  else
    replies[k] = reply(status, a, b, out)
    out = {}
  end
end
flush_state()
return replies
