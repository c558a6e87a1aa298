
local CHUNK = 1000  -- arguments unpacked per call stay far below Lua's C stack limit
local W_LOW, D_LOW = '\30', '\31'
-- Shortest of %.15g / %.17g that reads back as the same double: exact, and short for the
-- usual sums (26.55 rather than 26.550000000000001), which keeps the hash in a listpack.
-- price*quantity sums (2.95 * 7 = 20.650000000000002) are kept to 12 significant digits
-- instead: far below float32 model precision, and half the bytes.
local function fmt(x)
  local s = string.format('%.15g', x)
  if tonumber(s) ~= x then s = string.format('%.17g', x) end
  return s
end
local function encode(q, pq, pn)
  if pq == 0 and pn == 0 then return fmt(q) end
  if pn == q then return fmt(q) .. ',' .. string.format('%.12g', pq) end
  return fmt(q) .. ',' .. string.format('%.12g', pq) .. ',' .. fmt(pn)
end
-- "q", "q,price_qty" (priced_qty == q) or "q,price_qty,priced_qty"; false: an empty bucket.
local function parse(cur)
  if not cur then return 0, 0, 0 end
  local i = string.find(cur, ',', 1, true)
  if not i then return tonumber(cur), 0, 0 end
  local q = tonumber(string.sub(cur, 1, i - 1))
  local j = string.find(cur, ',', i + 1, true)
  if not j then return q, tonumber(string.sub(cur, i + 1)), q end
  return q, tonumber(string.sub(cur, i + 1, j - 1)), tonumber(string.sub(cur, j + 1))
end
-- ZMSCORE of the markers and of the keys ARGV[from..to] (CHUNK keys per call): the markers'
-- scores (numbers, nil when absent) and the reply, where key i's score is at i + 2 (false:
-- unseen).
local function lookup(d, from, to)
  local got = redis.call('ZMSCORE', d, W_LOW, D_LOW,
                         unpack(ARGV, from, math.min(to, from + CHUNK - 1)))
  for i = from + CHUNK, to, CHUNK do
    local more = redis.call('ZMSCORE', d, unpack(ARGV, i, math.min(i + CHUNK - 1, to)))
    for j = 1, #more do got[#got + 1] = more[j] end
  end
  return tonumber(got[1]), tonumber(got[2]), got
