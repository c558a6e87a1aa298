
local keep_from, dedupe_from, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out, pos = {}, 4
for i = 1, #KEYS / 2 do
  out[i], pos = apply_item(KEYS[2 * i - 1], KEYS[2 * i], keep_from, dedupe_from, ARGV[2], ttl,
                           pos)
end
return out
