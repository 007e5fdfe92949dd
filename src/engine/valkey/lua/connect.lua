-- The connect bucket of one user (limits.connects_per_s, across the cluster):
-- a token bucket in KEYS[1] (bucket.lua).
-- ARGV[1] tokens per second, ARGV[2] burst.
-- Returns 0 when a token was taken, else the milliseconds until one is there.
local now = now_ms()
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tokens = bucket_level(KEYS[1], rate, burst, now)
if tokens < 1 then
  return bucket_wait(tokens, 1, rate)
end
bucket_take(KEYS[1], tokens, 1, rate, burst, now)
return 0
