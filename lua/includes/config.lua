--[[
  The pool hash and the one clock. The pool hash holds the configuration (written by
  configure.lua) and the pool's counters (includes/counters.lua) together. A call reads the
  fields it needs and writes what changed with one HSET (flush_pool), and the fields stay with
  the library between calls, valid while the pool's write stamp is the one it wrote last (see
  POOL_CACHE): a call reads only what is new to it.
  Two ways to read it: load_cfg() reads the whole hash (HGETALL), as every script but the hot
  ones does; load_cfg_hot(caller, band) reads only the counters an admission needs and the
  library does not hold yet (HMGET), and takes the parsed configuration from a cache the
  library keeps per pool between calls, valid while the pool's 'cfgv' (a digest of its
  configuration, written by configure.lua) is unchanged. A field neither read up front is read
  on first use (POOL's __index), so every reader sees the hash as it is; neither a stamp nor a
  digest can match a different pool, so no fault (restart, flush, failover) can make either
  cache serve a stale one.
  Provides: init_config() (run by begin_call), POOL (the pool hash's fields, read on demand, then
  as changed: pool_set), pool_load_all() (every field: for scripts that iterate POOL),
  pool_prefetch(fields, fresh, count), pool_prefetch_these(n, field...), pool_set(field, value),
  pool_add(field, delta, floor) -> new, old, pool_int(field) -> number (0 when absent),
  pool_del(field), pool_fields() -> every field and its text (a table: loop over it, not over
  POOL), pool_entry() -> the pool's cache entry (its `workloads` and `touched` are the
  registry's), flush_pool(), CFG (settings, filled by load_cfg), load_cfg() and
  load_cfg_hot(caller, band) -> false when the pool has no
  configuration (Redis lost its data) or one in another Redis layout, config_digest() -> the
  'cfgv' of the fields as they are now, foreign_layout() -> the pool's layout note when it
  names another Redis layout (then load_cfg finds no configuration), else nil, band_cfg(band)
  -> the band's parsed BAND_CONFIG record, clock(override) -> pool-relative ms (TIME is read
  once per call, and only when a transition needs the time), pool_hints() -> the pool's guesses
  that save reads (see HINTS).
  Needs: contract.
]]
-- @include contract

-- POOL and CFG, and the functions this include provides, are shared; the rest is private to
-- the do block (the library's main chunk is held to Lua's 200 locals).
local POOL, CFG
local init_config, pool_load_all, pool_prefetch, pool_prefetch_these, pool_set, pool_int,
  pool_del, pool_hints, flush_pool, config_digest, foreign_layout, load_cfg, load_cfg_hot,
  band_cfg, clock, pool_add, pool_fields, pool_entry
