
local s, a = KEYS[1], KEYS[2]
local cur = redis.call('HMGET', s, 'm', 'e', 'o')
local set = {}
local function merge_max(i, field, value)
  if value ~= '' and ((not cur[i]) or tonumber(value) > tonumber(cur[i])) then
    set[#set + 1] = field
    set[#set + 1] = value
  end
end
-- ARGV[6]: the next offset the worker knows stored; a clock missing or older means the state
-- was lost: the clock is not written (it would vouch for windows that are gone).
local lost = 0
if ARGV[6] ~= '' and ((not cur[3]) or tonumber(cur[3]) < tonumber(ARGV[6])) then
  lost = 1
else
  merge_max(1, 'm', ARGV[1])
  merge_max(2, 'e', ARGV[2])
  merge_max(3, 'o', ARGV[5])
  if #set > 0 then redis.call('HSET', s, unpack(set)) end
end
for i = 7, #ARGV, 2000 do
  local args = {}
  for j = i, math.min(i + 1998, #ARGV - 1), 2 do
    args[#args + 1] = ARGV[j + 1]
    args[#args + 1] = ARGV[j]
  end
  redis.call('ZADD', a, 'GT', unpack(args))
end
if ARGV[3] ~= '' then redis.call('ZREMRANGEBYSCORE', a, '-inf', '(' .. ARGV[3]) end
if ARGV[4] ~= '' then return {lost, redis.call('ZRANGEBYSCORE', a, ARGV[4], '+inf')} end
return {lost, {}}
