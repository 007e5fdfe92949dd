-- The per-user send byte budget, across every node: a token bucket counted
-- in bytes (Valkey's clock), taken before a message is stored.
-- KEYS[1] the user's byte bucket (hash: tk = bytes left, ts = ms of the last take)
-- ARGV[1] bytes of this message   ARGV[2] bytes per second   ARGV[3] burst
-- Returns 0 (taken) or the milliseconds until the bucket holds ARGV[1].
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local need, rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'tk', 'ts')
local tokens = tonumber(b[1]) or burst
local last = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - last) * rate / 1000)
if tokens < need then
  return math.max(1, math.ceil((need - tokens) * 1000 / rate))
end
redis.call('HSET', KEYS[1], 'tk', tostring(tokens - need), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return 0
