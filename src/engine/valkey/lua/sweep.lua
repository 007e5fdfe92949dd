-- Claims a node whose lease expired: removes it from the live set and returns
-- the users it had, so the caller can announce them offline. Only one caller
-- wins (ZREM returns 1 once).
-- KEYS[1] live nodes   ARGV[1] per-node hash prefix   ARGV[2] dead node   ARGV[3] now (ms)
local score = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not score or tonumber(score) >= tonumber(ARGV[3]) then return {} end
redis.call('ZREM', KEYS[1], ARGV[2])
local users = redis.call('HKEYS', ARGV[1] .. ARGV[2])
redis.call('DEL', ARGV[1] .. ARGV[2])
return users