do
  -- POOL_READ: the fields as read or last written (false: read, and absent), so one that changed
  -- and changed back (a release that dispatches) is not written. POOL_ALL: every field read (this
  -- call). PINT: integer fields set as numbers (pool_add), formatted once, when written.
  -- POOL and POOL_READ are kept between calls, one pair per pool (POOL_CACHE: pool hash key ->
  -- ENTRY = { pool, read, stamp, hot, workloads, touched }), so a call reads only what the calls
  -- before it did not: every write of the pool hash is this library's (flush_pool, the one
  -- writer; Python only reads it, and a pool in another layout is never written, see
  -- foreign_layout), and each writes the pool's write stamp (contract POOL_STAMP) with its
  -- changes, a text no other Redis
  -- and no other load of the library makes. A call first reads the stamp (init_config): the one
  -- its entry holds, and the entry is the hash as it is; another (a replica promoted after
  -- writes were lost, the data flushed or restarted, a hand-made change that deleted the
  -- stamp), and the entry is emptied. A call that stopped with changes not written (an error)
  -- leaves CLEAN false, and the next empties its pool's entry too. The entry also holds the
  -- pool's workload states (`workloads`, kept by includes/registry.lua): a workload hash lies in
  -- the pool's slot and only this library writes it, and a call that changes one sets
  -- `touched`, so flush_pool writes a stamp for it even when the pool hash is unchanged.
  local POOL_READ, POOL_DIRTY, POOL_GONE, PINT = nil, {}, {}, {}
  local POOL_ALL, BANDS, NOW, ENTRY
  local CLEAN = true
  local POOL_CACHE, POOL_CACHED = {}, 0
  -- The stamps this load of the library writes: STAMP_HEAD (made by its first write from the
  -- time and a table's address) and a count.
  local STAMP_HEAD, STAMP_N = nil, 0
  -- Scratch lists, kept between calls: what a prefetch reads, and the flush's HSET arguments
  -- (each used with its length, so what a longer earlier use left past it is never read).
  local WANT, ARGS, THESE = {}, {}, {}
  local function fetch_field(t, field)
    local n = PINT[field]
    if n then return int(n) end
    if POOL_ALL or POOL_READ[field] ~= nil or POOL_GONE[field] then return nil end
    local v = rcall('HGET', K_POOL, field)
    POOL_READ[field] = v
    if not v then return nil end
    t[field] = v
    return v
  end
  -- Only __index: an assignment to POOL is a plain one (no __newindex).
  local POOL_META = { __index = fetch_field }
  -- Between calls: pool hash key -> { ver = cfgv, cfg = CFG, bands = parsed band records }. Bounded
  -- by the number of pools; cleared if it ever holds more than CONFIG_CACHE_MAX of them.
  local CONFIG_CACHE, CONFIG_CACHED, CONFIG_CACHE_MAX = {}, 0, 256

  local function forget_entry(entry)
    clear(entry.pool)
    clear(entry.read)
    entry.stamp, entry.hot, entry.workloads = nil, nil, nil
  end

  function init_config()
    if not CLEAN then
      if ENTRY then forget_entry(ENTRY) end
      clear(POOL_DIRTY)
      clear(POOL_GONE)
      clear(PINT)
      CLEAN = true
    end
    local entry = POOL_CACHE[K_POOL]
    if not entry then
      -- (POOL's metatable is set here, not at load: the library's top level runs without
      -- setmetatable.)
      if POOL_CACHED >= CONFIG_CACHE_MAX then POOL_CACHE, POOL_CACHED = {}, 0 end
      entry = { pool = setmetatable({}, POOL_META), read = {}, stamp = nil, hot = nil,
        workloads = nil, touched = false }
      POOL_CACHE[K_POOL], POOL_CACHED = entry, POOL_CACHED + 1
    elseif not entry.stamp or entry.stamp ~= rcall('HGET', K_POOL, POOL_STAMP) then
      forget_entry(entry)
    end
    entry.touched = false
    ENTRY, POOL, POOL_READ = entry, entry.pool, entry.read
    POOL_ALL, CFG, BANDS, NOW = false, nil, nil, nil
  end

  -- The pool's cache entry (see POOL_CACHE) for this call.
  function pool_entry()
    return ENTRY
  end

  -- Neither read nor changed by this call yet.
  local function untouched(field)
    return POOL_READ[field] == nil and not POOL_DIRTY[field] and not POOL_GONE[field]
  end

  function pool_load_all()
    if POOL_ALL then return end
    local v = rcall('HGETALL', K_POOL)
    for i = 1, #v, 2 do
      local field = v[i]
      -- A field this call already read or changed keeps what it has.
      if untouched(field) then
        POOL_READ[field] = v[i + 1]
        POOL[field] = v[i + 1]
      end
    end
    POOL_ALL = true
  end

  -- Reads the fields not read yet in one HMGET: the first `count` of `fields` (all when nil).
  -- `fresh`: nothing is read or changed yet (so every field is wanted).
  function pool_prefetch(fields, fresh, count)
    if POOL_ALL then return end
    local want, n = fields, count or #fields
    if not fresh then
      local all = n
      want, n = WANT, 0
      for i = 1, all do
        local field = fields[i]
        -- untouched(field), inline: this runs for every field of every prefetch.
        if POOL_READ[field] == nil and not POOL_DIRTY[field] and not POOL_GONE[field] then
          n = n + 1
          want[n] = field
        end
      end
    end
    if n == 0 then return end
    local v = rcall('HMGET', K_POOL, unpack(want, 1, n))
    local read, pool = POOL_READ, POOL
    for i = 1, n do
      local field, value = want[i], v[i]
      read[field] = value
      if value then pool[field] = value end
    end
  end

  -- pool_prefetch of the `n` (at most 6) fields given (no list to build).
  function pool_prefetch_these(n, ...)
    local these = THESE
    these[1], these[2], these[3], these[4], these[5], these[6] = ...
    pool_prefetch(these, false, n)
  end

  function pool_set(field, value)
    PINT[field] = nil
    POOL[field] = value
    POOL_DIRTY[field] = true
    POOL_GONE[field] = nil
    CLEAN = false
  end

  -- An integer field's value (0 when absent).
  function pool_int(field)
    local n = PINT[field]
    if n then return n end
    local text = POOL[field]
    return NUMBER_OF[text] or tonum(text) or 0
  end

  -- Adds `delta` to an integer field (absent: 0), held at 0 or more when `floor`; returns the
  -- new value and the old. The field is kept as a number until the flush (a batch changes
  -- counters many times), and read through POOL's __index from now on, which formats it.
  function pool_add(field, delta, floor)
    local was = PINT[field]
    local n
    if was then
      -- Changed by this call already: only the number moves (see pool_set and pool_del, the
      -- only others that touch PINT). A call changes a counter many times; assigning nil to a
      -- key a table lacks makes Lua add it.
      n = was + delta
      if floor and n < 0 then n = 0 end
      PINT[field] = n
      return n, was
    end
    local text = POOL[field]
    was = NUMBER_OF[text] or tonum(text) or 0
    n = was + delta
    if floor and n < 0 then n = 0 end
    POOL[field] = nil
    PINT[field] = n
    POOL_DIRTY[field] = true
    POOL_GONE[field] = nil
    CLEAN = false
    return n, was
  end

  -- Every field and its value as text, for a loop over the whole hash (after pool_load_all).
  -- Not pairs(POOL): a counter this call changed is kept as a number (pool_add), not among
  -- POOL's own fields, and such a loop would miss it.
  function pool_fields()
    local all = {}
    for field, value in pairs(POOL) do all[field] = value end
    for field, n in pairs(PINT) do all[field] = int(n) end
    return all
  end

  function pool_del(field)
    PINT[field] = nil
    POOL[field] = nil
    POOL_DIRTY[field] = nil
    POOL_GONE[field] = true
    CLEAN = false
  end

  -- Between calls, per pool, guesses that only save reads (every value is still read in the call
  -- that uses it): `nums` replica -> its owner number, `band` the band last touched, `queuer` the
  -- owner number of the item queued last, `queued` whether the last call left a queue or every
  -- slot taken.
  -- Bounded like the configuration cache.
  local HINTS, HINTS_KEPT = {}, 0
  function pool_hints()
    local h = HINTS[K_POOL]
    if h then return h end
    if HINTS_KEPT >= CONFIG_CACHE_MAX then HINTS, HINTS_KEPT = {}, 0 end
    HINTS_KEPT = HINTS_KEPT + 1
    h = { nums = {}, nums_kept = 0, queued = false }
    HINTS[K_POOL] = h
    return h
  end

  function flush_pool()
    -- Whether the next call may take the queued path (a queue, or every slot taken), for its
    -- guess of what to read (a call that did not read the counts leaves the guess as it was).
    -- (A count read and found absent is 0: POOL_READ holds false for it.)
    local qn = PINT.qn or tonum(rawget(POOL, 'qn')) or (POOL_READ.qn == false and 0)
    if qn then
      local inflight = PINT.inflight or tonum(rawget(POOL, 'inflight'))
        or (POOL_READ.inflight == false and 0) or nil
      pool_hints().queued = qn > 0 or (CFG ~= nil and inflight ~= nil and inflight >= CFG.limit)
    end
    -- Empties POOL_DIRTY, PINT and POOL_GONE as it writes them; a counter kept as a number
    -- is among POOL's fields, as text, again.
    local args, n = ARGS, 0
    local read, dirty, ints = POOL_READ, POOL_DIRTY, PINT
    for field in pairs(dirty) do
      local number = ints[field]
      local value
      if number then
        value = TEXT_OF[number] or int(number)
        ints[field] = nil
        POOL[field] = value
      else
        value = rawget(POOL, field)
      end
      dirty[field] = nil
      if value ~= read[field] then
        args[n + 1], args[n + 2] = field, value
        n = n + 2
        read[field] = value
      end
    end
    local gone = next(POOL_GONE) ~= nil
    if n > 0 or gone or ENTRY.touched then
      -- A new stamp with the changes (see POOL_CACHE).
      if not STAMP_HEAD then
        local t = rcall('TIME')
        STAMP_HEAD = t[1] .. '.' .. t[2] .. '.' .. string.sub(tostring(POOL_CACHE), 8) .. '.'
      end
      STAMP_N = STAMP_N + 1
      local stamp = STAMP_HEAD .. STAMP_N
      args[n + 1], args[n + 2] = POOL_STAMP, stamp
      rcall('HSET', K_POOL, unpack(args, 1, n + 2))
      if gone then
        n = 0
        for field in pairs(POOL_GONE) do
          n = n + 1
          args[n] = field
          read[field] = false
          POOL_GONE[field] = nil
        end
        rcall('HDEL', K_POOL, unpack(args, 1, n))
      end
      ENTRY.stamp, ENTRY.touched = stamp, false
    end
    CLEAN = true
  end

  -- The digest of the configuration fields as they are now: the settings and every band record,
  -- in field order. Needs every field read (pool_load_all).
  function config_digest()
    local parts = {}
    for field, value in pairs(POOL) do
      -- (The layout note too: a pool made again by a sidecar of another layout, after Redis lost
      -- the data, has another digest even with the same settings, so a cached configuration is
      -- not taken for it: load_cfg checks the layout.)
      if CFG_FIELD[field] or field == POOL_LAYOUT
        or string.sub(field, 1, #CFG_BAND) == CFG_BAND then
        parts[#parts + 1] = field .. '=' .. value
      end
    end
    table.sort(parts)
    return redis.sha1hex(table.concat(parts, '\n'))
  end

  local function read_settings(r)
    local c = {}
    -- After the pool's data was lost (Redis restarted empty), nothing is dispatched before this
    -- pool time, so every live replica can re-register what it still holds first (configure.lua).
    c.hold = tonumber(r.hold) or 0
    c.epoch, c.limit = tonumber(r.epoch), tonumber(r.limit)
    c.maxReq, c.maxBytes = tonumber(r.maxReq), tonumber(r.maxBytes)
    c.win, c.alpha, c.idle, c.maxTracked = tonumber(r.win), tonumber(r.alpha),
      tonumber(r.idle), tonumber(r.maxTracked)
    c.det = r.det
    c.stale, c.qdt, c.head = tonumber(r.stale), tonumber(r.qdt), tonumber(r.head)
    c.tokLimit = tonumber(r.tokLimit)
    return c
  end

  local function remember_cfg()
    local ver = POOL[CFG_DIGEST]
    if not ver then return end
    if not CONFIG_CACHE[K_POOL] then
      if CONFIG_CACHED >= CONFIG_CACHE_MAX then CONFIG_CACHE, CONFIG_CACHED = {}, 0 end
      CONFIG_CACHED = CONFIG_CACHED + 1
    end
    CONFIG_CACHE[K_POOL] = { ver = ver, cfg = CFG, bands = BANDS }
  end

  -- The pool's layout note (contract POOL_LAYOUT) if it names a layout other than this
  -- library's (contract LAYOUT_VERSION), else nil. (After load_cfg or pool_load_all.)
  function foreign_layout()
    local note = rawget(POOL, POOL_LAYOUT)
    if note == nil or note == POOL_LAYOUT_NOTE then return nil end
    return note
  end

  function load_cfg()
    pool_load_all()
    -- A pool in another layout is not read: to this library it has no configuration (the
    -- script answers S_NO_CONFIG and the note), and configure.lua, which the caller runs next,
    -- refuses it (S_LAYOUT_MISMATCH).
    if not POOL.epoch or foreign_layout() then return false end
    CFG, BANDS = read_settings(POOL), {}
    remember_cfg()
    return true
  end

  -- The fields load_cfg_hot reads, into `fields` (kept per pool with what it was made from, so
  -- a call like the one before it reuses it as it is): the counters every admission reads, with
  -- the caller's owner number; when the last call left a queue or every slot taken (`queued`),
  -- also what the queued path reads next: the queue's totals, the counters of the caller's
  -- number, of the owner of the item queued last (`queuer`, whose items a dispatch here may
  -- take) and of the band (the call's, or the one last touched). Others are read when a path
  -- needs them (includes/counters.lua).
  local function hot_fields(fields, number_field, num, queued, queuer, band, c)
    fields[1], fields[2], fields[3], fields[4], fields[5], fields[6] =
      CFG_DIGEST, 'qn', 'inflight', 'seq', number_field, ANON_FALLBACK
    local n = 6
    if queued then
      fields[n + 1], fields[n + 2] = 'qbytes', QUEUED_BANDS
      n = n + 2
      if num then
        fields[n + 1], fields[n + 2], fields[n + 3] = OWNER_QUEUED .. num, OWNER_ID .. num,
          RECLAIM .. num
        n = n + 3
      end
      if queuer then
        fields[n + 1], fields[n + 2], fields[n + 3] = OWNER_QUEUED .. queuer, OWNER_ID .. queuer,
          RECLAIM .. queuer
        n = n + 3
      end
      if band then
        fields[n + 1], fields[n + 2] = BAND_QUEUED .. band, BAND_BYTES .. band
        n = n + 2
      end
    end
    if c.tokLimit then
      fields[n + 1] = 'tok'
      n = n + 1
    end
    if c.det == DETECTOR_UTILIZATION then
      fields[n + 1], fields[n + 2], fields[n + 3], fields[n + 4] = 'sat', 'satT', 'satN', 'since'
      n = n + 4
    end
    return n
  end

  -- The counters an admission reads (hot_fields) and the configuration, from the cache when its
  -- digest still matches. HOT_MADE: how many hot field lists were made (each list's number, so
  -- a pool's entry knows which it has read).
  local HOT_MADE = 0
  function load_cfg_hot(caller, band)
    local cached = CONFIG_CACHE[K_POOL]
    if not cached then return load_cfg() end
    local c = cached.cfg
    local h = pool_hints()
    local num, queued, queuer = h.nums[caller], h.queued, nil
    if queued then
      queuer = h.queuer
      if queuer == num then queuer = nil end
      band = band or h.band
    else
      band = nil
    end
    local fields, n, number_field = h.hot, h.hot_n, h.hot_number_field
    if not fields or h.hot_caller ~= caller or h.hot_num ~= num or h.hot_queued ~= queued
      or h.hot_queuer ~= queuer or h.hot_band ~= band or h.hot_cfg ~= c then
      fields, number_field = fields or {}, REPLICA_NUMBER .. caller
      n = hot_fields(fields, number_field, num, queued, queuer, band, c)
      HOT_MADE = HOT_MADE + 1
      h.hot, h.hot_n, h.hot_number_field, h.hot_made = fields, n, number_field, HOT_MADE
      h.hot_caller, h.hot_num, h.hot_queued, h.hot_queuer, h.hot_band, h.hot_cfg =
        caller, num, queued, queuer, band, c
    end
    -- Read unless the pool's entry (see POOL_CACHE) has every field of this list already.
    local entry = ENTRY
    if entry.hot ~= h.hot_made then
      pool_prefetch(fields, next(POOL_READ) == nil, n)
      entry.hot = h.hot_made
    end
    if POOL[CFG_DIGEST] ~= cached.ver then return load_cfg() end
    CFG, BANDS = c, cached.bands
    local known = rawget(POOL, number_field)
    if known and known ~= num then
      if h.nums_kept >= CONFIG_CACHE_MAX then h.nums, h.nums_kept = {}, 0 end
      h.nums[caller], h.nums_kept = known, h.nums_kept + 1
    end
    return true
  end

  -- Parsed once per configuration (BANDS is kept with it between calls): a band's record, or the
  -- template it falls back to, which the configuration alone decides.
  function band_cfg(band)
    -- (Only configure.lua reads a band with no configuration loaded: BANDS is then made here.)
    if not BANDS then BANDS = {} end
    local b = BANDS[band]
    if b then return b end
    local raw = POOL[CFG_BAND .. band]
    -- An unlisted negative band takes defaultNegativePriorityBand when one is configured.
    if not raw and (tonumber(band) or 0) < 0 then raw = POOL[CFG_BAND_NEGATIVE] end
    if not raw then raw = POOL[CFG_BAND_DEFAULT] end
    b = parse_band(raw)
    BANDS[band] = b
    return b
  end

  -- The one clock: Redis TIME, unless a test passes an override (absolute ms). Read at most once
  -- per call: every transition of a call sees the same time.
  function clock(override)
    if NOW then return NOW end
    local abs
    if override and override ~= '' then
      abs = tonumber(override)
    else
      local t = rcall('TIME')
      -- (The seconds repeat from call to call: looked up; the microseconds do not.)
      local s = t[1]
      abs = (NUMBER_OF[s] or tonum(s)) * 1000 + math.floor(tonumber(t[2]) / 1000)
    end
    NOW = abs - CFG.epoch
    return NOW
  end
end
