local ttl, width = ARGV[1], tonumber(ARGV[2])
local kept = 0
for i, key in ipairs(KEYS) do
  local value = ARGV[i + 2]
  local stored = redis.call('GETRANGE', key, 0, width - 1)
  if stored == '' or stored <= string.sub(value, 1, width) then
    redis.call('SET', key, value, 'PX', ttl)
    kept = kept + 1
  end
end
return kept
