-- The connect bucket of one user (limits.connects_per_s, across the cluster):
-- a token bucket in KEYS[1] (hash: tk tokens, ts last take in ms).
-- ARGV[1] tokens per second, ARGV[2] burst.
-- Returns 0 when a token was taken, else the milliseconds until one is there.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local bucket = redis.call('HMGET', KEYS[1], 'tk', 'ts')
local tokens = tonumber(bucket[1]) or burst
local last_take = tonumber(bucket[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - last_take) * rate / 1000)
if tokens < 1 then
  return math.max(1, math.ceil((1 - tokens) * 1000 / rate))
end
redis.call('HSET', KEYS[1], 'tk', tostring(tokens - 1), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return 0
