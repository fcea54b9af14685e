--[[
  batch.lua's operations: one MessagePack stream (sidecar/contract.py batch_ops), decoded into one
  list of values, texts and numbers, which the generated fields_<operation>(values, at) read by
  position. Redis decodes it with its cmsgpack library in one C call (every value lands on the Lua
  stack first: sidecar/store/coalesce.py MAX_BATCH keeps a call far below Lua's 8000). An
  embedded store (fakeredis, whose Lua has no cmsgpack) decodes it here, in Lua: only what
  batch_ops writes (texts and integers).
  Provides: decode_operations(blob, in_lua) -> the values, or nil if `blob` is not such a
  stream; `in_lua`: decode it here even where cmsgpack exists (tests/test_batch_operations.py
  checks that both decode alike).
  Needs: nothing.
]]

-- (The helpers are fields of one table, in a do block: the library's main chunk may have 200
-- locals, counted where they are declared, and this is included late.)
local decode_operations
do
  local my = {
    -- After a type byte: an integer's bytes (big-endian; 0xd0.. are signed), a text's length's.
    INT_BYTES = { [0xcc] = 1, [0xcd] = 2, [0xce] = 4, [0xcf] = 8,
      [0xd0] = 1, [0xd1] = 2, [0xd2] = 4, [0xd3] = 8 },
    TEXT_LENGTH_BYTES = { [0xd9] = 1, [0xda] = 2, [0xdb] = 4 },
    -- cmsgpack.unpack, looked up once (reading a global Redis does not define raises an
    -- error): nil until the first call, then false where there is none.
    unpack = nil,
  }
  function my.find_cmsgpack() return cmsgpack.unpack end
  function my.unpack_all(blob) return { my.unpack(blob) } end

  function my.uint_at(blob, at, n)
    local v = 0
    for i = at, at + n - 1 do v = v * 256 + (string.byte(blob, i) or 0) end
    return v
  end

  function my.decode_in_lua(blob)
    local values, at, len = {}, 1, #blob
    while at <= len do
      local t = string.byte(blob, at)
      local v, n
      if t < 0x80 then
        v, at = t, at + 1
      elseif t >= 0xe0 then
        v, at = t - 0x100, at + 1
      elseif t >= 0xa0 and t < 0xc0 then
        n = t - 0xa0
        v, at = string.sub(blob, at + 1, at + n), at + 1 + n
      elseif my.TEXT_LENGTH_BYTES[t] then
        local k = my.TEXT_LENGTH_BYTES[t]
        n = my.uint_at(blob, at + 1, k)
        v, at = string.sub(blob, at + 1 + k, at + k + n), at + 1 + k + n
      elseif my.INT_BYTES[t] then
        local k = my.INT_BYTES[t]
        v = my.uint_at(blob, at + 1, k)
        if t >= 0xd0 and v >= 2 ^ (8 * k - 1) then v = v - 2 ^ (8 * k) end
        at = at + 1 + k
      else
        return nil
      end
      -- Cut short.
      if at > len + 1 then return nil end
      values[#values + 1] = v
    end
    return values
  end

  function decode_operations(blob, in_lua)
    if type(blob) ~= 'string' then return nil end
    if in_lua then return my.decode_in_lua(blob) end
    if my.unpack == nil then
      local found, unpack = pcall(my.find_cmsgpack)
      my.unpack = found and unpack or false
    end
    if my.unpack then
      local ok, values = pcall(my.unpack_all, blob)
      if ok then return values end
      return nil
    end
    return my.decode_in_lua(blob)
  end
end