end
-- Everything after the dedupe check, shared by both modes. fields: the buckets receiving
-- new events, in first-seen order; adds[field]: their quantity, price_qty, priced_qty
-- increments (3 numbers each) in event order; zargs: score/key pairs of the new dedupe keys.
local function store(w, d, keep_from, dedupe_from, dedupe_from_arg, ttl, w_low, d_low, fields,
                     adds, zargs)
  local hset, changed, lowest, written = {}, {}, nil, nil
  local first = false
  for i = 1, #fields, CHUNK do
    local last = math.min(i + CHUNK - 1, #fields)
    local cur = redis.call('HMGET', w, 'f', unpack(fields, i, last))
    if cur[1] then first = cur[1] end
    for j = i, last do
      local field = fields[j]
      local idx = tonumber(field)
      local q, pq, pn = parse(cur[j - i + 2])
      local a = adds[field]
      for k = 1, #a, 3 do  -- in order, as adding the events one by one would
        q, pq, pn = q + a[k], pq + a[k + 1], pn + a[k + 2]
      end
      changed[#changed + 1] = idx
      if (not lowest) or idx < lowest then lowest = idx end
      -- A bucket before keep_from (only when the caller breaks dedupe_from >= keep_from)
      -- counts as changed but would be trimmed at once: not written.
      if idx >= keep_from then
        hset[#hset + 1] = field
        hset[#hset + 1] = encode(q, pq, pn)
        if (not written) or idx < written then written = idx end
      end
    end
  end
  if lowest and ((not first) or lowest < tonumber(first)) then
    hset[#hset + 1] = 'f'
    hset[#hset + 1] = lowest
  end
  -- Trim the window hash: nothing is below keep_from unless the marker says it may be.
  -- No 'f' while events were added means an empty hash ('f' comes with the first bucket).
  local new_w_low
  if #fields > 0 and not first then
    new_w_low = written
  elseif w_low and w_low >= keep_from then
    new_w_low = w_low
    if written and written < new_w_low then new_w_low = written end
  else
    local del, low = {}, written
    for _, f in ipairs(redis.call('HKEYS', w)) do
      if f ~= 'f' then
        local idx = tonumber(f)
        if idx < keep_from then
          del[#del + 1] = f
        elseif (not low) or idx < low then
          low = idx
        end
      end
    end
    for i = 1, #del, CHUNK do
      redis.call('HDEL', w, unpack(del, i, math.min(i + CHUNK - 1, #del)))
    end
    new_w_low = low or keep_from
  end
  -- Forget the dedupe keys of late buckets: none below dedupe_from unless the marker says so.
  local new_d_low, trimmed = d_low, false
  if (not d_low) or d_low < dedupe_from then
    redis.call('ZREMRANGEBYSCORE', d, '-inf', '(' .. dedupe_from_arg)
    new_d_low, trimmed = dedupe_from, true
  elseif lowest and lowest < new_d_low then
    new_d_low = lowest
  end
  -- Markers are written when they change or the trim above may have removed them, and
  -- never alone into a zset that did not have them (no item gets a zset of markers only).
  local marks = {}
  if (trimmed or new_w_low ~= w_low or new_d_low ~= d_low)
      and (#zargs > 0 or w_low or d_low) then
    marks = {new_d_low, D_LOW}
    if new_w_low then marks = {new_d_low, D_LOW, new_w_low, W_LOW} end
  end
  for _, v in ipairs(marks) do zargs[#zargs + 1] = v end
  for i = 1, #zargs, 2 * CHUNK do
    redis.call('ZADD', d, unpack(zargs, i, math.min(i + 2 * CHUNK - 1, #zargs)))
  end
  for i = 1, #hset, 2 * CHUNK do
    redis.call('HSET', w, unpack(hset, i, math.min(i + 2 * CHUNK - 1, #hset)))
  end
  if ttl > 0 then
    redis.call('PEXPIRE', w, ttl)
    redis.call('PEXPIRE', d, ttl)
  end
  return changed
end
local function apply_summed(w, d, keep_from, dedupe_from, dedupe_from_arg, ttl, pos)
  local fields, adds, zargs = {}, {}, {}
  local k = pos + 1  -- the block's first key
  for field, q, pq, pn, n in string.gmatch(ARGV[pos],
      '(%-?%d+),([^,]+),([^,]+),([^,]+),(%d+);') do
    local a = adds[field]
    if not a then
      a = {}
      adds[field] = a
      fields[#fields + 1] = field
    end
    a[#a + 1] = tonumber(q)
    a[#a + 1] = tonumber(pq)
    a[#a + 1] = tonumber(pn)
    for j = k, k + tonumber(n) - 1 do
      zargs[#zargs + 1] = field
      zargs[#zargs + 1] = ARGV[j]
    end
    k = k + tonumber(n)
  end
  local w_low, d_low, got = lookup(d, pos + 1, k - 1)  -- every key before any write
  for i = 3, #got do
    if got[i] then return {-1}, k end
  end
  local changed = store(w, d, keep_from, dedupe_from, dedupe_from_arg, ttl, w_low, d_low,
                        fields, adds, zargs)
  return {0, changed}, k
end
local function apply_events(w, d, keep_from, dedupe_from, dedupe_from_arg, ttl, pos)
  local events = {}
  for field, q, pq, pn in string.gmatch(ARGV[pos], '(%-?%d+),([^,]+),([^,]+),([^;]+);') do
    events[#events + 1] = {field, q, pq, pn}
  end
  local n = #events
  local w_low, d_low, got = lookup(d, pos + 1, pos + n)
  local fields, adds, zargs, seen, dup = {}, {}, {}, {}, 0
  for i, e in ipairs(events) do
    local field, key = e[1], ARGV[pos + i]
    if got[i + 2] or seen[key] then
      dup = dup + 1
    else
      seen[key] = true
      zargs[#zargs + 1] = field
      zargs[#zargs + 1] = key
      local a = adds[field]
      if not a then
        a = {}
        adds[field] = a
        fields[#fields + 1] = field
      end
      a[#a + 1] = tonumber(e[2])
      a[#a + 1] = tonumber(e[3])
      a[#a + 1] = tonumber(e[4])
    end
  end
  local changed = store(w, d, keep_from, dedupe_from, dedupe_from_arg, ttl, w_low, d_low,
                        fields, adds, zargs)
  return {dup, changed}, pos + n + 1
end
local function apply_item(w, d, keep_from, dedupe_from, dedupe_from_arg, ttl, pos)
  if string.byte(ARGV[pos], 1) == 115 then  -- 's'
    return apply_summed(w, d, keep_from, dedupe_from, dedupe_from_arg, ttl, pos)
  end
  return apply_events(w, d, keep_from, dedupe_from, dedupe_from_arg, ttl, pos)
end
