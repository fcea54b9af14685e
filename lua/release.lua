--[[
  Release an in-flight slot and dispatch whatever that frees. Idempotent.
  Input:
    KEYS[1] pool prefix 'as:{<pool>}:'
    ARGV[1] time override, absolute ms ('' = Redis TIME)
    ARGV[2] caller replica id
    ARGV[3] item id
    ARGV[4], ARGV[5] optional: the tokens and the workload (escaped id) the caller enqueued it
            with, when the caller holds the slot (contract.BATCH_RELEASE_HELD: the pool deletes
            the slot's record without reading it first)
  Output:
    { status, item id, '', outcome... }: status 1 released, 7 not in flight (already released or
    reclaimed), -1 no config; then 'id|status|wait_ms' for each item of the caller dispatched here.
]]
-- @include transitions
if not load_cfg_hot(ARGV[2]) then return { S_NO_CONFIG, foreign_layout() } end
local tok = ARGV[4]
if tok then tok = NUMBER_OF[tok] or tonum(tok) end
local r = reply(op_release(ARGV[1], ARGV[2], ARGV[3], op_out(), ARGV[5], tok))
flush_state()
return r
