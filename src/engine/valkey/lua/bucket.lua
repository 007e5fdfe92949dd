-- Token buckets, shared by append.lua, update.lua and connect.lua (prepended
-- to each when embedded). A bucket is a hash: tk = tokens left, ts = ms of
-- the last take, on Valkey's clock, so every node sees one bucket.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The tokens in bucket `key` at `now`: refilled at `rate` per second since
-- the last take, up to `burst`; a bucket never used is full.
local function bucket_level(key, rate, burst, now)
  local b = redis.call('HMGET', key, 'tk', 'ts')
  local tokens = tonumber(b[1]) or burst
  local last = tonumber(b[2]) or now
  return math.min(burst, tokens + math.max(0, now - last) * rate / 1000)
end

-- Milliseconds until a bucket at `tokens` holds `need` (at least 1).
local function bucket_wait(tokens, need, rate)
  return math.max(1, math.ceil((need - tokens) * 1000 / rate))
end

-- Takes `need` from bucket `key`, read at `tokens`; the key expires once the
-- bucket would be full again.
local function bucket_take(key, tokens, need, rate, burst, now)
  redis.call('HSET', key, 'tk', tostring(tokens - need), 'ts', now)
  redis.call('PEXPIRE', key, math.ceil(burst * 1000 / rate) + 1000)
end
