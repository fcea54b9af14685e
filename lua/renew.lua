--[[
  Extend the lease of an externally held slot (a ticket from the admission API or gateway check).
  A slot the calling replica holds itself becomes a ticket's: it moves to the leased slots, so
  only its lease (or a release) ends it.
  Input:
    KEYS[1] pool prefix 'as:{<pool>}:'
    ARGV[1] time override, absolute ms ('' = Redis TIME)
    ARGV[2] item id
    ARGV[3] new lease from now, ms
    ARGV[4] caller replica id
  Output:
    { 1 } renewed, { 7 } not in flight (released or expired), { -1 } no config.
]]
-- @include owners
if not load_cfg() then return { S_NO_CONFIG, foreign_layout() } end
local now = clock(ARGV[1])
local id = ARGV[2]
if rcall('HEXISTS', K_LEASED, id) == 0 then
  local num = owner_known(ARGV[4] or '')
  local raw = num and rcall('HGET', K_HELD .. num, id)
  if not raw then return { S_NOT_FOUND } end
  local f = parse_held(raw)
  rcall('HDEL', K_HELD .. num, id)
  rcall('HSET', K_LEASED, id, encode_leased(ARGV[4], f.wid, f.since, f.tok))
end
rcall('ZADD', K_LEASES, int(now + tonumber(ARGV[3])), id)
return { 1 }
