-- Raises a user's delivered/read marks, monotonic, with the range check
-- against the conversation's last seq in the same step.
-- KEYS[1] receipts hash (user -> "delivered:read")   KEYS[2] meta hash
-- ARGV[1] user   ARGV[2] seq   ARGV[3] "1" for read (implies delivered)
-- Returns {-1, last} out of range, {0, d, r} unchanged, {1, d, r} changed.
local last = tonumber(redis.call('HGET', KEYS[2], 'last') or '0')
local seq = tonumber(ARGV[2])
if seq < 1 or seq > last then
  return {-1, last}
end
local d, r = 0, 0
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local a, b = string.match(cur, '^(%d+):(%d+)$')
  d, r = tonumber(a), tonumber(b)
end
local nd, nr = math.max(d, seq), r
if ARGV[3] == '1' then nr = math.max(r, seq) end
if nd == d and nr == r then
  return {0, d, r}
end
redis.call('HSET', KEYS[1], ARGV[1], nd .. ':' .. nr)
return {1, nd, nr}
